# `mount`, `pg start`, `pg stop`, `psql`, `down`: argument parsing over kloset_blocks.app.sessions.
#
# app.check.prepare opens the store and checks the snapshot in-process first (looked up at call time:
# tests swap it for a stand-in), so a user's mistakes cost one line and start nothing. A remote
# store is opened from its last view (store/view.py) while a thread checks that it still holds
# the same; the session waits for that check before it answers (psql runs, `ready` is said) and,
# when the store had changed, tears down and starts again (_session).
from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from kloset_blocks import postgres
from kloset_blocks.app.sessions import mount_session, pg_session, psql_session, stop_sessions
from kloset_blocks.app.teardown import teardown_all

if TYPE_CHECKING:
    from kloset_blocks.app.check import Served
    from kloset_blocks.host.chain import Chain
from kloset_blocks.errors import StaleView, UsageError
from kloset_blocks.host.progress import Progress

T = TypeVar("T")


def require_root() -> None:
    if os.geteuid() != 0:
        raise UsageError("must run as root (mount, losetup and the FUSE export need it)")


def _served(
    args: argparse.Namespace,
    progress: Progress,
    *,
    pgdata: bool,
    backend: str = "nbd",
    from_last_view: bool = False,
    fresh_view: str | None = None,
) -> Served:
    """check.prepare for the command's arguments (looked up at call time: tests swap it)."""
    from kloset_blocks.app import check

    postgres.use_bindirs(getattr(args, "pg_bindir", None))
    return check.prepare(
        args.store,
        args.snapshot,
        path=getattr(args, "path", None),  # `mount` only; Postgres serves the dir holding PG_VERSION
        pgdata=pgdata,
        owner=postgres.PG_USER if pgdata else None,
        passphrase_file=args.passphrase_file,
        progress=progress,
        backend=backend,
        journal=getattr(args, "overlay", None) is not None,  # a kept overlay must survive a crash
        from_last_view=from_last_view,
        fresh_view=fresh_view,
    )


def _session(
    args: argparse.Namespace,
    progress: Progress,
    session: Callable[[Served], T],
    *,
    pgdata: bool,
    backend: str = "nbd",
) -> T:
    """The session on the snapshot served from the store's last view (a remote store: no round
    trip before the chain starts), which confirms it before it answers; when the store had changed
    since, the session tore everything down and it starts again on what the store holds now."""
    served = _served(args, progress, pgdata=pgdata, backend=backend, from_last_view=True)
    try:
        served.confirmed(block=False)  # found changed already: start nothing on it
        return session(served)
    except StaleView as e:
        progress.say(str(e))
        now = e.view
    return session(_served(args, progress, pgdata=pgdata, backend=backend, fresh_view=now))


def cmd_mount(args: argparse.Namespace) -> int:
    require_root()
    progress = Progress(args.quiet)

    def mount(served: Served) -> Chain:
        return mount_session(
            served.backing,
            args.mountpoint,
            overlay=args.overlay,
            progress=progress,
            state=served.state(),
            confirm=served.confirmed,
        )

    chain = _session(args, progress, mount, pgdata=False, backend="fuse" if _fuse_backend(args) else "nbd")
    assert chain.run is not None
    progress.say(f"mounted on {chain.mountpoint} (run {chain.run.id}); `kloset-blocks down` to undo")
    return 0


def _fuse_backend(args: argparse.Namespace) -> bool:
    """`--backend fuse`, or `auto` where nbdkit is not installed."""
    import shutil

    return args.backend == "fuse" or (args.backend == "auto" and shutil.which("nbdkit") is None)


def cmd_pg_start(args: argparse.Namespace) -> int:
    require_root()
    progress = Progress(args.quiet)

    def start(served: Served) -> tuple[Chain, postgres.Server]:
        return pg_session(
            served.backing,
            read_only=args.read_only,
            overlay=args.overlay,
            progress=progress,
            state=served.state(),
            confirm=served.confirmed,
        )

    chain, server = _session(args, progress, start, pgdata=True)
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

    def session(served: Served) -> int:
        return psql_session(
            served.backing,
            psql_args,
            read_only=args.read_only,
            overlay=args.overlay,
            progress=progress,
            state=served.state(),
            confirm=served.confirmed,
        )

    return _session(args, progress, session, pgdata=True)


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
    s.add_argument("--read-only", action="store_true", help="a hot standby: the server refuses every write")
    s.set_defaults(handler=cmd_pg_start)
    s = pgsub.add_parser("stop", parents=[quiet], help="stop Postgres and tear its chain down")
    s.set_defaults(handler=cmd_pg_stop)

    p = subparsers.add_parser(
        "psql",
        parents=[quiet, snap],
        help="psql on a snapshot, nothing restored; tears down at exit",
        usage="%(prog)s [options] STORE SNAP [options --] [PSQL_ARGS ...]",
    )
    p.add_argument("--read-only", action="store_true", help="a hot standby: the server refuses every write")
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
    add_pg_bindir(snap)
    return snap


def add_pg_bindir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pg-bindir",
        action="append",
        metavar="DIR",
        help="a PostgreSQL bin directory to look in first (repeatable; also $KLOSET_BLOCKS_PG_BINDIR, "
        "colon-separated); each is used for the major its `postgres --version` says",
    )


# psql's own options when they follow SNAP (before a `--`): the same definitions, no positionals.
_PSQL_OPTIONS = argparse.ArgumentParser(
    prog="kloset-blocks psql", add_help=False, parents=[_quiet_options(), _snap_options()]
)


_PSQL_OPTIONS.add_argument("--read-only", action="store_true")
