# Teardown of a run directory, from the process that owns the chain or from any other (`kloset-blocks
# down`): every step undoes what the state record says was started, in reverse order of the phases,
# and also looks for what the record may have missed (loop devices on our FUSE file, processes whose
# command line names the run directory), so an interrupt at any instant leaves nothing behind.
#
# Invariants: every step is idempotent and tolerant of its phase never having happened; a failing
# step does not stop the later ones; one teardown at a time per run directory (a lock file), with
# SIGINT/SIGTERM/SIGHUP held off; the run directory is only removed when nothing is mounted under it.
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kloset_blocks.host.mounts import is_mounted, loops_on, mounts
from kloset_blocks.host.procs import proc_alive, processes_mentioning, stop_process
from kloset_blocks.host.progress import Progress
from kloset_blocks.host.rundir import RunDir, list_run_dirs
from kloset_blocks.host.signals import signals_blocked
from kloset_blocks.host.tools import AttachError, last_line, run_tool
from kloset_blocks.serving.nbdkit import STATS_FILE

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
        from kloset_blocks import postgres

        postgres.stop_recorded(run)


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
