# `kloset-blocks query STORE "SQL"`: the argument plumbing over kloset_blocks.app.query.
#
# Exit status: 0 when the query ran on every chosen snapshot (with or without rows), 1 when it
# failed on any of them (each named on stderr, and in the summary), or on a usage error.
from __future__ import annotations

import argparse
import sys

from kloset_blocks.errors import UsageError
from kloset_blocks.host.progress import Progress


def cmd_query(args: argparse.Namespace) -> int:
    from kloset_blocks.app.query import QueryOptions, QueryRun, opened_store, select_snapshots
    from kloset_blocks.app.report import Printer
    from kloset_blocks.commands.run import require_root

    require_root()
    if args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    options = QueryOptions(
        sql=args.sql,
        db=args.db,
        jobs=args.jobs,
        cache_dir=args.cache_dir,
        cache_dir_size=args.cache_dir_size,
        cache=args.cache,
        timeout=args.timeout,
    )
    printer = Printer(args.format, quiet=args.quiet)
    with opened_store(args.store, args.passphrase_file) as store:
        infos = select_snapshots(store, args.snapshots, args.since, args.until, args.oldest_first)
        Progress(args.quiet).say(f"query on {len(infos)} snapshot(s), {options.jobs} at a time")
        run = QueryRun(args.store, store, infos, options, on_result=printer.result)
        results = run.run()
    printer.finish(run, results)
    failed = [r.info.short_id for r in results if r.error is not None]
    if failed:
        print(
            f"kloset-blocks: query failed on {len(failed)} snapshot(s): {', '.join(failed)}", file=sys.stderr
        )
        return 1
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "query",
        help="run one SQL query on many snapshots (which backup still has my row?), nothing restored",
        description="For each chosen snapshot (newest first), start PostgreSQL read-only on it through "
        "the attach chain, run the query, tear down; print each snapshot's rows and a summary.",
    )
    p.add_argument("store", metavar="STORE", help="Kloset store, e.g. fs:/var/backups")
    p.add_argument("sql", metavar="SQL", help="one SQL statement (run read-only)")
    p.add_argument("--db", default="postgres", help="database to connect to (default: postgres)")
    p.add_argument(
        "--snapshots",
        default="all",
        metavar="all|ID,ID,...",
        help="which snapshots: all (default) or comma-separated id prefixes",
    )
    p.add_argument("--since", metavar="DATE", help="only snapshots taken at or after DATE (UTC)")
    p.add_argument("--until", metavar="DATE", help="only snapshots taken at or before DATE (UTC)")
    p.add_argument("--oldest-first", action="store_true", help="oldest snapshot first (default: newest)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format")
    p.add_argument("-j", "--jobs", type=int, default=1, metavar="N", help="snapshots at once (default 1)")
    p.add_argument("--cache-dir", metavar="DIR", help="persistent on-disk chunk cache, reused by later runs")
    p.add_argument("--cache-dir-size", metavar="SIZE", help="bound of the on-disk cache (default 4G)")
    p.add_argument("--cache", metavar="SIZE", help="in-memory decoded-chunk cache (default 512M)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S", help="per-snapshot query timeout")
    p.add_argument("--passphrase-file", metavar="FILE", help="read the store's passphrase from FILE")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress or summary on stderr")
    p.set_defaults(handler=cmd_query)
