# Every PostgreSQL a backup may hold, end to end: real servers of 15 (Debian's), 16, 17 and 18 (the
# npm builds `make deps` installs in /opt/kloset-blocks/pg/<major>), each backed up with data
# checksums on and off
# (tests/pg_majors.py), all eight snapshots in ONE store, so that each must run with its own
# binaries; plus plakar's postgres+bin layout (/manifest.json, the backup under /data).
#
# Oracle: each live server's answers just before its backup (sample.LIVE_QUERIES, its
# server_version_num and data_checksums). Through `psql` (every snapshot; the 16-18 binaries given
# by --pg-bindir or by $KLOSET_BLOCKS_PG_BINDIR), `pg start` (each major) and `query` (all at once).
# 18's io_method: the checksums-off backup carries io_method=sync (ALTER SYSTEM on the live server),
# the other one io_uring, which the npm build cannot do (worker is used, with a notice); 16-on and
# 18-on also carry settings that cannot work here (a missing preloaded library, 64TB of
# shared_buffers, an archive_command): the start overrides them with a notice, never fails.
# `check` (amcheck of everything) on one snapshot per major and on the golden fixture is clean and
# counts what it checked; on a copy of the store with one byte flipped inside a chunk of
# pgbench_accounts (found with the reader) it names that table as damaged, and a query that reads
# it fails: never wrong rows.
from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kloset_blocks.store import open_store
from kloset_blocks.store.codec import RT_CHUNK
from kloset_blocks.writer.pack import bucket_path
from kloset_blocks.writer.store import add_snapshot, write_store
from tests.pg_majors import (
    BINDIRS,
    MAJORS,
    PG_BINDIR_ENV,
    QUERIES,
    Backup,
    postgres_bin_tar,
    take_backups,
)
from tests.test_e2e_pg import (
    GOLDEN,
    GOLDEN_A,
    assert_nothing_left,
    cli,
    one_error_line,
    pg_state,
    psql_args,
    tree_digest,
)

pytestmark = [pytest.mark.root, pytest.mark.slow]

ENV = {"KLOSET_BLOCKS_PG_BINDIR": PG_BINDIR_ENV}
NAMES = [f"{m}-{c}" for m in MAJORS for c in ("on", "off")]
GOLDEN_SNAPS = {"golden-A": (GOLDEN, GOLDEN_A)}


@dataclass
class Majors:
    work: Path
    store: Path = Path()  # every backup, one snapshot each
    plakar: Path = Path()  # postgres+bin layouts: 17-on; and one whose manifest lies about its major
    backups: dict[str, Backup] = field(default_factory=dict)
    snaps: dict[str, str] = field(default_factory=dict)  # name -> 64-hex id
    digests: dict[Path, dict[str, str]] = field(default_factory=dict)


@pytest.fixture(scope="module")
def majors(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Majors]:
    m = Majors(tmp_path_factory.mktemp("majors"))
    m.store, m.plakar = m.work / "store", m.work / "plakar"
    m.backups = take_backups(m.work, NAMES)
    for name in NAMES:
        add = write_store if not m.snaps else add_snapshot
        m.snaps[name] = add(m.store, m.backups[name].tar, seed=len(m.snaps) + 1)
    b = m.backups["17-on"]
    m.snaps["plakar-17"] = write_store(m.plakar, postgres_bin_tar(b, m.work / "pb.tar"), seed=20)
    lying = Backup("lying", "17", True, b.tar, manifest={**b.manifest, "server_version": "16.4",
                                                          "server_version_num": 160004})  # fmt: skip
    m.snaps["lying"] = add_snapshot(m.plakar, postgres_bin_tar(lying, m.work / "lie.tar"), seed=21)
    for p in m.work.glob("*.tar"):
        p.unlink()
    m.digests = {p: tree_digest(p) for p in (m.store, m.plakar)}
    yield m


@pytest.fixture(autouse=True)
def stores_unchanged(majors: Majors) -> Iterator[None]:
    yield
    for root, digest in majors.digests.items():
        assert tree_digest(root) == digest, f"{root} changed"


def answers(stdout: str) -> dict[str, str]:
    return dict(zip(QUERIES, stdout.splitlines(), strict=True))


@pytest.mark.parametrize("name", NAMES)
def test_psql_answers_equal_live_answers(majors: Majors, run_root: Path, name: str) -> None:
    b = majors.backups[name]
    # The 16-18 binaries: by --pg-bindir (repeated: one directory per major) or by the environment.
    by_option = name.endswith("-off")
    opts = [a for m in MAJORS if m != "15" for a in ("--pg-bindir", str(BINDIRS[m]))] if by_option else []
    res = cli(run_root, "psql", str(majors.store), majors.snaps[name][:12], *opts, "--",
              *psql_args(list(QUERIES.values())), env={} if by_option else ENV)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert answers(res.stdout) == b.live
    assert b.live["version_num"].startswith(b.major)
    assert b.live["checksums"] == ("on" if b.checksums else "off")
    if b.major != "15":  # the npm builds have no psql: Debian's 15 is used, and we are told
        assert f"using psql 15, older than the PostgreSQL {b.major} server" in res.stderr
    assert_nothing_left(run_root, majors.store)


