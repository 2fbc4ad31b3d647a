# The attach chain: a backing (host/backing.py: an nbdkit export, or an image file) -> qcow2 overlay
# -> block device -> ext4 mount, and its teardown.
#
# Strategy: `Chain(backing).up()` runs four timed phases (serve, overlay, attach, mount), each
# recording what it started in the run directory's state.json before waiting on it; `teardown()`
# (also `with Chain(...)`, and host.teardown.teardown_run_dir() from another process for
# `kloset-blocks down`) undoes them in reverse, every step idempotent and tolerant of its phase never
# having happened.
#
# Invariants:
# - The backing is only ever read (nbdkit -r); all writes land in the qcow2 overlay.
# - qemu-storage-daemon runs in its own session with stdin on /dev/null, so a closing terminal
#   (SIGHUP) cannot stop it under a mounted filesystem (references §3.4).
# - A user-given overlay is never deleted; a temporary one lives and dies with the run directory
#   (it lives in host.space.overlay_dir(), on a disk with room, and the start refuses below a
#   minimum free there).
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kloset_blocks.host.backing import Backing
from kloset_blocks.host.fsck import check_kept_overlay
from kloset_blocks.host.mounts import is_mounted
from kloset_blocks.host.procs import proc_record, spawn
from kloset_blocks.host.progress import Progress
from kloset_blocks.host.rundir import RunDir
from kloset_blocks.host.space import check_room, overlay_dir
from kloset_blocks.host.teardown import teardown_run_dir
from kloset_blocks.host.tools import AttachError, exit_cause, run_tool

QCOW2_OPTIONS = "cluster_size=128k,extended_l2=on"
FUSE_FILE = "disk.raw"


def free_nbd_device() -> str | None:
    """A /dev/nbdN with no server attached, where the nbd kernel module is loaded."""
    for d in sorted(Path("/sys/block").glob("nbd*"), key=lambda p: int(p.name[3:] or 0)):
        if not (d / "pid").exists() and Path(f"/dev/{d.name}").exists():
            return f"/dev/{d.name}"
    return None


def _escape_qemu(value: str) -> str:
    # QEMU's option syntax: a comma in a value is written as two commas.
    return value.replace(",", ",,")


