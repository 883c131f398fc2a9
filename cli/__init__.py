"""The thin typer layer of hydra-store: parse, call the library, print."""
