# The FUSE backing: the image file `kloset-blocks expose` makes, as the qcow2 overlay's backing
# instead of nbdkit (`kloset-blocks mount --backend fuse`, the fallback where nbdkit is not
# installed).
#
# Strategy: ExposedImage.start runs `kloset-blocks expose STORE SNAP RUN/image --no-run-dir` in its
# own session (stdin /dev/null, log in the run directory), records it as the run's fuse view, and
# waits for RUN/image to be mounted; the overlay then gets `-F raw -b RUN/image`. Overlay, attach
# (qemu-storage-daemon + loop), mount and teardown are host.chain.Chain's own; the view's teardown
# step (fuse/mount.py) runs after qemu-storage-daemon, the view's only reader, is stopped.
#
# Invariants: no secret in the view's argv: an encrypted store's key, derived and checked by the
# caller, goes in its environment (KEY_ENV) with --key-from-env, so that only this child uses it.
from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence

from kloset_blocks.fuse.record import STATE_KIND, STATE_MOUNT, STATE_PROC
from kloset_blocks.host.mounts import is_mounted
from kloset_blocks.host.procs import proc_record, spawn
from kloset_blocks.host.rundir import RunDir
from kloset_blocks.host.tools import AttachError, log_tail
from kloset_blocks.store.passphrase import KEY_ENV

IMAGE_FILE = "image"


def expose_argv(
    store: str, snapshot: str, path: str | None = None, owner: str | None = None, journal: bool = False
) -> list[str]:
    """The expose command without its FILE argument (ExposedImage adds it)."""
    argv = [sys.executable, "-m", "kloset_blocks", "expose", store, snapshot, "--no-run-dir"]
    if journal:
        argv.append("--journal")  # the overlay is kept: the filesystem must survive a crash
    if path:
        argv += ["--path", path]
    if owner:
        argv += ["--owner", owner]
    return argv


class ExposedImage:
    """A Backing: `expose` (given argv, without FILE) serving the image as a file of the run directory."""

    def __init__(self, expose: Sequence[str], key: bytes | None = None) -> None:
        self.argv = list(expose)
        self.env: Mapping[str, str | None] = {KEY_ENV: key.hex()} if key is not None else {}
        if key is not None:
            self.argv.append("--key-from-env")

    def __repr__(self) -> str:  # the environment may hold the store's key: never shown
        return f"ExposedImage({self.argv!r})"

    def start(self, run: RunDir, timeout: float) -> str:
        image = run.path / IMAGE_FILE
        log_path = run.path / "expose.log"
        run.record(**{STATE_MOUNT: str(image), STATE_KIND: "expose"})
        proc = spawn([*self.argv, str(image)], log_path, "kloset-blocks expose", env=self.env)
        run.record(**{STATE_PROC: proc_record(proc.pid)})
        deadline = time.monotonic() + timeout
        while not is_mounted(image):
            if proc.poll() is not None:
                tail = log_tail(log_path) or f"exit status {proc.returncode}"
                raise AttachError(f"serve: expose exited: {tail.removeprefix('kloset-blocks: ')}")
            if time.monotonic() > deadline:
                raise AttachError(f"serve: the image file was not exposed within {timeout:.0f} s")
            time.sleep(0.005)
        return str(image)
