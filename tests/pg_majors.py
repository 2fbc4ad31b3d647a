"""Real backups of PostgreSQL 15, 16, 17 and 18, with and without data checksums, for the tests of
every major (tests/test_e2e_majors.py, tests/test_integrity.py).

15 is Debian's (pg_basebackup -F tar -X fetch); 16-18 are the npm builds deps.sh installs in
/opt/kloset-blocks/pg/<major>/bin (no pg_basebackup: sample.PgCluster.lowlevel_backup,
pg_backup_start/stop in one psql session). The oracle of each backup is its live server's answers
just before it was taken.
`postgres_bin_tar` lays a backup out as plakar's postgres+bin importer does: /manifest.json first
(its version 2 format, from the live server's catalogs), then the backup under /data."""

from __future__ import annotations

import io
import json
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from kloset_blocks.demo import sample

PG_HOME = Path("/opt/kloset-blocks/pg")  # where scripts/deps.sh installs the npm servers

BINDIRS = {
    "15": Path("/usr/lib/postgresql/15/bin"),
    "16": PG_HOME / "16" / "bin",
    "17": PG_HOME / "17" / "bin",
    "18": PG_HOME / "18" / "bin",
}
MAJORS = tuple(BINDIRS)
PG_BINDIR_ENV = ":".join(str(d) for m, d in BINDIRS.items() if m != "15")  # 15 is found by itself

# (database, query) -> one line; besides sample.LIVE_QUERIES.
EXTRA_QUERIES: dict[str, tuple[str, str]] = {
    "version_num": ("postgres", "show server_version_num"),
    "checksums": ("postgres", "show data_checksums"),
    "accounts_file": ("shop", "select pg_relation_filepath('pgbench_accounts')"),
}
QUERIES = {**sample.LIVE_QUERIES, **EXTRA_QUERIES}


@dataclass
class Backup:
    name: str  # e.g. "17-on"
    major: str
    checksums: bool
    tar: Path
    live: dict[str, str] = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)
    io_method: str | None = None  # 18: what the snapshot's postgresql.auto.conf asks for


# Settings that cannot work here, written into the data directory's postgresql.auto.conf just before
# the backup (the live server does not reread it): the start must override them with a notice.
CANNOT_WORK_HERE = (
    "shared_preload_libraries = 'no_such_extension'\nshared_buffers = '64TB'\narchive_command = 'false'\n"
)
IO_URING = "io_method = 'io_uring'\n"  # the npm 18 build has no liburing: worker is used


def take_backup(
    work: Path, major: str, checksums: bool, *, io_method: str | None = None, extra_conf: str = ""
) -> Backup:
    """A cluster of `major`, its live answers and manifest, one backup; the cluster is removed."""
    # 18 enables checksums by default: its "on" backup is initdb's default, not -k.
    default = major == "18" and checksums
    cluster = sample.make_cluster(1, bindir=BINDIRS[major], checksums=None if default else checksums)
    b = Backup(f"{major}-{'on' if checksums else 'off'}", major, checksums, work / f"{major}-{checksums}.tar")
    try:
        if io_method is not None:
            cluster.psql(f"alter system set io_method = '{io_method}'")  # the backup carries it
            b.io_method = io_method
        b.live = {name: cluster.psql(sql, db) for name, (db, sql) in QUERIES.items()}
        b.manifest = plakar_manifest(cluster)
        if extra_conf:
            with open(cluster.datadir / "postgresql.auto.conf", "a") as f:
                f.write(extra_conf)
        if major == "15":
            cluster.basebackup(b.tar, wal="fetch")
        else:
            cluster.lowlevel_backup(b.tar)
    finally:
        cluster.cleanup()
    return b


def take_backups(work: Path, names: list[str]) -> dict[str, Backup]:
    """take_backup for each "MAJOR-on|off" name, two clusters at a time (each its own socket
    directory); 18-off's backup carries io_method=sync, 16-on's and 18-on's settings that cannot
    work here (18-on's io_method=io_uring among them)."""

    def one(name: str) -> Backup:
        major, on = name.split("-")
        extra = {"16-on": CANNOT_WORK_HERE, "18-on": CANNOT_WORK_HERE + IO_URING}.get(name, "")
        io_method = "sync" if name == "18-off" else None
        return take_backup(work, major, on == "on", io_method=io_method, extra_conf=extra)

    with ThreadPoolExecutor(2) as pool:
        return dict(zip(names, pool.map(one, names), strict=True))


def plakar_manifest(cluster: sample.PgCluster) -> dict:
    """What plakar's postgres+bin importer writes as /manifest.json (version 2), from the live
    server: the fields its physical manifest has, databases with their relations."""
    q = cluster.psql
    version, num = q(
        "select current_setting('server_version') || '|' || current_setting('server_version_num')"
    ).split("|")
    dbs = json.loads(
        q("select json_agg(json_build_object('name', datname, 'owner', pg_get_userbyid(datdba), "
          "'encoding', pg_encoding_to_char(encoding), 'collate', datcollate, 'ctype', datctype, "
          "'allow_conn', datallowconn, 'is_template', datistemplate, 'connection_limit', datconnlimit) "
          "order by datname) from pg_database")
    )  # fmt: skip
    for d in dbs:
        if d["allow_conn"] and not d["is_template"]:
            d["relations"] = json.loads(
                q("select coalesce(json_agg(json_build_object('schema', n.nspname, 'name', c.relname, "
                  "'owner', pg_get_userbyid(c.relowner), 'persistence', c.relpersistence, 'kind', c.relkind, "
                  "'row_estimate', c.reltuples::bigint) order by n.nspname, c.relname), '[]') "
                  "from pg_class c join pg_namespace n on n.oid = c.relnamespace "
                  "where c.relkind in ('r','p','f','v','m','S') "
                  "and n.nspname not in ('pg_catalog', 'information_schema', 'pg_toast')", d["name"])
            )  # fmt: skip
    return {
        "version": 2,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "connector": "postgresql+bin",
        "host": str(cluster.base),
        "port": str(sample.PORT),
        "server_version": version,
        "server_version_num": int(num),
        "pg_basebackup_version": "",
        "cluster_system_identifier": q("select system_identifier::text from pg_control_system()"),
        "in_recovery": False,
        "dump_format": "basebackup",
        "cluster_config": {
            "data_checksums": q("show data_checksums") == "on",
            "block_size": int(q("show block_size")),
            "server_encoding": q("show server_encoding"),
            "archive_command_set": False,
        },
        "databases": dbs,
    }


def postgres_bin_tar(backup: Backup, dest: Path) -> Path:
    """plakar's postgres+bin layout as a tar: manifest.json first, then the backup under data/."""
    raw = json.dumps(backup.manifest, indent=2).encode()
    with tarfile.open(dest, "w") as out, tarfile.open(backup.tar) as src:
        info = tarfile.TarInfo("manifest.json")
        info.size, info.mode, info.mtime = len(raw), 0o444, int(time.time())
        out.addfile(info, io.BytesIO(raw))
        for member in src:
            data = src.extractfile(member) if member.isreg() else None
            member.name = "data/" + member.name.removeprefix("./")
            out.addfile(member, data)
    return dest
