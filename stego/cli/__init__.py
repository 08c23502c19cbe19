"""The ``stego`` command line: ``main`` parses and dispatches; one module per subcommand."""

from stego.cli.main import main

__all__ = ["main"]
