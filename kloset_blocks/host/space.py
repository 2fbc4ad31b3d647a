# Room for the overlay. Every write Postgres makes (WAL replay at start, queries' temporary files,
# the user's own writes) lands in the qcow2 overlay, so the filesystem holding it must have room:
# a temporary overlay goes to a directory on disk (never the run directory under /run, a small
# tmpfs on most hosts), a start refuses early when that place has less than a minimum free, and
# when the place fills up anyway the error says where the overlay lives and how much room it had.
#
# The place: $KLOSET_BLOCKS_OVERLAY_DIR, else /var/tmp/kloset-blocks. The minimum:
# $KLOSET_BLOCKS_OVERLAY_MIN_FREE (a size, e.g. 512M; 0 disables the check), else 1 GiB.
from __future__ import annotations

import os
from pathlib import Path

from kloset_blocks.errors import UsageError
from kloset_blocks.host.tools import AttachError
from kloset_blocks.units import format_size, parse_size

OVERLAY_DIR_ENV = "KLOSET_BLOCKS_OVERLAY_DIR"
DEFAULT_OVERLAY_DIR = Path("/var/tmp/kloset-blocks")
MIN_FREE_ENV = "KLOSET_BLOCKS_OVERLAY_MIN_FREE"
DEFAULT_MIN_FREE = 1 << 30
# Below this much free at the end of a failed run, the overlay's filesystem is taken to be full.
FULL_BELOW = 16 << 20


def overlay_dir() -> Path:
    """Where temporary overlays go (made 0700 if missing)."""
    d = Path(os.environ.get(OVERLAY_DIR_ENV) or DEFAULT_OVERLAY_DIR)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    return d


def min_free() -> int:
    raw = os.environ.get(MIN_FREE_ENV)
    if not raw:
        return DEFAULT_MIN_FREE
    try:
        return parse_size(raw)
    except UsageError:
        raise AttachError(f"overlay: {MIN_FREE_ENV}={raw!r} is not a size (e.g. 512M)") from None


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer could still use where `path` lives (statvfs f_bavail)."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def check_room(directory: Path) -> int:
    """Refuse (AttachError) when `directory` has less free than the minimum; returns the free bytes."""
    free = free_bytes(directory)
    need = min_free()
    if free < need:
        raise AttachError(
            f"overlay: {directory} has {format_size(free)} free, less than the {format_size(need)} an "
            f"overlay needs to start; free some room, or point {OVERLAY_DIR_ENV} (or --overlay) at a "
            f"filesystem with room (or set {MIN_FREE_ENV})"
        )
    return free


def full_message(overlay: Path | str, free_at_start: int | None) -> str | None:
    """If the filesystem holding the overlay is (nearly) full now: one line saying where the overlay
    lives and how much room it had at the start. None when there is room (the failure is another)."""
    overlay = Path(overlay)
    try:
        free = free_bytes(overlay.parent)
    except OSError:
        return None
    if free >= FULL_BELOW:
        return None
    had = f"; it had {format_size(free_at_start)} free at the start" if free_at_start is not None else ""
    where = _mount_of(overlay.parent)
    return (
        f"the disk holding the overlay is full: {overlay} lives on the filesystem mounted at {where} "
        f"({format_size(free)} free now{had}); writes failed there, not in the backup"
    )


def _mount_of(path: Path) -> str:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return str(path)
