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
import fcntl
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kloset_blocks.errors import KlosetError
from kloset_blocks.runtime import (
    Progress,
    RunDir,
    list_run_dirs,
    proc_alive,
    proc_record,
    processes_mentioning,
    signals_blocked,
    stop_process,
)

QCOW2_OPTIONS = "cluster_size=128k,extended_l2=on"
NBD_SOCKET = "nbd.sock"
FUSE_FILE = "disk.raw"
TOOL_TIMEOUT = 60.0
# In the nbdkit argv, this token stands for the run directory (made only when the chain comes up):
# the plugin's stats=FILE lives there, and is read back at teardown after nbdkit has written it.
RUN_DIR_TOKEN = "{run_dir}"
STATS_FILE = "nbdkit-stats.json"


class AttachError(KlosetError):
    """A phase of the attach chain failed (the message names the phase and the tool's own words)."""


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


# --- small tools ---------------------------------------------------------------------------------


def run_tool(argv: Sequence[str], what: str, *, timeout: float = TOOL_TIMEOUT) -> str:
    """Run a tool to completion; failure -> AttachError with its last stderr line."""
    try:
        p = subprocess.run(
            list(argv), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
        )
    except FileNotFoundError as e:
        raise AttachError(f"{what}: {argv[0]} not found (run `make deps`)") from e
    except subprocess.TimeoutExpired as e:
        raise AttachError(f"{what}: {argv[0]} did not finish within {timeout:.0f} s") from e
    if p.returncode != 0:
        raise AttachError(f"{what}: {last_line(p.stderr) or f'{argv[0]} exited with {p.returncode}'}")
    return p.stdout


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def log_tail(path: Path | str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            return last_line(f.read().decode(errors="replace"))
    except OSError:
        return ""


def mounts() -> list[tuple[str, str, str]]:
    """(source, target, fstype) of every mount, octal escapes (\\040 for a space...) decoded."""

    def unescape(s: str) -> str:
        return s.encode().decode("unicode_escape") if "\\" in s else s

    out = []
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                out.append((unescape(parts[0]), unescape(parts[1]), parts[2]))
    return out


def is_mounted(target: Path | str, source: str | None = None) -> bool:
    t = str(target)
    return any(tg == t and (source is None or src == source) for src, tg, _ in mounts())


def loops_on(path: Path | str) -> list[str]:
    """Loop devices whose backing file is `path` (from sysfs: no need for losetup's output format)."""
    found = []
    for d in Path("/sys/block").glob("loop*"):
        try:
            backing = (d / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        if backing == str(path):
            found.append(f"/dev/{d.name}")
    return found


def child_pids(pid: int) -> list[int]:
    """Direct children of pid, from /proc (no procps needed)."""
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


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


# --- teardown (also from another process) --------------------------------------------------------


def teardown_run_dir(path: Path | str, progress: Progress | None = None) -> list[str]:
    """Undo everything recorded in (or discoverable from) one run directory, in reverse order.

    Each step runs whatever happened before; problems are collected, reported, and returned."""
    path = Path(path)
    progress = progress or Progress(quiet=True)
    problems: list[str] = []
    if not path.is_dir():
        return problems
    t0 = time.monotonic()
    with signals_blocked(), _locked(path):
        run = RunDir.load(path)
        st: dict[str, Any] = run.state
        # Counters are only complete if nbdkit is still running, to be stopped (and write them) now.
        served_to_the_end = proc_alive(st.get("nbdkit"))
        steps = [
            ("postgres", lambda: _stop_postgres(run)),
            ("umount", lambda: _umount(st)),
            ("loop", lambda: _detach_loops(st)),
            ("nbd device", lambda: _disconnect_nbd(st)),
            ("qemu-storage-daemon", lambda: _stop_qsd(st)),
            ("nbdkit", lambda: _stop_nbdkit(st)),
            ("fetch report", lambda: served_to_the_end and _report_fetched(path, st, progress)),
            ("fuse view", lambda: _stop_fuse_view(st)),  # hook: kloset_blocks.fuse (issue 7)
            ("stray processes", lambda: _sweep(path)),
            ("files", lambda: _remove_files(path, st)),
        ]
        for name, step in steps:
            try:
                step()
            except Exception as e:  # keep going: a later step may still free something
                problems.append(f"{name}: {e}")
    for p in problems:
        print(f"kloset-blocks: teardown {path.name}: {p}", file=sys.stderr, flush=True)
    progress.done("teardown", time.monotonic() - t0)
    return problems


def teardown_all(root: Path | str | None = None, progress: Progress | None = None) -> tuple[int, list[str]]:
    """`kloset-blocks down`: every run directory under the root. Returns (count, problems)."""
    problems: list[str] = []
    dirs = list_run_dirs(root)
    for d in dirs:
        problems += teardown_run_dir(d, progress)
    return len(dirs), problems


@contextlib.contextmanager
def _locked(path: Path):  # type: ignore[no-untyped-def]
    # One teardown at a time per run directory (the owner and a `down` may race). The lock file
    # lives beside the run directory's contents and goes with it.
    try:
        fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --- hook for the FUSE views (issue 7; owned by kloset_blocks/fuse) ---------------------------------
def _stop_fuse_view(st: dict[str, Any]) -> None:
    """A pyfuse3 view recorded here (`expose`/`browse`, or the image file behind `mount --backend
    fuse`): stop it (it unmounts itself) and detach its mount if it is still there."""
    if "fuse_view" in st or "fuse_view_mount" in st:
        from kloset_blocks.fuse.mount import stop_recorded_view

        stop_recorded_view(st)


def _stop_postgres(run: RunDir) -> None:
    if "postgres" in run.state:
        from kloset_blocks import pg

        pg.stop_recorded(run)


def _umount(st: dict[str, Any]) -> None:
    mnt, src = st.get("mountpoint"), st.get("mount_source")
    if not mnt or not src or not is_mounted(mnt, src):
        return
    last = ""
    for attempt in range(10):
        p = subprocess.run(["umount", mnt], capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if p.returncode == 0 or not is_mounted(mnt, src):
            return
        last = last_line(p.stderr)
        time.sleep(0.05 * (attempt + 1))
    # Busy (a shell inside it?): detach it from the tree now; the kernel frees it when released.
    subprocess.run(["umount", "-l", mnt], capture_output=True, stdin=subprocess.DEVNULL)
    if is_mounted(mnt, src):
        raise AttachError(f"cannot unmount {mnt}: {last}")
    raise AttachError(f"{mnt} was busy ({last}); unmounted lazily")


def _detach_loops(st: dict[str, Any]) -> None:
    fuse = st.get("fuse")
    loops = set(loops_on(fuse)) if fuse else set()
    rec = st.get("loop")
    if rec and fuse and rec in loops_on(fuse):
        loops.add(rec)
    for dev in sorted(loops):
        subprocess.run(["losetup", "-d", dev], capture_output=True, stdin=subprocess.DEVNULL)
    # losetup -d on a device still in use only sets autoclear; wait briefly for it to go.
    deadline = time.monotonic() + 5.0
    while fuse and loops_on(fuse) and time.monotonic() < deadline:
        time.sleep(0.02)
    if fuse and loops_on(fuse):
        raise AttachError(f"loop device(s) still attached to {fuse}: {' '.join(loops_on(fuse))}")


def _disconnect_nbd(st: dict[str, Any]) -> None:
    dev = st.get("nbd_device")
    if dev and Path(f"/sys/block/{Path(dev).name}/pid").exists():
        run_tool(["qemu-nbd", "--disconnect", dev], "nbd disconnect")


def _stop_nbdkit(st: dict[str, Any]) -> None:
    stop_process(st.get("nbdkit"))
    stop_process(st.get("nbdkit_keeper"))  # exits with its child; a signal if it has not yet


def _report_fetched(path: Path, st: dict[str, Any], progress: Progress) -> None:
    """The plugin's counters, written by nbdkit as it exited: bytes read from the store against the
    snapshot's size. Absent or stale (nbdkit was killed: the file may hold the counters of an earlier
    client's close), or a stand-in served: nothing to say."""
    served = st.get("served")
    if not served:
        return
    import json

    try:
        stats = json.loads((path / served.get("stats", STATS_FILE)).read_text())
    except (OSError, ValueError):
        return
    if "store_bytes_read" in stats:
        progress.fetched(int(stats["store_bytes_read"]), int(served.get("logical_size") or 0))


def _stop_qsd(st: dict[str, Any]) -> None:
    stop_process(st.get("qsd"))
    fuse = st.get("fuse")
    if fuse and is_mounted(fuse):
        # A killed daemon leaves its FUSE mount behind ("Transport endpoint is not connected").
        subprocess.run(["umount", "-l", fuse], capture_output=True, stdin=subprocess.DEVNULL)


def _sweep(path: Path) -> None:
    for rec in processes_mentioning(str(path) + "/"):
        stop_process(rec)


def _remove_files(path: Path, st: dict[str, Any]) -> None:
    still = [tg for _, tg, _ in mounts() if tg == str(path) or tg.startswith(str(path) + "/")]
    if still:
        raise AttachError(f"not removing {path}: still mounted: {' '.join(still)}")
    if any(proc_alive(st.get(k)) for k in ("nbdkit", "nbdkit_keeper", "qsd")):
        raise AttachError(f"not removing {path}: a recorded process is still alive")
    # A temporary overlay lives inside the run directory and goes with it; a kept one is elsewhere.
    shutil.rmtree(path)
