# A real, throwaway PostgreSQL cluster (for the demo, the benchmarks and the end-to-end tests), and
# the backups made from it.
#
# Strategy: initdb as the postgres user in a private temporary directory, a server on a private
# Unix socket (no TCP), a `shop` database with pgbench -i data plus a small table, then the live
# server's answers to LIVE_QUERIES (the oracle) and `pg_basebackup -D - -F tar -X fetch -c fast`.
# The tar is extracted, chowned to postgres and turned into an ext4 image with mke2fs -d (the
# stand-in for the synthesized image), whose layout matches the one kloset-blocks synthesizes.
#
# Other majors (tests of every PostgreSQL a backup may hold): `make_cluster(bindir=...)` runs that
# major's initdb/pg_ctl/postgres (e.g. the npm builds deps.sh puts in /opt/kloset-blocks/pg/<major>/bin,
# which have no client tools) while psql and pgbench stay Debian's 15 (they talk to newer servers).
# Those majors have no pg_basebackup here, so `lowlevel_backup` takes a physical backup with the
# documented low-level API in one psql session: pg_backup_start, a tar of the data directory
# (`\!` runs it inside the session), pg_backup_stop; its backup_label is added to the tar and the WAL
# segments from start to stop go into pg_wal/ (what `pg_basebackup -X fetch` would include).
from __future__ import annotations

import base64
import contextlib
import io
import os
import pwd
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from kloset_blocks.postgres.binaries import tool_major

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
    if "input" not in kw:
        kw["stdin"] = subprocess.DEVNULL
    return subprocess.run(
        ["runuser", "-u", "postgres", "--", *argv],
        check=True, text=True, capture_output=True, cwd="/", **kw,  # type: ignore[call-overload]
    )  # fmt: skip


@dataclass
class PgCluster:
    base: Path
    live: dict[str, str] = field(default_factory=dict)
    bindir: Path = BINDIR  # the server's: initdb, pg_ctl, postgres

    @property
    def datadir(self) -> Path:
        return self.base / "data"

    def start(self) -> None:
        as_postgres(
            [str(self.bindir / "pg_ctl"), "start", "-w", "-s", "-D", str(self.datadir),
             "-l", str(self.base / "log"), "-o", f"-p {PORT} -k {self.base} -c listen_addresses=''"]
        )  # fmt: skip

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            as_postgres([str(self.bindir / "pg_ctl"), "stop", "-s", "-D", str(self.datadir), "-m", "fast"])

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

    def lowlevel_backup(self, dest: Path) -> Path:
        """A physical backup with pg_backup_start/stop in one psql session, as a tar at dest: the data
        directory minus pg_wal's content and postmaster.*, plus backup_label and the WAL segments
        from the start's to the stop's (the stop switches segment, so its segment is complete)."""
        tar = self.base / "lowlevel.tar"
        exclude = " ".join(
            f"--exclude=./{p}" for p in ("pg_wal/*", "postmaster.pid", "postmaster.opts", "pg_replslot/*")
        )
        script = "\n".join(
            [
                "select pg_walfile_name(lsn) as start_wal"
                " from pg_backup_start('kloset-blocks', true) lsn \\gset",
                f"\\! tar -C {self.datadir} -cf {tar} --warning=no-file-changed {exclude} .",
                "select pg_walfile_name(lsn) as stop_wal, encode(convert_to(labelfile, 'UTF8'), 'base64')"
                " as label from pg_backup_stop(false) \\gset",
                "\\echo :start_wal :stop_wal",
                "\\echo :label",
            ]
        )
        out = as_postgres(
            [str(BINDIR / "psql"), "-XAtq", "-v", "ON_ERROR_STOP=1", "-h", str(self.base), "-p", str(PORT),
             "-d", "postgres"], input=script + "\n",
        ).stdout.split("\n", 1)  # fmt: skip
        start_wal, stop_wal = out[0].split()
        label = base64.b64decode("".join(out[1].split()))
        wal = sorted(
            p for p in (self.datadir / "pg_wal").iterdir()
            if len(p.name) == 24 and p.name[:8] == start_wal[:8] and start_wal <= p.name <= stop_wal
        )  # fmt: skip
        assert wal and wal[0].name == start_wal and wal[-1].name == stop_wal, (start_wal, stop_wal, wal)
        with tarfile.open(tar, "a") as t:
            info = tarfile.TarInfo("backup_label")
            info.size, info.mode, info.mtime = len(label), 0o600, int(time.time())
            t.addfile(info, io.BytesIO(label))
            for seg in wal:
                t.add(seg, f"pg_wal/{seg.name}")
        shutil.move(tar, dest)
        return dest

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


def make_cluster(scale: int = 1, *, bindir: Path = BINDIR, checksums: bool | None = None) -> PgCluster:
    """initdb, start, load data, record the live answers. The caller stops/cleans it up.
    checksums: True `initdb -k`, False off (18 enables them by default), None the major's default."""
    uid, gid = pg_ids()
    base = Path(tempfile.mkdtemp(prefix="kb-pgcluster-"))
    os.chown(base, uid, gid)
    os.chmod(base, 0o755)  # tar of the data directory and the WAL copy run as root and postgres
    c = PgCluster(base, bindir=bindir)
    flags = {True: ["--data-checksums"], False: ["--no-data-checksums"], None: []}[checksums]
    if checksums is False and tool_major(bindir, "postgres") in ("15", "16", "17"):
        flags = []  # off is these majors' default (and their initdb has no --no-data-checksums)
    as_postgres([str(bindir / "initdb"), "-D", str(c.datadir), "-A", "trust", "-U", "postgres", "--no-sync",
                 "-E", "UTF8", "--locale=C", *flags])  # fmt: skip
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
