"""CLI subcommands. Each module: ``HELP``, ``add_arguments(parser)``, ``main(args) -> int``."""
