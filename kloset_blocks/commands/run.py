# `mount`, `pg start`, `pg stop`, `psql`, `down`: the attach chain and Postgres, for a human.
#
# Strategy: each command is a thin argparse handler over a session function that takes the nbdkit
# command as a parameter (serve.prepare's for the real plugin; tests pass a stand-in), so the
# code the tests run is the code the user runs. serve.prepare opens the store and checks the
# snapshot (passphrase, prefix, data directory, server version) in-process first, so those
# mistakes cost one line and start nothing. `mount` and `pg start` leave the chain running
# (nbdkit and qemu-storage-daemon in their own sessions, everything recorded in the run directory)
# for a later `down`/`pg stop`; `psql` tears down when psql ends. Any failure, Ctrl-C, SIGTERM or
# SIGHUP before that point tears down what was started.
from __future__ import annotations

import argparse
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kloset_blocks import pg
from kloset_blocks.attach import Chain, teardown_all, teardown_run_dir
from kloset_blocks.errors import UsageError
from kloset_blocks.runtime import Progress, RunDir, list_run_dirs, sigint_ignored, signals_unwind

Nbdkit = tuple[Sequence[str], Mapping[str, str | None]]  # argv, environment changes (None unsets)


# --- sessions (library API; the CLI handlers below are argument plumbing) ------------------------


def require_root() -> None:
    if os.geteuid() != 0:
        raise UsageError("must run as root (mount, losetup and the FUSE export need it)")


def mount_session(
    nbdkit: Nbdkit,
    mountpoint: Path | str,
    *,
    overlay: Path | str | None = None,
    progress: Progress | None = None,
    run_root: Path | str | None = None,
    state: Mapping[str, Any] | None = None,
) -> Chain:
    """Bring the chain up on a user's mountpoint and leave it running."""
    argv, env = nbdkit
    with signals_unwind():
        return Chain(
            argv,
            env=env,
            mountpoint=mountpoint,
            overlay=overlay,
            progress=progress,
            run_root=run_root,
            state=state,
        ).up()


def pg_session(
    nbdkit: Nbdkit,
    *,
    read_only: bool = False,
    overlay: Path | str | None = None,
    progress: Progress | None = None,
    run_root: Path | str | None = None,
    settings: Sequence[str] = (),
    state: Mapping[str, Any] | None = None,
) -> tuple[Chain, pg.Server]:
    """Chain + Postgres on its data directory, ready for queries. On any failure (or signal) before
    it is ready, everything started is torn down and the error propagates."""
    argv, env = nbdkit
    progress = progress or Progress(quiet=True)
    t0 = time.monotonic()
    with signals_unwind():
        chain = Chain(argv, env=env, overlay=overlay, progress=progress, run_root=run_root, state=state)
        try:
            chain.up()
            assert chain.mountpoint is not None and chain.run is not None
            with progress.phase("prepare"):
                cluster = pg.locate(chain.mountpoint)
                uid, gid = pg.pg_ids()
                pg.ensure_traversable(chain.mountpoint, cluster.datadir, uid)
                changed = pg.fix_ownership(cluster.datadir, uid, gid)
                pg.prepare_datadir(cluster.datadir, progress)
            if changed:
                progress.say(f"gave {changed} inode(s) to the postgres user (in the overlay)")
            server = pg.Server(chain.run, cluster, read_only=read_only, progress=progress, settings=settings)
            server.start()
        except BaseException:
            chain.teardown()
            raise
    progress.done("ready", time.monotonic() - t0)
    return chain, server