def test_without_its_binaries_a_major_is_one_line(majors: Majors, run_root: Path) -> None:
    res = cli(run_root, "psql", str(majors.store), majors.snaps["17-on"][:12], "--", "-c", "select 1")
    line = one_error_line(res)
    assert "PostgreSQL 17, whose server is not installed here" in line
    assert "postgresql-17 (Debian/Ubuntu)" in line and "postgresql17-server" in line and "--pg-bindir" in line
    # A directory of another major is not taken for it, and the error says what it holds.
    res = cli(run_root, "psql", str(majors.store), majors.snaps["17-on"][:12], "--pg-bindir",
              str(BINDIRS["18"]), "--", "-c", "select 1")  # fmt: skip
    assert f"{BINDIRS['18']} holds PostgreSQL 18" in one_error_line(res)
    assert_nothing_left(run_root, majors.store)


def sock_psql(state: dict, sql: str, db: str = "shop") -> str:
    rec = state["postgres"]
    p = subprocess.run(
        ["runuser", "-u", "postgres", "--", str(BINDIRS["15"] / "psql"), "-XAtq", "-v", "ON_ERROR_STOP=1",
         "-h", rec["sockdir"], "-p", str(rec["port"]), "-d", db, "-c", sql],
        capture_output=True, text=True, cwd="/", timeout=60,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


@pytest.mark.parametrize("name", ["16-on", "17-on", "18-off", "18-on"])  # 15's pg start: test_e2e_pg
def test_pg_start_runs_each_major_with_its_binaries(majors: Majors, run_root: Path, name: str) -> None:
    b = majors.backups[name]
    started = cli(run_root, "pg", "start", "--read-only", str(majors.store), majors.snaps[name][:12], env=ENV)
    assert started.returncode == 0, started.stderr
    state = pg_state(run_root)
    try:
        assert Path(state["postgres"]["bindir"]) == BINDIRS[b.major]
        for key in ("accounts", "items", "point", "checksums", "version_num"):
            db, sql = QUERIES[key]
            assert sock_psql(state, sql, db) == b.live[key], key
        if b.major == "18":  # 18-on asked for io_uring, which this server cannot do
            assert sock_psql(state, "show io_method") == (b.io_method or "worker")
        if name in ("16-on", "18-on"):  # what cannot work here was replaced, and we were told
            assert sock_psql(state, "show shared_preload_libraries") == ""
            assert sock_psql(state, "show shared_buffers") == "128MB"
            assert "replaced by ours: " in started.stderr and "shared_preload_libraries" in started.stderr
            assert "shared_buffers (more than a quarter of this host's memory" in started.stderr
            if b.major == "18":
                assert "io_method (io_uring is not available here: worker is used)" in started.stderr
        log = Path(state["postgres"]["log"]).read_text()
        assert "starting backup recovery with redo LSN" in log or "redo starts at" in log, log
    finally:
        stopped = cli(run_root, "pg", "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert_nothing_left(run_root, majors.store)


def test_query_across_every_major(majors: Majors, run_root: Path) -> None:
    sql = (
        "select current_setting('server_version_num') as v, current_setting('data_checksums') as c, "
        "(select count(*) || '|' || sum(abalance) from pgbench_accounts) as accounts"
    )
    res = cli(
        run_root, "query", str(majors.store), "--db", "shop", "--format", "json", sql, env=ENV, timeout=600
    )
    assert res.returncode == 0, res.stderr
    by_id = {r["id"]: r for r in json.loads(res.stdout)["snapshots"]}
    for name in NAMES:
        r, b = by_id[majors.snaps[name]], majors.backups[name]
        assert r["status"] == "rows", (name, r)
        assert r["rows"] == [[b.live["version_num"], b.live["checksums"], b.live["accounts"]]], name
    assert_nothing_left(run_root, majors.store)


# --- plakar's postgres+bin layout ------------------------------------------------------------------


def test_snapshots_shows_the_manifest_without_starting_anything(majors: Majors, run_root: Path) -> None:
    res = cli(run_root, "snapshots", str(majors.plakar))
    assert res.returncode == 0, res.stderr
    (line,) = [ln for ln in res.stdout.splitlines() if ln.startswith(majors.snaps["plakar-17"][:8])]
    version = majors.backups["17-on"].manifest["server_version"]
    assert line.endswith(f"  PostgreSQL {version}, checksums on, databases postgres,shop"), line
    plain = cli(run_root, "snapshots", str(majors.store))
    assert "PostgreSQL" not in plain.stdout  # no manifest: nothing made up
    assert list(run_root.iterdir()) == []


def test_postgres_bin_layout_answers(majors: Majors, run_root: Path) -> None:
    b = majors.backups["17-on"]
    res = cli(run_root, "psql", str(majors.plakar), majors.snaps["plakar-17"][:12], "--",
              *psql_args(list(QUERIES.values())), env=ENV)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert answers(res.stdout) == b.live
    assert_nothing_left(run_root, majors.plakar)


def test_a_manifest_that_contradicts_pg_version_is_refused(majors: Majors, run_root: Path) -> None:
    res = cli(
        run_root, "psql", str(majors.plakar), majors.snaps["lying"][:12], "--", "-c", "select 1", env=ENV
    )
    line = one_error_line(res)
    assert re.search(r"manifest\.json says PostgreSQL 16\.4 but its PG_VERSION says 17", line), line
    assert res.stderr.count("\n") == 1  # found out before anything started
    assert_nothing_left(run_root, majors.plakar)


# --- check: amcheck of a whole backup ----------------------------------------------------------------

CHECK_LINE = re.compile(
    r"^checked (\d+) relations \(heap tables and B-tree indexes, --heapallindexed\) in (\d+) database\(s\): "
    r"(\d+) pages",
    re.M,
)


def checked(stdout: str) -> tuple[int, int, int]:
    m = CHECK_LINE.search(stdout)
    assert m, stdout
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


# One snapshot per major (checksums on for two, off for two) and Kloset's own golden fixture; the
# encrypted golden store holds the same backup (its unlocking is test_e2e_pg's).
@pytest.mark.parametrize("name", ["15-off", "16-on", "17-off", "18-on", "golden-A"])
def test_check_is_clean_on_every_fixture(majors: Majors, run_root: Path, name: str) -> None:
    env = dict(ENV)
    if name.startswith("golden"):
        store, snap = GOLDEN_SNAPS[name]
        checksums, pages_at_least = "no data checksums", 1500  # pgbench -i -s 2: 3279 pages in accounts
    else:
        store, snap = majors.store, majors.snaps[name]
        b = majors.backups[name]
        checksums = "data checksums verified on every page read" if b.checksums else "no data checksums"
        pages_at_least = 1640  # pgbench_accounts alone (scale 1)
    res = cli(run_root, "check", str(store), snap[:12], env=env, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (
        f"PostgreSQL {name.split('-')[0] if not name.startswith('golden') else '15'}, {checksums}"
        in res.stdout
    )
    relations, databases, pages = checked(res.stdout)
    assert databases == 3 and relations > 100 and pages >= pages_at_least, res.stdout
    assert res.stdout.rstrip().endswith("clean: no damage found")
    assert re.search(r"^fetched [\d.]+ [KM]iB of [\d.]+ MiB", res.stdout, re.M), res.stdout
    assert_nothing_left(run_root, store)


def flip_a_byte_of(store: Path, snap: str, path: str) -> None:
    """In a copy of a store: one byte inside the packfile blob of a chunk in the middle of path."""
    with open_store(str(store)) as st:
        f = st.open_snapshot(snap).open_file(path)
        loc = st.locate(RT_CHUNK, f.macs[len(f.macs) // 2])
    packfile = bucket_path(store, "packfiles", loc.packfile)
    with open(packfile, "r+b") as out:
        out.seek(loc.offset + loc.length // 2)
        byte = out.read(1)
        out.seek(-1, 1)
        out.write(bytes([byte[0] ^ 0x5A]))


def test_check_names_the_damaged_relation(majors: Majors, run_root: Path, tmp_path: Path) -> None:
    name = "16-off"
    damaged = tmp_path / "damaged"
    shutil.copytree(majors.store, damaged)
    b, snap = majors.backups[name], majors.snaps[name]
    flip_a_byte_of(damaged, snap, "/" + b.live["accounts_file"])
    res = cli(run_root, "check", str(damaged), snap[:12], env=ENV, timeout=600)
    assert res.returncode == 1, res.stdout + res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("damaged ")]
    assert lines and all("shop.public.pgbench_accounts" in ln for ln in lines), res.stdout
    assert "Input/output error" in lines[0] or "could not read block" in lines[0], lines
    assert "Traceback" not in res.stderr
    relations, _, _ = checked(res.stdout)
    assert relations > 100  # the other relations were still checked
    # The same damage through SQL: an error, never a wrong sum.
    q = cli(run_root, "psql", str(damaged), snap[:12], "--", "-XAtq", "-d", "shop",
            "-c", QUERIES["accounts"][1], env=ENV)  # fmt: skip
    assert q.returncode != 0 and q.stdout.strip() == "", q.stdout
    assert re.search(r"could not read block|Input/output error", q.stderr), q.stderr
    assert_nothing_left(run_root, damaged)
