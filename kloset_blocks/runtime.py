# Run directories, process bookkeeping, signals and progress for the attach chain.
#
# Strategy: every chain owns one run directory, <root>/<id>/ (root: /run/kloset-blocks, or
# $KLOSET_BLOCKS_RUN_ROOT). Its state.json records every resource the moment it exists (pids with
# their /proc start times, loop device, mountpoint, socket, overlay, temporary flag, Postgres), so a
# later `kloset-blocks down` in another process can tear down exactly what was started, and nothing
# else: a pid is only signalled while its start time still matches (pids are reused).
#
# Invariants:
# - The run directory is 0711: other users may traverse it (the postgres user must reach its own
#   0700 subdirectory and the mount under it) but not list it; everything private inside it lives in
#   0700 subdirectories or 0600 files.
# - state.json is replaced atomically (write + rename), so a reader never sees half a record.
# - Teardown blocks SIGINT/SIGTERM/SIGHUP so a second Ctrl-C cannot leave half a chain behind.
from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RUN_ROOT_ENV = "KLOSET_BLOCKS_RUN_ROOT"
DEFAULT_RUN_ROOT = Path("/run/kloset-blocks")
STATE_FILE = "state.json"
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: unwinds like Ctrl-C so every `with`/`finally` tears down."""


def run_root(root: Path | str | None = None) -> Path:
    return Path(root or os.environ.get(RUN_ROOT_ENV) or DEFAULT_RUN_ROOT)


class RunDir:
    """One chain's private directory and its state record."""

    def __init__(self, path: Path, state: dict[str, Any]) -> None:
        self.path = path
        self.state = state

    @classmethod
    def create(cls, root: Path | str | None = None) -> RunDir:
        base = run_root(root)
        base.mkdir(parents=True, exist_ok=True)
        os.chmod(base, 0o711)
        ident = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
        path = base / ident
        path.mkdir(mode=0o711)
        os.chmod(path, 0o711)  # mkdir's mode is filtered by the umask
        run = cls(path, {"id": ident, "created": time.time(), "owner_pid": os.getpid()})
        run.save()
        return run

    @classmethod
    def load(cls, path: Path) -> RunDir:
        try:
            state = json.loads((path / STATE_FILE).read_text())
        except (OSError, ValueError):
            state = {"id": path.name}
        return cls(path, state)

    @property
    def id(self) -> str:
        return str(self.state.get("id", self.path.name))

    def private_dir(self, name: str, uid: int = 0, gid: int = 0) -> Path:
        """A 0700 subdirectory owned by uid:gid (e.g. the postgres user's socket and log directory)."""
        d = self.path / name
        d.mkdir(mode=0o700, exist_ok=True)
        os.chown(d, uid, gid)
        os.chmod(d, 0o700)
        return d

    def record(self, **fields: Any) -> None:
        self.state.update(fields)
        self.save()

    def forget(self, *names: str) -> None:
        for name in names:
            self.state.pop(name, None)
        self.save()

    def save(self) -> None:
        if not self.path.is_dir():
            return
        tmp = self.path / (STATE_FILE + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self.state, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path / STATE_FILE)


def list_run_dirs(root: Path | str | None = None) -> list[Path]:
    base = run_root(root)
    if not base.is_dir():
        return []
    return sorted(p for p in base.iterdir() if p.is_dir() and not p.is_symlink())


# --- processes -----------------------------------------------------------------------------------


def proc_starttime(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks), or None if the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None  # a zombie has exited; only its parent's wait() remains
    return int(fields[19])


def proc_record(pid: int) -> dict[str, int]:
    return {"pid": pid, "starttime": proc_starttime(pid) or 0}


def proc_alive(rec: dict[str, int] | None) -> bool:
    if not rec or not rec.get("pid"):
        return False
    st = proc_starttime(int(rec["pid"]))
    return st is not None and (not rec.get("starttime") or st == rec["starttime"])


def wait_gone(rec: dict[str, int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while proc_alive(rec):
        _reap(rec["pid"])
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    _reap(rec["pid"])
    return True


def _reap(pid: int) -> None:
    # Our own children become zombies until waited for; other processes' children are not ours.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def stop_process(rec: dict[str, int] | None, *, sig: int = signal.SIGTERM, timeout: float = 5.0) -> None:
    """Signal a recorded process, wait, then SIGKILL. A process that is gone (or a reused pid) is left."""
    if not proc_alive(rec):
        return
    assert rec is not None
    with contextlib.suppress(ProcessLookupError):
        os.kill(rec["pid"], sig)
    if wait_gone(rec, timeout):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(rec["pid"], signal.SIGKILL)
    wait_gone(rec, 5.0)


def processes_mentioning(text: str) -> list[dict[str, int]]:
    """Processes whose command line contains `text` (a run directory path): the safety net for a
    process started in the instant before it could be recorded. Never ourselves or our ancestors."""
    mine = set()
    pid = os.getpid()
    while pid > 1:
        mine.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    found = []
    needle = text.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline:
            rec = proc_record(int(entry.name))
            if rec["starttime"]:
                found.append(rec)
    return found


# --- signals -------------------------------------------------------------------------------------


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signal.Signals(signum).name)


@contextlib.contextmanager
def signals_unwind() -> Iterator[None]:
    """SIGTERM and SIGHUP raise Terminated (a KeyboardInterrupt) in the main thread while inside."""
    if not _is_main_thread():
        yield
        return
    old = {s: signal.signal(s, _raise_terminated) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Hold off SIGINT/SIGTERM/SIGHUP (delivered after) while a teardown runs."""
    if not _is_main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """While an interactive child (psql) owns the terminal, Ctrl-C is its business, not ours."""
    if not _is_main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# --- progress ------------------------------------------------------------------------------------


class Progress:
    """Phase timings for a human on stderr ("serve 0.12 s"); quiet=True silences, times are kept."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.times: dict[str, float] = {}
        self.fetched_bytes: int | None = None  # from the store, set at teardown (nbdkit's counters)
        self.logical_size: int | None = None

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        yield
        self.done(name, time.monotonic() - t0)

    def done(self, name: str, seconds: float) -> None:
        self.times[name] = seconds
        self.say(f"{name} {seconds:.2f} s")

    def fetched(self, fetched: int, size: int) -> None:
        from kloset_blocks.units import format_size

        self.fetched_bytes, self.logical_size = fetched, size
        share = f" ({100 * fetched / size:.1f} %)" if size else ""
        self.say(f"fetched {format_size(fetched)} of {format_size(size)}{share} from the store")

    def say(self, line: str) -> None:
        if not self.quiet:
            print(line, file=sys.stderr, flush=True)
