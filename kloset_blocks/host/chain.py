# The attach chain: nbdkit export -> qcow2 overlay -> block device -> ext4 mount, and its teardown.
#
# Strategy: `Chain(nbdkit_argv).up()` runs four timed phases (serve, overlay, attach, mount), each
# recording what it started in the run directory's state.json before waiting on it; `teardown()`
# (also `with Chain(...)`, and `teardown_run_dir()` from another process for `kloset-blocks down`)
# undoes them in reverse. Every teardown step is idempotent and tolerant of its phase never having
# happened, and also looks for what the record may have missed (loop devices on our FUSE file,
# processes whose command line names the run directory), so an interrupt at any instant leaves
# nothing behind.
#
# Invariants:
# - nbdkit listens only on a Unix socket (0600, in a 0700 directory); it is always given -r: nothing
#   in this chain can write the backing. All writes land in the qcow2 overlay.
# - nbdkit and qemu-storage-daemon run in their own sessions with stdin on /dev/null, so a closing
#   terminal (SIGHUP) cannot stop them under a mounted filesystem (references §3.4).
# - A user-given overlay is never deleted; a temporary one lives and dies with the run directory.
# - The run directory is only removed when nothing is mounted under it.
from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kloset_blocks.host.mounts import is_mounted
from kloset_blocks.host.procs import child_pids, proc_record
from kloset_blocks.host.progress import Progress
from kloset_blocks.host.rundir import RunDir
from kloset_blocks.host.teardown import teardown_run_dir
from kloset_blocks.host.tools import AttachError, log_tail, run_tool

QCOW2_OPTIONS = "cluster_size=128k,extended_l2=on"


NBD_SOCKET = "nbd.sock"


FUSE_FILE = "disk.raw"


# In the nbdkit argv, this token stands for the run directory (made only when the chain comes up):
# the plugin's stats=FILE lives there, and is read back at teardown after nbdkit has written it.
RUN_DIR_TOKEN = "{run_dir}"


def nbd_uri(sock: Path) -> str:
    return f"nbd+unix:///?socket={sock}"


def child_env(extra: Mapping[str, str | None] | None) -> dict[str, str] | None:
    """This process's environment with `extra` applied (a None value unsets the variable), or None
    (inherit) when there is nothing to change."""
    if not extra:
        return None
    env = {**os.environ, **extra}
    return {k: v for k, v in env.items() if v is not None}


def nbdkit_command(argv: Sequence[str], sock: Path) -> list[str]:
    """Insert foreground (-f: the pid we hold is nbdkit's), read-only and the socket after argv[0]."""
    if not argv:
        raise AttachError("empty nbdkit command")
    extra = ["-U", str(sock)]
    for flag in ("-r", "-f"):
        if flag not in argv:
            extra.insert(0, flag)
    return [argv[0], *extra, *argv[1:]]


def free_nbd_device() -> str | None:
    """A /dev/nbdN with no server attached, where the nbd kernel module is loaded."""
    for d in sorted(Path("/sys/block").glob("nbd*"), key=lambda p: int(p.name[3:] or 0)):
        if not (d / "pid").exists() and Path(f"/dev/{d.name}").exists():
            return f"/dev/{d.name}"
    return None


