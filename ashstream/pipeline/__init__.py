"""The processes of a stream: the producer, the transformers, and the messages between them."""
