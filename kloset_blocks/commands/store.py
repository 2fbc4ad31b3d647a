"""Store commands: snapshots, ls, cat, restore (filled in with the reader)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    pass