def probe_nbd(sock: Path) -> bool:
    """True when nbdkit completes the start of a fixed-newstyle handshake. We then send NBD_OPT_ABORT
    so that nbdkit logs no error (a bare connect-and-close makes it log "Connection reset by peer")."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2.0)
    try:
        s.connect(str(sock))
        greeting = b""
        while len(greeting) < 18:
            chunk = s.recv(18 - len(greeting))
            if not chunk:
                return False
            greeting += chunk
        if greeting[:16] != b"NBDMAGICIHAVEOPT":
            return False
        # client flags: FIXED_NEWSTYLE | NO_ZEROES; then option NBD_OPT_ABORT (2), no data.
        s.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 2, 0))
        with contextlib.suppress(OSError):
            s.recv(32)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _escape_qemu(value: str) -> str:
    # QEMU's option syntax: a comma in a value is written as two commas.
    return value.replace(",", ",,")


# --- the chain -----------------------------------------------------------------------------------


class Chain:
    """nbdkit (given argv) -> qcow2 overlay -> block device -> ext4 mount, torn down in reverse.

    >>> with Chain(["nbdkit", "file", "file=/img"]) as c:   # doctest: +SKIP
    ...     print(c.mountpoint)
    """

    def __init__(
        self,
        nbdkit_argv: Sequence[str],
        *,
        env: Mapping[str, str | None] | None = None,
        mountpoint: Path | str | None = None,
        overlay: Path | str | None = None,
        run_root: Path | str | None = None,
        progress: Progress | None = None,
        timeout: float = 30.0,
        qcow2_options: str = QCOW2_OPTIONS,
        mount_options: str = "noatime",
        state: Mapping[str, Any] | None = None,
    ) -> None:
        self.nbdkit_argv = list(nbdkit_argv)
        self.extra_state = dict(state or {})  # recorded first (e.g. serve.Served.state())
        self.env = dict(env) if env is not None else None
        self.mountpoint_arg = Path(mountpoint).absolute() if mountpoint else None
        self.overlay_arg = Path(overlay).absolute() if overlay else None
        self.run_root = run_root
        self.progress = progress or Progress(quiet=True)
        self.timeout = timeout
        self.qcow2_options = qcow2_options
        self.mount_options = mount_options
        self.run: RunDir | None = None
        self.socket: Path | None = None
        self.overlay: Path | None = None
        self.device: str | None = None
        self.mountpoint: Path | None = None
        self._children: list[subprocess.Popen[bytes]] = []

    # context manager: `with Chain(...) as c:` brings it up and always tears it down
    def __enter__(self) -> Chain:
        return self.up() if self.run is None else self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    @property
    def uri(self) -> str:
        assert self.socket is not None
        return nbd_uri(self.socket)

    def up(self) -> Chain:
        self.run = RunDir.create(self.run_root)
        try:
            if self.extra_state:
                self.run.record(**self.extra_state)
            with self.progress.phase("serve"):
                self._serve()
            with self.progress.phase("overlay"):
                self._overlay()
            with self.progress.phase("attach"):
                self._attach()
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

    def _serve(self) -> None:
        run = self._run()
        sock = run.private_dir("nbd") / NBD_SOCKET
        self.socket = sock
        log_path = run.path / "nbdkit.log"
        argv = nbdkit_command([a.replace(RUN_DIR_TOKEN, str(run.path)) for a in self.nbdkit_argv], sock)
        run.record(socket=str(sock), nbdkit_log=str(log_path))
        # In the foreground nbdkit sets PR_SET_PDEATHSIG (measured on Debian's 1.32.5, with or
        # without --exit-with-parent): it gets SIGTERM when its parent exits. So its parent is a
        # keeper that lives exactly as long as it does, `setsid -w`, never this (short-lived) CLI.
        keeper = self._spawn(["setsid", "-w", *argv], log_path, "nbdkit", env=self.env)
        run.record(nbdkit_keeper=proc_record(keeper.pid))
        deadline = time.monotonic() + self.timeout
        nbdkit_pid = None
        while True:
            if keeper.poll() is not None:
                tail = log_tail(log_path) or f"exit status {keeper.returncode}"
                raise AttachError(f"serve: nbdkit exited: {tail}")
            if nbdkit_pid is None and (kids := child_pids(keeper.pid)):
                nbdkit_pid = kids[0]
                run.record(nbdkit=proc_record(nbdkit_pid))
            if nbdkit_pid is not None and sock.exists() and probe_nbd(sock):
                break
            if time.monotonic() > deadline:
                raise AttachError(f"serve: nbdkit did not accept on its socket within {self.timeout:.0f} s")
            time.sleep(0.005)
        os.chmod(sock, 0o600)

    def _overlay(self) -> None:
        run = self._run()
        uri = self.uri
        if self.overlay_arg is None:
            path, temp = run.path / "overlay.qcow2", True
        else:
            path, temp = self.overlay_arg, False
        run.record(overlay=str(path), overlay_temp=temp)
        self.overlay = path
        if not temp and path.exists():
            self._reuse_overlay(path, uri)
            return
        if not temp and not path.parent.is_dir():
            raise AttachError(f"overlay: directory {path.parent} does not exist")
        run_tool(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-o", self.qcow2_options, "-F", "raw", "-b", uri,
             str(path)],
            "overlay",
        )  # fmt: skip
        os.chmod(path, 0o600)

    def _reuse_overlay(self, path: Path, uri: str) -> None:
        import json

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
        proc = self._spawn(argv, log_path, "qemu-storage-daemon")
        run.record(qsd=proc_record(proc.pid))
        deadline = time.monotonic() + self.timeout
        while not is_mounted(fuse):
            if proc.poll() is not None:
                raise AttachError(f"attach: qemu-storage-daemon exited: {log_tail(log_path)}")
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

    def _spawn(
        self, argv: list[str], log_path: Path, what: str, env: Mapping[str, str | None] | None = None
    ) -> subprocess.Popen[bytes]:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=fd,
                start_new_session=True,  # no SIGHUP from a closing terminal, no Ctrl-C from ours
                umask=0o077,  # the socket and any file it makes: owner only
                env=child_env(env),
            )
        except FileNotFoundError as e:
            raise AttachError(f"{what} not found (run `make deps`)") from e
        finally:
            os.close(fd)
        self._children.append(proc)
        return proc