def psql_session(
    nbdkit: Nbdkit,
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
        nbdkit, read_only=read_only, overlay=overlay, progress=progress, run_root=run_root, state=state
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


# --- CLI -----------------------------------------------------------------------------------------


def _served(args: argparse.Namespace, progress: Progress, *, pgdata: bool) -> Any:
    """serve.prepare for the command's arguments (looked up at call time: tests swap it)."""
    from kloset_blocks import serve

    return serve.prepare(
        args.store,
        args.snapshot,
        path=getattr(args, "path", None),  # `mount` only; Postgres serves the dir holding PG_VERSION
        pgdata=pgdata,
        owner=pg.PG_USER if pgdata else None,
        passphrase_file=args.passphrase_file,
        progress=progress,
    )


def cmd_mount(args: argparse.Namespace) -> int:
    require_root()
    progress = Progress(args.quiet)
    if _fuse_backend(args):  # hook: the exposed image file as the backing (kloset_blocks.fuse, issue 7)
        from kloset_blocks.fuse.chain import fuse_mount_session

        chain = fuse_mount_session(
            args.store,
            args.snapshot,
            args.mountpoint,
            path=args.path,
            overlay=args.overlay,
            progress=progress,
        )
    else:
        served = _served(args, progress, pgdata=False)
        chain = mount_session(
            served.nbdkit, args.mountpoint, overlay=args.overlay, progress=progress, state=served.state()
        )
    assert chain.run is not None
    progress.say(f"mounted on {chain.mountpoint} (run {chain.run.id}); `kloset-blocks down` to undo")
    return 0


def _fuse_backend(args: argparse.Namespace) -> bool:
    # --- hook (issue 7): `--backend fuse`, or `auto` where nbdkit is not installed ---
    import shutil

    return args.backend == "fuse" or (args.backend == "auto" and shutil.which("nbdkit") is None)


def cmd_pg_start(args: argparse.Namespace) -> int:
    require_root()
    progress = Progress(args.quiet)
    served = _served(args, progress, pgdata=True)
    chain, server = pg_session(
        served.nbdkit,
        read_only=args.read_only,
        overlay=args.overlay,
        progress=progress,
        state=served.state(),
    )
    assert chain.run is not None
    print(server.connect_hint())
    progress.say(f"run {chain.run.id}; `kloset-blocks pg stop` to stop and tear down")
    return 0


def cmd_pg_stop(args: argparse.Namespace) -> int:
    require_root()
    n = stop_sessions(progress=Progress(args.quiet))
    if n == 0:
        Progress(args.quiet).say("no Postgres started by kloset-blocks is running")
    return 0


def cmd_psql(args: argparse.Namespace) -> int:
    require_root()
    psql_args = split_psql_args(args)
    progress = Progress(args.quiet)
    served = _served(args, progress, pgdata=True)
    return psql_session(
        served.nbdkit,
        psql_args,
        read_only=args.read_only,
        overlay=args.overlay,
        progress=progress,
        state=served.state(),
    )


def split_psql_args(args: argparse.Namespace) -> list[str]:
    """psql's arguments. Everything after SNAP is psql's, except that our own options may come
    between SNAP and a `--` (`psql STORE SNAP --read-only -- -d shop`): parsed into `args` here."""
    rest = list(args.psql_args)
    if "--" not in rest:
        return rest
    cut = rest.index("--")
    if cut:
        _PSQL_OPTIONS.parse_args(rest[:cut], namespace=args)
    return rest[cut + 1 :]


def cmd_down(args: argparse.Namespace) -> int:
    require_root()
    progress = Progress(args.quiet)
    n, problems = teardown_all(progress=progress)
    progress.say(f"down: {n} chain(s) torn down" + (f", {len(problems)} problem(s)" if problems else ""))
    return 1 if problems else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    quiet = _quiet_options()
    snap = argparse.ArgumentParser(add_help=False, parents=[_snap_options()])
    snap.add_argument("store", metavar="STORE", help="Kloset store, e.g. fs:/var/backups")
    snap.add_argument("snapshot", metavar="SNAP", help="snapshot id (or unique prefix)")

    p = subparsers.add_parser(
        "mount", parents=[quiet, snap], help="mount a snapshot read-write (qcow2 overlay)"
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--path", help="subtree of the snapshot to serve as the filesystem root")
    p.add_argument(
        "--backend",
        choices=["auto", "nbd", "fuse"],
        default="auto",
        help="serve the backing with nbdkit, or as a FUSE image file (`expose`); auto: nbd if installed",
    )
    p.set_defaults(handler=cmd_mount)

    p = subparsers.add_parser("pg", help="PostgreSQL on a snapshot: start | stop")
    pgsub = p.add_subparsers(dest="pg_command", metavar="start|stop", required=True)
    s = pgsub.add_parser(
        "start", parents=[quiet, snap], help="start Postgres on a snapshot, leave it running"
    )
    s.add_argument("--read-only", action="store_true", help="default_transaction_read_only=on")
    s.set_defaults(handler=cmd_pg_start)
    s = pgsub.add_parser("stop", parents=[quiet], help="stop Postgres and tear its chain down")
    s.set_defaults(handler=cmd_pg_stop)

    p = subparsers.add_parser(
        "psql",
        parents=[quiet, snap],
        help="psql on a snapshot, nothing restored; tears down at exit",
        usage="%(prog)s [options] STORE SNAP [options --] [PSQL_ARGS ...]",
    )
    p.add_argument("--read-only", action="store_true", help="default_transaction_read_only=on")
    p.add_argument("psql_args", nargs=argparse.REMAINDER, metavar="PSQL_ARGS", help="passed to psql")
    p.set_defaults(handler=cmd_psql)

    p = subparsers.add_parser("down", parents=[quiet], help="tear down everything kloset-blocks started")
    p.set_defaults(handler=cmd_down)


def _quiet_options() -> argparse.ArgumentParser:
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    return quiet


def _snap_options() -> argparse.ArgumentParser:
    snap = argparse.ArgumentParser(add_help=False)
    snap.add_argument(
        "--overlay", metavar="FILE", help="keep the qcow2 overlay in FILE (reused if it exists)"
    )
    snap.add_argument(
        "--passphrase-file",
        metavar="FILE",
        help="passphrase of an encrypted store (else $PLAKAR_PASSPHRASE, else a prompt)",
    )
    return snap


# psql's own options when they follow SNAP (before a `--`): the same definitions, no positionals.
_PSQL_OPTIONS = argparse.ArgumentParser(
    prog="kloset-blocks psql", add_help=False, parents=[_quiet_options(), _snap_options()]
)
_PSQL_OPTIONS.add_argument("--read-only", action="store_true")
