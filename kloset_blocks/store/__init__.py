# The read-only Kloset store reader: open_store() and the objects it hands out.
from __future__ import annotations

from kloset_blocks.store.codec import Codec
from kloset_blocks.store.gomode import go_mode_to_st_mode
from kloset_blocks.store.location import parse_location
from kloset_blocks.store.passphrase import passphrase_source
from kloset_blocks.store.snapshot import (
    Entry,
    Snapshot,
    SnapshotFile,
    SnapshotInfo,
    clean_path,
)
from kloset_blocks.store.state import Location, LocationIndex
from kloset_blocks.store.store import Store, cache_dir_for, match_prefix, open_store

__all__ = [
    "Codec",
    "Entry",
    "Location",
    "LocationIndex",
    "Snapshot",
    "SnapshotFile",
    "SnapshotInfo",
    "Store",
    "cache_dir_for",
    "clean_path",
    "go_mode_to_st_mode",
    "match_prefix",
    "open_store",
    "parse_location",
    "passphrase_source",
]
