from ashstream.cli import main

main()
