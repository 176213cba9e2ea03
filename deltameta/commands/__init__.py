"""One module per ``deltameta`` subcommand (see :mod:`deltameta.cli`)."""
