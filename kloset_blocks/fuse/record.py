# What a FUSE view leaves in a run directory's record, and its teardown: kept apart from the views
# themselves (mount.py, which needs pyfuse3 and trio) so that a teardown in any process (`kloset-blocks
# down`) registers this step without loading them.
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from kloset_blocks.errors import KlosetError
from kloset_blocks.host.mounts import is_mounted
from kloset_blocks.host.procs import stop_process
from kloset_blocks.host.teardown import BACKING, Teardown, register_teardown

# Keys of the run directory's state.json (see kloset_blocks.host.teardown.teardown_run_dir).
STATE_PROC = "fuse_view"
STATE_MOUNT = "fuse_view_mount"
STATE_KIND = "fuse_view_kind"


class FuseViewError(KlosetError):
    """A FUSE view could not be mounted or served."""


def unmount_lazily(path: Path | str) -> None:
    """A view that died leaves "Transport endpoint is not connected" behind: detach it."""
    if is_mounted(path):
        argv = ["umount", "-l", str(path)] if os.geteuid() == 0 else ["fusermount3", "-u", "-z", str(path)]
        subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL, check=False)


def stop_recorded_view(t: Teardown) -> None:
    """Stop the view a run directory records (SIGTERM: it unmounts itself), then detach the mount
    if it is still there (the view was killed or hung). A view is the backing of `mount --backend
    fuse` (qemu-storage-daemon, its only reader, is stopped before) or stands alone."""
    state = t.state
    rec = state.get(STATE_PROC)
    mnt = state.get(STATE_MOUNT)
    if rec:
        stop_process(rec, timeout=10.0)
    if mnt:
        deadline = time.monotonic() + 2.0
        while is_mounted(mnt) and time.monotonic() < deadline and rec:
            time.sleep(0.02)
        unmount_lazily(mnt)
        if is_mounted(mnt):
            raise FuseViewError(f"cannot unmount {mnt}")


register_teardown(BACKING, "fuse view", stop_recorded_view)
