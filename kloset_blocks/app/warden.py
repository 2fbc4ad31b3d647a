# The warden: a small process that outlives a command only to tear down what the command started,
# when the command dies without doing it itself (SIGKILL, OOM killer, a crash). `psql`, `query` and
# the viewer start one; `pg start` and `mount` do not, since their chains outlive them by design.
#
# Strategy: the command starts `python -m kloset_blocks.app.warden PID STARTTIME ROOT [PATH...]`
# in a session of its own (no terminal signals reach it) with stdin on /dev/null and no secrets in
# its environment. The warden waits on a pidfd of the command (pidfd_open: woken the instant the
# command exits, however it exits; /proc polling where pidfds are missing). Then it tears down every
# run directory under ROOT whose state names the command as its owner (owner_pid and its start
# time, so a reused pid is never taken for the command), and removes the PATHs (the command's own
# temporary directories). A command that ends normally has torn everything down already: the
# warden finds nothing and exits; `Warden.close()` also stops it at once.
#
# Invariant: the warden only acts after its command is gone, and only on run directories the command
# owned, so a live command's chains and other commands' chains are never touched.
from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from kloset_blocks.host.procs import proc_record, proc_starttime, stop_process


class Warden:
    """The warden of this process's chains under `root` (see the module comment)."""

    def __init__(self, root: Path | str, paths: Sequence[Path | str] = ()) -> None:
        me = os.getpid()
        env = {k: v for k, v in os.environ.items() if k in _ENV_KEPT}
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
        argv = [str(me), str(proc_starttime(me) or 0), str(root), *map(str, paths)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kloset_blocks.app.warden", *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
            cwd="/",
        )
        self.record = proc_record(self.proc.pid)

    def close(self) -> None:
        """The command tore down itself: the warden has nothing left to do."""
        stop_process(self.record, timeout=2.0)
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=1.0)

    def __enter__(self) -> Warden:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# The warden needs PATH (umount, losetup, pg_ctl...) and the run root; never a passphrase or key.
_ENV_KEPT = ("PATH", "LANG", "LC_ALL", "KLOSET_BLOCKS_RUN_ROOT")


def wait_for_exit(pid: int, starttime: int) -> None:
    """Return once the process (pid, starttime) no longer runs."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        try:
            if proc_starttime(pid) == starttime:  # the pidfd is the command's, not a reused pid's
                select.select([fd], [], [])
        finally:
            os.close(fd)
        return
    while proc_starttime(pid) == starttime:
        time.sleep(0.2)


def owned_run_dirs(root: Path, pid: int, starttime: int) -> list[Path]:
    from kloset_blocks.host.rundir import RunDir, list_run_dirs

    found = []
    for d in list_run_dirs(root):
        st = RunDir.load(d).state
        if st.get("owner_pid") == pid and st.get("owner_starttime", starttime) == starttime:
            found.append(d)
    return found


def main(argv: Sequence[str]) -> int:
    pid, starttime, root, *paths = argv
    wait_for_exit(int(pid), int(starttime))
    from kloset_blocks.app.teardown import teardown_run_dir

    dirs = owned_run_dirs(Path(root), int(pid), int(starttime))
    for d in dirs:
        problems = teardown_run_dir(d)
        print(
            f"kloset-blocks: the command (pid {pid}) ended without tearing down; tore down {d.name}"
            + (f" ({len(problems)} problem(s))" if problems else ""),
            file=sys.stderr,
            flush=True,
        )
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
