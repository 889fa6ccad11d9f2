"""The `mergevq` command line: thin Typer commands over `mergevq_core.api`."""
