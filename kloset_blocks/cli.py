# The `kloset-blocks` command: argparse dispatch only. Each command lives in a module of
# kloset_blocks.commands that exposes `register(subparsers)`; its handler takes the parsed
# arguments and returns an exit code. KlosetError becomes one line on stderr and exit 1;
# Ctrl-C exits 130. No traceback reaches the user for an error they can act on.
from __future__ import annotations

import argparse
import importlib
import sys

from kloset_blocks import __version__
from kloset_blocks.errors import KlosetError

COMMAND_MODULES = [
    "kloset_blocks.commands.store",
    "kloset_blocks.commands.image",
    "kloset_blocks.commands.writer",
    "kloset_blocks.commands.run",
    "kloset_blocks.commands.fuse",
    "kloset_blocks.commands.query",
    "kloset_blocks.commands.ui",
    "kloset_blocks.commands.check",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kloset-blocks",
        description="Serve Kloset snapshots as block devices and run PostgreSQL on them, nothing restored.",
    )
    parser.add_argument("--version", action="version", version=f"kloset-blocks {__version__}")
    parser.add_argument(
        "--store-config",
        metavar="FILE",
        help="key=value options of a remote store (access_key, secret_access_key, identity, ...)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def take_store_config(argv: list[str]) -> tuple[list[str], str | None]:
    """`--store-config FILE` (or `=FILE`) taken out of argv wherever it stands before a `--`, so
    every command accepts it without each declaring it (it names the options file of remote
    stores, kloset_blocks/store/options.py)."""
    out: list[str] = []
    found = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            out.extend(argv[i:])
            break
        if arg == "--store-config" and i + 1 < len(argv):
            found = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--store-config="):
            found = arg.split("=", 1)[1]
        else:
            out.append(arg)
        i += 1
    return out, found


def main(argv: list[str] | None = None) -> int:
    argv, store_config = take_store_config(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    try:
        if store_config is not None:
            from kloset_blocks.store.options import use_config_file

            use_config_file(store_config)
        return int(args.handler(args) or 0)
    except KlosetError as e:
        print(f"kloset-blocks: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kloset-blocks: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
