"""One module per ``stego`` subcommand; see :mod:`stego.cli`."""
