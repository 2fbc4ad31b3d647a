# Processes we started, identified so that a pid is only signalled while it is still the same
# process: a record is (pid, start time from /proc/PID/stat), and pids are reused. /proc only: no
# procps needed.
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from kloset_blocks.host.tools import AttachError, clean_env

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


def child_pids(pid: int) -> list[int]:
    """Direct children of pid, from /proc (no procps needed)."""
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def child_env(extra: Mapping[str, str | None] | None) -> dict[str, str]:
    """This process's environment without the store's secrets, with `extra` applied (a None value
    unsets the variable): nbdkit gets the key through `extra`, nothing else gets any secret."""
    return clean_env(extra)


def spawn(
    argv: list[str], log_path: Path, what: str, env: Mapping[str, str | None] | None = None
) -> subprocess.Popen[bytes]:
    """A daemon of a chain: its own session (no SIGHUP from a closing terminal, no Ctrl-C from
    ours), stdin /dev/null, stdout and stderr appended to log_path (0600), umask 077 (the socket and
    any file it makes: owner only)."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            start_new_session=True,
            umask=0o077,
            env=child_env(env),
        )
    except FileNotFoundError as e:
        raise AttachError(f"{what} not found (run `make deps`)") from e
    finally:
        os.close(fd)
