# Teardown of a run directory, from the process that owns the chain or from any other (`kloset-blocks
# down`): every step undoes what the state record says was started, in reverse order of the phases,
# and also looks for what the record may have missed (loop devices on our FUSE file, processes whose
# command line names the run directory), so an interrupt at any instant leaves nothing behind.
#
# Invariants: every step is idempotent and tolerant of its phase never having happened; a failing
# step does not stop the later ones; one teardown at a time per run directory (a lock file), with
# SIGINT/SIGTERM/SIGHUP held off; the run directory is only removed when nothing is mounted under it.
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kloset_blocks.host.mounts import is_mounted, loops_on, mounts
from kloset_blocks.host.procs import proc_alive, processes_mentioning, stop_process
from kloset_blocks.host.progress import Progress
from kloset_blocks.host.rundir import LOCK_FILE, RunDir, list_run_dirs, locked
from kloset_blocks.host.signals import signals_blocked
from kloset_blocks.host.tools import AttachError, last_line, run_tool

# Steps registered by the layers that start things (register_teardown), run at their stage:
USERS = "users"  # processes using the mounted filesystem (Postgres): stopped before the unmount
BACKING = "backing"  # what serves the overlay's backing (nbdkit, a FUSE image file): after detach
REPORT = "report"  # what reads the results of the stopped backing (its counters)
_STAGES = (USERS, BACKING, REPORT)


@dataclass
class Teardown:
    """What a step sees: the run directory, its record, and which recorded processes were alive
    when the teardown began (a counter file is complete only if its writer was stopped just now)."""

    run: RunDir
    progress: Progress
    alive_at_start: frozenset[str]

    @property
    def path(self) -> Path:
        return self.run.path

    @property
    def state(self) -> dict[str, Any]:
        return self.run.state


Step = Callable[[Teardown], object]
_registered: dict[str, list[tuple[str, Step]]] = {stage: [] for stage in _STAGES}


def register_teardown(stage: str, name: str, step: Step) -> None:
    """Run `step` in every teardown, at `stage`; by name, so a module imported twice registers once."""
    steps = _registered[stage]
    steps[:] = [(n, s) for n, s in steps if n != name] + [(name, step)]


def teardown_run_dir(path: Path | str, progress: Progress | None = None) -> list[str]:
    """Undo everything recorded in (or discoverable from) one run directory, in reverse order.

    Each step runs whatever happened before; problems are collected, reported, and returned."""
    path = Path(path)
    progress = progress or Progress(quiet=True)
    problems: list[str] = []
    if not path.is_dir():
        return problems
    t0 = time.monotonic()
    with signals_blocked(), locked(path / LOCK_FILE):
        if not path.is_dir():
            return problems  # another teardown (its owner's thread, a `down`) finished it meanwhile
        run = RunDir.load(path)
        alive = frozenset(
            k for k, v in run.state.items() if isinstance(v, dict) and "pid" in v and proc_alive(v)
        )
        t = Teardown(run, progress, alive)
        steps: list[tuple[str, Step]] = [
            *_registered[USERS],
            ("umount", _umount),
            ("loop", _detach_loops),
            ("nbd device", _disconnect_nbd),
            ("qemu-storage-daemon", _stop_qsd),
            *_registered[BACKING],
            *_registered[REPORT],
            ("stray processes", _sweep),
            ("files", _remove_files),
        ]
        for name, step in steps:
            try:
                step(t)
            except Exception as e:  # keep going: a later step may still free something
                problems.append(f"{name}: {e}")
    for p in problems:
        print(f"kloset-blocks: teardown {path.name}: {p}", file=sys.stderr, flush=True)
    progress.done("teardown", time.monotonic() - t0)
    return problems


def _is_live_record(value: object) -> bool:
    return isinstance(value, dict) and "pid" in value and proc_alive(value)


def teardown_all(root: Path | str | None = None, progress: Progress | None = None) -> tuple[int, list[str]]:
    """`kloset-blocks down`: every run directory under the root. Returns (count, problems)."""
    problems: list[str] = []
    dirs = list_run_dirs(root)
    for d in dirs:
        problems += teardown_run_dir(d, progress)
    return len(dirs), problems


def _umount(t: Teardown) -> None:
    st = t.state
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


def _detach_loops(t: Teardown) -> None:
    st = t.state
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


def _disconnect_nbd(t: Teardown) -> None:
    dev = t.state.get("nbd_device")
    if dev and Path(f"/sys/block/{Path(dev).name}/pid").exists():
        run_tool(["qemu-nbd", "--disconnect", dev], "nbd disconnect")


def _stop_qsd(t: Teardown) -> None:
    stop_process(t.state.get("qsd"))
    fuse = t.state.get("fuse")
    if fuse and is_mounted(fuse):
        # A killed daemon leaves its FUSE mount behind ("Transport endpoint is not connected").
        subprocess.run(["umount", "-l", fuse], capture_output=True, stdin=subprocess.DEVNULL)


def _sweep(t: Teardown) -> None:
    for rec in processes_mentioning(str(t.path) + "/"):
        stop_process(rec)


def _remove_files(t: Teardown) -> None:
    path, st = t.path, t.state
    still = [tg for _, tg, _ in mounts() if tg == str(path) or tg.startswith(str(path) + "/")]
    if still:
        raise AttachError(f"not removing {path}: still mounted: {' '.join(still)}")
    if any(proc_alive(st.get(k)) for k in ("nbdkit", "nbdkit_keeper", "qsd")):
        raise AttachError(f"not removing {path}: a recorded process is still alive")
    # A temporary overlay goes with its run (it lives in the overlay directory, host/space.py, or in
    # the run directory itself); a kept one is the user's and stays.
    if st.get("overlay_temp") and st.get("overlay"):
        Path(st["overlay"]).unlink(missing_ok=True)
    shutil.rmtree(path)
