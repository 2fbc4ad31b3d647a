# Sessions on a snapshot: the attach chain alone (`mount`), with Postgres on it (`pg start`), and
# with psql on the terminal until it exits (`psql`). Each takes the nbdkit command as a parameter
# (app.check.prepare's for the real plugin; tests pass a stand-in), so the code the tests run is the
# code the user runs.
#
# Invariants: `mount` and `pg start` leave the chain running (nbdkit and qemu-storage-daemon in their
# own sessions, everything recorded in the run directory) for a later `down`/`pg stop`; `psql` tears
# down when psql ends. Any failure, Ctrl-C, SIGTERM or SIGHUP before that point tears down what was
# started. When Postgres or psql fails and reads from the store failed, the error says which
# snapshot files could not be read (app/damage.py), not Postgres' last line.
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kloset_blocks import postgres
from kloset_blocks.app.damage import session_damage
from kloset_blocks.app.teardown import teardown_run_dir
from kloset_blocks.app.warden import Warden
from kloset_blocks.host.backing import Backing
from kloset_blocks.host.chain import Chain
from kloset_blocks.host.procs import proc_alive
from kloset_blocks.host.progress import Progress
from kloset_blocks.host.rundir import RunDir, list_run_dirs
from kloset_blocks.host.rundir import run_root as run_root_dir
from kloset_blocks.host.signals import sigint_ignored, signals_unwind
from kloset_blocks.host.space import full_message
from kloset_blocks.host.tools import exit_cause


def _confirmed(block: bool = True) -> None:
    """What was served is what the store holds (a backing from prepare() without its last view)."""


def mount_session(
    backing: Backing,
    mountpoint: Path | str,
    *,
    overlay: Path | str | None = None,
    progress: Progress | None = None,
    run_root: Path | str | None = None,
    state: Mapping[str, Any] | None = None,
    confirm: Callable[..., None] = _confirmed,
) -> Chain:
    """Bring the chain up on a user's mountpoint and leave it running (once `confirm` returns:
    Served.confirmed)."""
    with signals_unwind():
        chain = Chain(
            backing, mountpoint=mountpoint, overlay=overlay, progress=progress, run_root=run_root, state=state
        )
        try:
            chain.up()
            confirm()
        except BaseException:
            chain.teardown()
            raise
        return chain


def pg_session(
    backing: Backing,
    *,
    read_only: bool = False,
    overlay: Path | str | None = None,
    progress: Progress | None = None,
    run_root: Path | str | None = None,
    settings: Sequence[str] = (),
    state: Mapping[str, Any] | None = None,
    started: list[Chain] | None = None,
    confirm: Callable[..., None] = _confirmed,
) -> tuple[Chain, postgres.Server]:
    """Chain + Postgres on its data directory, ready for queries once `confirm` returns too
    (Served.confirmed: it may still be checking the store while Postgres starts). On any failure
    (or signal) before it is ready, everything started is torn down and the error propagates. The
    chain is appended to `started` before anything starts, so a caller can tear it down whatever
    instant a signal lands at, the return included."""
    progress = progress or Progress(quiet=True)
    t0 = time.monotonic()
    with signals_unwind():
        chain = Chain(backing, overlay=overlay, progress=progress, run_root=run_root, state=state)
        if started is not None:
            started.append(chain)
        try:
            chain.up()
            assert chain.mountpoint is not None and chain.run is not None
            confirm(block=False)  # a store found changed already: Postgres need not start
            server = postgres.start_server(
                chain.run, chain.mountpoint, read_only=read_only, progress=progress, settings=settings
            )
        except BaseException as e:
            # Postgres' last line blames the wrong thing when the store could not be read.
            damage = session_damage(_run_path(chain), state) if isinstance(e, Exception) else None
            chain.teardown()
            if damage is not None:
                raise damage from None
            raise
        try:
            confirm()
        except BaseException:
            chain.teardown()
            raise
        progress.done("ready", time.monotonic() - t0)
    return chain, server


def psql_session(
    backing: Backing,
    psql_args: Sequence[str],
    *,
    read_only: bool = False,
    overlay: Path | str | None = None,
    progress: Progress | None = None,
    run_root: Path | str | None = None,
    state: Mapping[str, Any] | None = None,
    confirm: Callable[..., None] = _confirmed,
) -> int:
    """pg_session, then psql with the user's arguments on the terminal, then teardown.

    One signal scope covers it all, from the first process to psql's exit: a SIGTERM or SIGINT at
    any instant (the one `ready` is printed at included) unwinds into the teardown. A warden tears
    the chain down if this process dies without doing it (SIGKILL)."""
    started: list[Chain] = []
    with signals_unwind(), Warden(run_root_dir(run_root)):
        try:
            _, server = pg_session(
                backing,
                read_only=read_only,
                overlay=overlay,
                progress=progress,
                run_root=run_root,
                state=state,
                started=started,
                confirm=confirm,
            )
            with sigint_ignored():
                rc = server.psql(psql_args)
            faults = session_faults(started[0].run)
            damage = session_damage(_run_path(started[0]), state) if rc != 0 else None
            if damage is not None:  # psql printed Postgres' error: say what it comes from
                faults.insert(0, str(damage))
            for fault in faults:
                print(f"kloset-blocks: {fault}", file=sys.stderr, flush=True)
            return rc or (1 if faults else 0)
        finally:
            for chain in started:
                chain.teardown()


def _run_path(chain: Chain) -> Path | None:
    return chain.run.path if chain.run is not None else None


def session_faults(run: RunDir | None) -> list[str]:
    """What went wrong under a session that ran (checked in its run directory before the
    teardown): the nbdkit serving the snapshot or the qemu-storage-daemon attaching the overlay died
    (every read or write failed from then on), the disk holding the overlay is full."""
    if run is None:
        return []
    st = run.state
    faults = []
    rec = st.get("nbdkit")
    if rec and not proc_alive(rec):
        cause = exit_cause(None, st.get("nbdkit_log", ""), "nbdkit")
        faults.append(f"nbdkit, which served the snapshot, died during the session: {cause}")
    rec = st.get("qsd")
    if rec and not proc_alive(rec):
        cause = exit_cause(None, st.get("qsd_log", ""), "qemu-storage-daemon")
        faults.append(f"qemu-storage-daemon, which attached the overlay, died during the session: {cause}")
    if st.get("overlay") and (full := full_message(st["overlay"], st.get("overlay_free_at_start"))):
        faults.append(full)
    return faults


def stop_sessions(run_root: Path | str | None = None, progress: Progress | None = None) -> int:
    """`pg stop`: tear down every chain that runs a Postgres server. Returns how many."""
    n = 0
    for d in list_run_dirs(run_root):
        if "postgres" in RunDir.load(d).state:
            teardown_run_dir(d, progress)
            n += 1
    return n
