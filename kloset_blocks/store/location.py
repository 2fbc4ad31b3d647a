# Store locations as plakar spells them (§1.1): `fs:/path`, `fs:///path`, or a bare path; the
# protocol is the longest [A-Za-z0-9+.-] prefix of at least 2 characters before ':' (so `C:\x`
# is a path). Only the local `fs` backend is supported; anything else is refused by name.
from __future__ import annotations

import os
import re

from kloset_blocks.errors import StoreError

_PROTO = re.compile(r"^([A-Za-z0-9+.-]{2,}):(.*)$", re.DOTALL)
SUPPORTED = ("fs",)


def parse_location(location: str) -> str:
    """The absolute directory of an `fs` store location (not checked for existence)."""
    if not location:
        raise StoreError("empty store location")
    m = _PROTO.match(location)
    if m:
        proto, rest = m.group(1).lower(), m.group(2)
        if proto not in SUPPORTED:
            raise StoreError(f"unsupported store backend: {proto} (supported: {', '.join(SUPPORTED)})")
        if rest.startswith("//"):
            rest = rest[2:]
    else:
        rest = location
    if not rest:
        raise StoreError(f"store location {location!r} has no path")
    if rest.endswith(".ptar"):
        raise StoreError(f"unsupported store backend: ptar (supported: {', '.join(SUPPORTED)})")
    return os.path.abspath(os.path.expanduser(rest))
