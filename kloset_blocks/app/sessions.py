# Sessions on a snapshot: the attach chain alone (`mount`), with Postgres on it (`pg start`), and
# with psql on the terminal until it exits (`psql`). Each takes the nbdkit command as a parameter
# (app.check.prepare's for the real plugin; tests pass a stand-in), so the code the tests run is the
# code the user runs.
#
# Invariants: `mount` and `pg start` leave the chain running (nbdkit and qemu-storage-daemon in their
# own sessions, everything recorded in the run directory) for a later `down`/`pg stop`; `psql` tears
# down when psql ends. Any failure, Ctrl-C, SIGTERM or SIGHUP before that point tears down what was
# started.
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kloset_blocks import postgres
from kloset_blocks.app.teardown import teardown_run_dir
from kloset_blocks.host.backing import Backing
from kloset_blocks.host.chain import Chain
from kloset_blocks.host.progress import Progress
from kloset_blocks.host.rundir import RunDir, list_run_dirs
from kloset_blocks.host.signals import sigint_ignored, signals_unwind


def mount_session(
    backing: Backing,
    mountpoint: Path | str,
    *,
    overlay: Path | str | None = None,
    progress: Progress | None = None,
    run_root: Path | str | None = None,
    state: Mapping[str, Any] | None = None,
) -> Chain:
    """Bring the chain up on a user's mountpoint and leave it running."""
    with signals_unwind():
        return Chain(
            backing, mountpoint=mountpoint, overlay=overlay, progress=progress, run_root=run_root, state=state
        ).up()


def pg_session(
    backing: Backing,
    *,
    read_only: bool = False,
    overlay: Path | str | None = None,
    progress: Progress | None = None,
    run_root: Path | str | None = None,
    settings: Sequence[str] = (),
    state: Mapping[str, Any] | None = None,
) -> tuple[Chain, postgres.Server]:
    """Chain + Postgres on its data directory, ready for queries. On any failure (or signal) before
    it is ready, everything started is torn down and the error propagates."""
    progress = progress or Progress(quiet=True)
    t0 = time.monotonic()
    with signals_unwind():
        chain = Chain(backing, overlay=overlay, progress=progress, run_root=run_root, state=state)
        try:
            chain.up()
            assert chain.mountpoint is not None and chain.run is not None
            server = postgres.start_server(
                chain.run, chain.mountpoint, read_only=read_only, progress=progress, settings=settings
            )
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
) -> int:
    """pg_session, then psql with the user's arguments on the terminal, then teardown."""
    chain, server = pg_session(
        backing, read_only=read_only, overlay=overlay, progress=progress, run_root=run_root, state=state
    )
    with signals_unwind():
        try:
            with sigint_ignored():
                return server.psql(psql_args)
        finally:
            chain.teardown()


def stop_sessions(run_root: Path | str | None = None, progress: Progress | None = None) -> int:
    """`pg stop`: tear down every chain that runs a Postgres server. Returns how many."""
    n = 0
    for d in list_run_dirs(run_root):
        if "postgres" in RunDir.load(d).state:
            teardown_run_dir(d, progress)
            n += 1
    return n