class Chain:
    """backing -> qcow2 overlay -> block device -> ext4 mount, torn down in reverse.

    >>> with Chain(NbdkitBacking(["nbdkit", "file", "file=/img"])) as c:   # doctest: +SKIP
    ...     print(c.mountpoint)
    """

    def __init__(
        self,
        backing: Backing,
        *,
        mountpoint: Path | str | None = None,
        overlay: Path | str | None = None,
        run_root: Path | str | None = None,
        progress: Progress | None = None,
        timeout: float = 30.0,
        qcow2_options: str = QCOW2_OPTIONS,
        mount_options: str = "noatime,nosuid,nodev,noexec",  # a backup is untrusted input
        state: Mapping[str, Any] | None = None,
    ) -> None:
        self.backing = backing
        self.extra_state = dict(state or {})  # recorded first (e.g. app.check.Served.state())
        self.mountpoint_arg = Path(mountpoint).absolute() if mountpoint else None
        self.overlay_arg = Path(overlay).absolute() if overlay else None
        self.run_root = run_root
        self.progress = progress or Progress(quiet=True)
        self.timeout = timeout
        self.qcow2_options = qcow2_options
        self.mount_options = mount_options
        self.run: RunDir | None = None
        self.backing_name: str | None = None  # what qemu-img opens: an NBD URI or a file
        self.overlay: Path | None = None
        self.device: str | None = None
        self.mountpoint: Path | None = None
        self.reused_overlay = False  # a kept overlay from an earlier run: checked before the mount
        self._children: list[subprocess.Popen[bytes]] = []

    # context manager: `with Chain(...) as c:` brings it up and always tears it down
    def __enter__(self) -> Chain:
        return self.up() if self.run is None else self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def up(self) -> Chain:
        self.run = RunDir.create(self.run_root)
        try:
            if self.extra_state:
                self.run.record(**self.extra_state)
            self._overlay_place()  # before anything starts: refuses a place without room
            with self.progress.phase("serve"):
                self.backing_name = self.backing.start(self.run, self.timeout)
            with self.progress.phase("overlay"):
                self._overlay()
            with self.progress.phase("attach"):
                self._attach()
            if self.reused_overlay:  # an earlier run may have ended in a crash or a full disk
                with self.progress.phase("fsck"):
                    assert self.device is not None and self.overlay is not None
                    check_kept_overlay(self.device, self.overlay, self.progress)
            with self.progress.phase("mount"):
                self._mount()
        except BaseException:
            self.teardown()
            raise
        return self

    def teardown(self) -> list[str]:
        """Idempotent. Returns the problems met (each already reported on stderr)."""
        if self.run is None:
            return []
        problems = teardown_run_dir(self.run.path, self.progress)
        for p in self._children:  # reap our own children so no zombie outlives the chain
            with contextlib.suppress(Exception):
                p.wait(timeout=0.1)
        return problems

    # --- phases ----------------------------------------------------------------------------------

    def _overlay_place(self) -> None:
        run = self._run()
        if self.overlay_arg is None:  # on a disk with room, not in the run directory (a tmpfs)
            path, temp = overlay_dir() / f"{run.id}.qcow2", True
        else:
            path, temp = self.overlay_arg, False
        if not temp and not path.parent.is_dir():
            raise AttachError(f"overlay: directory {path.parent} does not exist")
        free = check_room(path.parent)  # refuses below the minimum
        run.record(overlay=str(path), overlay_temp=temp, overlay_free_at_start=free)
        self.overlay = path

    def _overlay(self) -> None:
        uri = self._uri()
        assert self.overlay is not None
        path, temp = self.overlay, self.overlay_arg is None
        if not temp and path.exists():
            self._reuse_overlay(path, uri)
            self.reused_overlay = True
            return
        run_tool(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", self.qcow2_options, "-F", "raw", "-b", uri,
             str(path)],
            "overlay",
        )  # fmt: skip
        os.chmod(path, 0o600)

    def _reuse_overlay(self, path: Path, uri: str) -> None:
        info = json.loads(run_tool(["qemu-img", "info", "-U", "--output=json", str(path)], "overlay (reuse)"))
        if info.get("format") != "qcow2":
            raise AttachError(f"overlay: {path} is {info.get('format')}, not qcow2")
        if info.get("backing-filename") != uri:
            # The overlay records its backing's absolute socket URI; ours is new every run.
            run_tool(["qemu-img", "rebase", "-u", "-F", "raw", "-b", uri, str(path)], "overlay (rebase)")

    def _attach(self) -> None:
        run = self._run()
        assert self.overlay is not None
        nbd = free_nbd_device()
        if nbd is not None:
            run.record(nbd_device=nbd)
            run_tool(["qemu-nbd", "--connect", nbd, "-f", "qcow2", str(self.overlay)], "attach")
            self.device = nbd
            return
        fuse = run.path / FUSE_FILE
        fuse.touch(mode=0o600)  # qemu-storage-daemon's FUSE mountpoint must be a regular file
        log_path = run.path / "qsd.log"
        run.record(fuse=str(fuse), qsd_log=str(log_path))
        argv = [
            "qemu-storage-daemon",
            "--blockdev", f"driver=file,node-name=f0,filename={_escape_qemu(str(self.overlay))}",
            "--blockdev", "driver=qcow2,node-name=ov,file=f0",
            "--export", f"type=fuse,id=e0,node-name=ov,mountpoint={_escape_qemu(str(fuse))},writable=on",
            "--pidfile", str(run.path / "qsd.pid"),
        ]  # fmt: skip
        proc = spawn(argv, log_path, "qemu-storage-daemon")
        self._children.append(proc)
        run.record(qsd=proc_record(proc.pid))
        deadline = time.monotonic() + self.timeout
        while not is_mounted(fuse):
            if proc.poll() is not None:
                cause = exit_cause(proc.returncode, log_path, "qemu-storage-daemon")
                raise AttachError(f"attach: qemu-storage-daemon exited: {cause}")
            if time.monotonic() > deadline:
                raise AttachError(f"attach: qemu-storage-daemon did not export within {self.timeout:.0f} s")
            time.sleep(0.005)
        loop = run_tool(["losetup", "-f", "--show", str(fuse)], "attach (losetup)").strip()
        run.record(loop=loop)
        self.device = loop

    def _mount(self) -> None:
        run = self._run()
        assert self.device is not None
        if self.mountpoint_arg is None:
            mnt, temp = run.path / "mnt", True
            mnt.mkdir(mode=0o711, exist_ok=True)
        else:
            mnt, temp = self.mountpoint_arg, False
            if not mnt.is_dir():
                raise AttachError(f"mount: mountpoint {mnt} is not a directory")
            if os.path.ismount(mnt):
                raise AttachError(f"mount: {mnt} is already a mountpoint")
        run.record(mountpoint=str(mnt), mountpoint_temp=temp, mount_source=self.device)
        opts = ["-o", self.mount_options] if self.mount_options else []
        run_tool(["mount", "-t", "ext4", *opts, self.device, str(mnt)], "mount")
        self.mountpoint = mnt

    # --- helpers ---------------------------------------------------------------------------------

    def _run(self) -> RunDir:
        assert self.run is not None, "Chain.up() first"
        return self.run

    def _uri(self) -> str:
        assert self.backing_name is not None, "the serve phase first"
        return self.backing_name
