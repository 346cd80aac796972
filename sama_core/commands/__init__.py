"""CLI subcommands: one module each, exposing `register(subparsers)` that sets `func` on its parser."""
