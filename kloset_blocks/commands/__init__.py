"""Subcommands of `kloset-blocks`; each module exposes register(subparsers)."""
