# The attach chain with the exposed image file as the qcow2 overlay's backing instead of nbdkit:
# `kloset-blocks mount --backend fuse`, the fallback where nbdkit is not installed.
#
# Strategy: FuseChain is host.chain.Chain with one phase replaced. "serve" starts
# `kloset-blocks expose STORE SNAP RUN/image --no-run-dir` in its own session (stdin /dev/null,
# log in the run directory), records it as the run's fuse view, and waits for RUN/image to be
# mounted; the overlay then gets `-F raw -b RUN/image`. Overlay, attach (qemu-storage-daemon +
# loop), mount and teardown are Chain's own; host.teardown.teardown_run_dir stops the view (its hook)
# after qemu-storage-daemon, the view's only reader.
from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kloset_blocks.fuse.mount import STATE_KIND, STATE_MOUNT, STATE_PROC, is_mounted
from kloset_blocks.host.chain import Chain
from kloset_blocks.host.procs import proc_record
from kloset_blocks.host.progress import Progress
from kloset_blocks.host.signals import signals_unwind
from kloset_blocks.host.tools import AttachError, log_tail

IMAGE_FILE = "image"


def expose_argv(store: str, snapshot: str, path: str | None = None, owner: str | None = None) -> list[str]:
    """The expose command without its FILE argument (the chain adds it). No secret: the
    passphrase, if any, travels in $PLAKAR_PASSPHRASE."""
    argv = [sys.executable, "-m", "kloset_blocks", "expose", store, snapshot, "--no-run-dir"]
    if path:
        argv += ["--path", path]
    if owner:
        argv += ["--owner", owner]
    return argv


class FuseChain(Chain):
    """`expose` (given argv, without FILE) -> qcow2 overlay -> block device -> ext4 mount."""

    def __init__(self, expose: Sequence[str], **kw: Any) -> None:
        super().__init__(expose, **kw)
        self.backing: Path | None = None

    @property
    def uri(self) -> str:
        assert self.backing is not None
        return str(self.backing)

    def _serve(self) -> None:
        run = self._run()
        image = run.path / IMAGE_FILE
        log_path = run.path / "expose.log"
        run.record(**{STATE_MOUNT: str(image), STATE_KIND: "expose"})
        proc = self._spawn([*self.nbdkit_argv, str(image)], log_path, "kloset-blocks expose", env=self.env)
        run.record(**{STATE_PROC: proc_record(proc.pid)})
        deadline = time.monotonic() + self.timeout
        while not is_mounted(image):
            if proc.poll() is not None:
                tail = log_tail(log_path) or f"exit status {proc.returncode}"
                raise AttachError(f"serve: expose exited: {tail.removeprefix('kloset-blocks: ')}")
            if time.monotonic() > deadline:
                raise AttachError(f"serve: the image file was not exposed within {self.timeout:.0f} s")
            time.sleep(0.005)
        self.backing = image


def fuse_mount_session(
    store: str,
    snapshot: str,
    mountpoint: Path | str,
    *,
    path: str | None = None,
    owner: str | None = None,
    overlay: Path | str | None = None,
    progress: Progress | None = None,
    run_root: Path | str | None = None,
) -> FuseChain:
    """run.mount_session with the FUSE backend: bring the chain up and leave it running."""
    with signals_unwind():
        chain = FuseChain(
            expose_argv(store, snapshot, path, owner),
            mountpoint=mountpoint,
            overlay=overlay,
            progress=progress,
            run_root=run_root,
        )
        chain.up()
        return chain
