# `kloset-blocks check STORE SNAP`: the integrity check of a backup (kloset_blocks.app.integrity).
# Exit status 0 when clean, 1 when any relation is damaged or the check could not run.
from __future__ import annotations

import argparse

from kloset_blocks import postgres
from kloset_blocks.host.progress import Progress


def cmd_check(args: argparse.Namespace) -> int:
    from kloset_blocks.app import check
    from kloset_blocks.app.integrity import amcheck_snapshot, render
    from kloset_blocks.commands.run import require_root

    require_root()
    postgres.use_bindirs(args.pg_bindir)
    progress = Progress(args.quiet)
    served = check.prepare(
        args.store,
        args.snapshot,
        pgdata=True,
        owner=postgres.PG_USER,
        passphrase_file=args.passphrase_file,
        progress=progress,
    )
    report = amcheck_snapshot(served, progress=progress, jobs=args.jobs)
    for line in render(report):
        print(line, flush=True)
    return 0 if report.clean else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    from kloset_blocks.commands.run import add_pg_bindir

    p = subparsers.add_parser(
        "check",
        help="verify a backup without restoring it: amcheck every table and index (and page checksums)",
        description="Start the snapshot read-only and run pg_amcheck --heapallindexed on every "
        "database; with data checksums every page read is verified. Reports the relations and "
        "pages checked, the bytes fetched, and each damaged relation (exit 1).",
    )
    p.add_argument("store", metavar="STORE", help="Kloset store, e.g. fs:/var/backups")
    p.add_argument("snapshot", metavar="SNAP", help="snapshot id (or unique prefix)")
    p.add_argument("--passphrase-file", metavar="FILE", help="read the store's passphrase from FILE")
    p.add_argument("-j", "--jobs", type=int, default=1, metavar="N", help="pg_amcheck connections")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    add_pg_bindir(p)
    p.set_defaults(handler=cmd_check)
