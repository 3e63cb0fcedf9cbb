"""One module per pipeline stage: a pure worker, a `run()` that does the I/O, and a Typer command."""
