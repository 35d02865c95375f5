"""Groups, variables and charts: per-batch partials and their ordered merge."""
