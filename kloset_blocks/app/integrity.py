# `kloset-blocks check STORE SNAP`: can this backup be trusted, without restoring it? The snapshot is
# started on a throwaway overlay through the usual chain and every heap table and B-tree index of every
# connectable database is verified by amcheck (`pg_amcheck --heapallindexed`: each heap page and
# tuple, each index page, and that every heap tuple is in its indexes). Where the cluster has data
# checksums the server verifies the checksum of every page it reads from disk, and amcheck reads
# them all. Reported: the relations and pages checked, the bytes fetched from the store, and each
# damaged relation with the server's words.
#
# Strategy: pg_amcheck is a client tool; binaries.find_client picks one of the server's major or
# newer, else an older one (Debian's 15 checks 16-18 servers: the amcheck functions it calls are the
# same), saying so. The amcheck extension must be in the server's extension directory (contrib); it
# is created in each database, in the overlay only: that is why the server is not a --read-only one
# (a hot standby can create nothing); pg_amcheck's own sessions are read-only
# (default_transaction_read_only=on through PGOPTIONS), and amcheck only reads.
#
# Invariants: damage is never silent: a chunk that fails its MAC in the store is an I/O error for
# the pages on it, which amcheck reports for the relation that owns them; so is a checksum failure
# or a corrupt tuple or index entry. Everything started is torn down on every exit path; the store
# is never written.
from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kloset_blocks.app.sessions import pg_session
from kloset_blocks.errors import PgError
from kloset_blocks.host.progress import Progress
from kloset_blocks.postgres import Server
from kloset_blocks.postgres.server import child_env

# The relations pg_amcheck checks by default: heap tables, materialized views and TOAST tables, and
# B-tree indexes that are ready, valid and live; no temporary relations.
CHECKED_RELATIONS = """
select count(*),
       (coalesce(sum(pg_relation_size(c.oid, 'main')), 0) / current_setting('block_size')::int)::bigint
from pg_class c
left join pg_index i on i.indexrelid = c.oid
left join pg_am a on a.oid = c.relam
where c.relpersistence <> 't'
  and (c.relkind in ('r', 'm', 't')
       or (c.relkind = 'i' and a.amname = 'btree' and i.indisready and i.indisvalid and i.indislive))
"""
# pg_amcheck's report of one relation: `heap table "db.schema.rel", block 3, offset 7:` or
# `btree index "db.schema.idx":`, then indented detail lines.
DAMAGE_HEAD = re.compile(r'^(heap table|btree index) "([^"]*)"(.*):$')
CHECKING = re.compile(r'^pg_amcheck: checking (heap table|btree index) "')


@dataclass
class Damage:
    kind: str  # "heap table" | "btree index"
    relation: str  # "db.schema.name"
    details: list[str] = field(default_factory=list)

    def line(self) -> str:
        return f"damaged {self.kind} {self.relation}: " + " / ".join(self.details)[:500]


@dataclass
class Report:
    snapshot: str
    major: str = ""
    checksums: bool = False
    databases: list[str] = field(default_factory=list)
    relations: int = 0  # checked, as pg_amcheck said
    pages: int = 0  # in those relations (main forks)
    block_size: int = 8192
    fetched: int | None = None  # bytes read from the store
    logical_size: int = 0
    damaged: list[Damage] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # pg_amcheck's own errors not tied to a relation
    notices: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.damaged and not self.problems


def amcheck_snapshot(
    served: Any,  # app.check.Served, checked for a data directory and its server
    *,
    progress: Progress | None = None,
    run_root: Path | str | None = None,
    jobs: int = 1,
) -> Report:
    """Start the snapshot read-only, amcheck all of it, tear down; the report (also of damage)."""
    progress = progress or Progress(quiet=True)
    report = Report(served.snapshot_id, logical_size=served.logical_size)
    chain, server = pg_session(served.backing, progress=progress, run_root=run_root, state=served.state())
    try:
        report.major = server.cluster.major
        with progress.phase("check"):
            _check(server, report, jobs)
    finally:
        chain.teardown()
    report.fetched = progress.fetched_bytes
    return report


def _check(server: Server, report: Report, jobs: int) -> None:
    report.checksums = server.query("show data_checksums") == "on"
    report.block_size = int(server.query("show block_size"))
    report.databases = server.query(
        "select datname from pg_database where datallowconn order by datname"
    ).splitlines()
    if server.query("select count(*) from pg_available_extensions where name = 'amcheck'") != "1":
        raise PgError(
            f"the PostgreSQL {server.cluster.major} server in {server.cluster.bindir} has no amcheck "
            f"extension (contrib): apt-get install postgresql-contrib (Debian), or postgresql"
            f"{server.cluster.major}-contrib (RHEL, PGDG)"
        )
    for db in report.databases:  # in the overlay only
        server.query("create extension if not exists amcheck", db)
    pg_amcheck = server.client("pg_amcheck")
    args = ["--all", "--heapallindexed", "--verbose", "--jobs", str(max(1, jobs))]
    argv = server.client_argv(pg_amcheck, args)
    p = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        cwd="/",
        env={**child_env(), "PGOPTIONS": "-c default_transaction_read_only=on"},
    )
    report.damaged = parse_damage(p.stdout)
    report.relations = sum(1 for ln in p.stderr.splitlines() if CHECKING.match(ln))
    report.problems = [
        ln.strip()
        for ln in p.stderr.splitlines()
        if ln.startswith("pg_amcheck: error:") or ln.startswith("pg_amcheck: fatal:")
    ]
    if p.returncode not in (0, 2) and not report.problems:  # 2: corruption found
        report.problems.append(f"pg_amcheck exited {p.returncode}")
    for db in report.databases:
        try:
            report.pages += int(server.query(CHECKED_RELATIONS, db).split("|")[1])
        except PgError as e:  # the catalog itself unreadable: amcheck has said so already
            report.problems.append(f"{db}: {e}")


def parse_damage(stdout: str) -> list[Damage]:
    """pg_amcheck's stdout: one Damage per relation head line, with the indented lines after it."""
    damaged: dict[tuple[str, str], Damage] = {}
    current: Damage | None = None
    for line in stdout.splitlines():
        m = DAMAGE_HEAD.match(line)
        if m:
            key = (m.group(1), m.group(2))
            current = damaged.setdefault(key, Damage(m.group(1), m.group(2)))
            if m.group(3).strip(", "):
                current.details.append(m.group(3).strip(", "))
        elif current is not None and line.startswith(" ") and line.strip():
            current.details.append(line.strip())
    return list(damaged.values())


def render(report: Report) -> Sequence[str]:
    """The report, a few lines for a human (stdout)."""
    from kloset_blocks.units import format_size

    checks = "data checksums verified on every page read" if report.checksums else "no data checksums"
    lines = [
        f"snapshot {report.snapshot[:8]}: PostgreSQL {report.major}, {checks}",
        f"checked {report.relations} relations (heap tables and B-tree indexes, --heapallindexed) in "
        f"{len(report.databases)} database(s): {report.pages} pages "
        f"({format_size(report.pages * report.block_size)})",
    ]
    if report.fetched is not None:
        share = f" ({100 * report.fetched / report.logical_size:.1f} %)" if report.logical_size else ""
        lines.append(f"fetched {format_size(report.fetched)} of {format_size(report.logical_size)}{share}")
    lines += [d.line() for d in report.damaged]
    lines += [f"problem: {p}" for p in report.problems]
    if report.clean:
        lines.append("clean: no damage found")
    else:
        lines.append(f"DAMAGED: {len(report.damaged)} relation(s), {len(report.problems)} other problem(s)")
    return lines
