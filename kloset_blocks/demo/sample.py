# A real, throwaway PostgreSQL cluster (for the demo, the benchmarks and the end-to-end tests), and
# the backups made from it.
#
# Strategy: initdb as the postgres user in a private temporary directory, a server on a private
# Unix socket (no TCP), a `shop` database with pgbench -i data plus a small table, then the live
# server's answers to LIVE_QUERIES (the oracle) and `pg_basebackup -D - -F tar -X fetch -c fast`.
# The tar is extracted, chowned to postgres and turned into an ext4 image with mke2fs -d (the
# stand-in for the synthesized image), whose layout matches the one kloset-blocks synthesizes.
from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

PG_MAJOR = "15"
BINDIR = Path(f"/usr/lib/postgresql/{PG_MAJOR}/bin")
PORT = 5432

# (database, query) -> the answer the live server gave at backup time is the oracle.
LIVE_QUERIES: dict[str, tuple[str, str]] = {
    "accounts": ("shop", "select count(*), sum(abalance) from pgbench_accounts"),
    "branches": ("shop", "select string_agg(bid || ':' || bbalance, ',' order by bid) from pgbench_branches"),
    "items": ("shop", "select string_agg(id || '=' || name, ',' order by id) from items"),
    "point": ("shop", "select abalance, filler is not null from pgbench_accounts where aid = 77770"),
    "databases": ("postgres", "select string_agg(datname, ',' order by datname) from pg_database"),
}

SETUP_SQL = """
update pgbench_accounts set abalance = aid % 97 where aid % 10 = 0;
update pgbench_branches set bbalance = 42 where bid = 1;
create table items (id int primary key, name text not null);
insert into items select g, 'item-' || g from generate_series(1, 50) g;
delete from items where id % 7 = 0;
"""


def pg_ids() -> tuple[int, int]:
    pw = pwd.getpwnam("postgres")
    return pw.pw_uid, pw.pw_gid


def as_postgres(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", "postgres", "--", *argv],
        check=True, text=True, capture_output=True, cwd="/", stdin=subprocess.DEVNULL, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


@dataclass
class PgCluster:
    base: Path
    live: dict[str, str] = field(default_factory=dict)

    @property
    def datadir(self) -> Path:
        return self.base / "data"

    def start(self) -> None:
        as_postgres(
            [str(BINDIR / "pg_ctl"), "start", "-w", "-s", "-D", str(self.datadir),
             "-l", str(self.base / "log"), "-o", f"-p {PORT} -k {self.base} -c listen_addresses=''"]
        )  # fmt: skip

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            as_postgres([str(BINDIR / "pg_ctl"), "stop", "-s", "-D", str(self.datadir), "-m", "fast"])

    def psql(self, sql: str, db: str = "postgres") -> str:
        out = as_postgres(
            [str(BINDIR / "psql"), "-XAtq", "-v", "ON_ERROR_STOP=1", "-h", str(self.base), "-p", str(PORT),
             "-d", db, "-c", sql]
        )  # fmt: skip
        return out.stdout.rstrip("\n")

    def basebackup(self, dest: Path, wal: str = "fetch") -> Path:
        """pg_basebackup -D - -F tar -X WAL -c fast, written to dest (a tar stream on stdout)."""
        with open(dest, "wb") as f:
            subprocess.run(
                ["runuser", "-u", "postgres", "--", str(BINDIR / "pg_basebackup"), "-h", str(self.base),
                 "-p", str(PORT), "-D", "-", "-F", "tar", "-X", wal, "-c", "fast"],
                check=True, stdout=f, stderr=subprocess.PIPE, cwd="/", stdin=subprocess.DEVNULL,
            )  # fmt: skip
        return dest

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


def make_cluster(scale: int = 1) -> PgCluster:
    """initdb, start, load data, record the live answers. The caller stops/cleans it up."""
    uid, gid = pg_ids()
    base = Path(tempfile.mkdtemp(prefix="kb-pgcluster-"))
    os.chown(base, uid, gid)
    c = PgCluster(base)
    as_postgres([str(BINDIR / "initdb"), "-D", str(c.datadir), "-A", "trust", "-U", "postgres", "--no-sync",
                 "-E", "UTF8", "--locale=C"])  # fmt: skip
    c.start()
    try:
        c.psql("create database shop")
        as_postgres(
            [str(BINDIR / "pgbench"), "-i", "-s", str(scale), "-q", "-h", str(base), "-p", str(PORT), "shop"]
        )
        c.psql(SETUP_SQL, "shop")
        c.live = {name: c.psql(sql, db) for name, (db, sql) in LIVE_QUERIES.items()}
    except BaseException:
        c.cleanup()
        raise
    return c


def extract_for_image(tar_path: Path, dest: Path) -> Path:
    """Extract a pg_basebackup tar and give every inode to postgres, the root 0700 (references §3.4:
    pg_basebackup writes backup_manifest as uid 2048; mke2fs -d copies owners)."""
    dest.mkdir(parents=True)
    with tarfile.open(tar_path) as t:
        t.extractall(dest)  # our own pg_basebackup output
    uid, gid = pg_ids()
    for dirpath, dirnames, filenames in os.walk(dest):
        for name in [*dirnames, *filenames]:
            os.lchown(os.path.join(dirpath, name), uid, gid)
    os.chown(dest, uid, gid)
    os.chmod(dest, 0o700)
    return dest


def make_ext4_image(src: Path, img: Path, free_mib: int = 256) -> Path:
    """The stand-in for the synthesized image: mke2fs -d with the project's feature choices."""
    used = sum(
        os.lstat(os.path.join(d, f)).st_size for d, _, files in os.walk(src) for f in files
    )  # fmt: skip
    size_mib = used // (1 << 20) + free_mib
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-O", "^has_journal,^resize_inode,sparse_super2",
         "-E", "num_backup_sb=0,lazy_itable_init=0", "-d", str(src), str(img), f"{size_mib}M"],
        check=True, capture_output=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return img
