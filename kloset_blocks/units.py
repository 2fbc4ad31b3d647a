# Human sizes as nbdkit, qemu-img and dd write them: "512M", "2G", "64k", "1048576", "1.5G".
# Binary multiples (K = 1024), case-insensitive, an optional trailing "B" or "iB".
from __future__ import annotations

import re

from kloset_blocks.errors import UsageError

_SUFFIXES = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtpe]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    match = _SIZE.match(text)
    if not match:
        raise UsageError(f"not a size: {text!r} (examples: 4096, 64k, 512M, 2G)")
    number, suffix = match.groups()
    return int(float(number) * 1024 ** _SUFFIXES[suffix.lower()])


def format_size(n: int) -> str:
    """A short human size: 0 B, 512 B, 1.5 KiB, 12 MiB, 3.2 GiB."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            if unit == "B":
                return f"{int(value)} B"
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
