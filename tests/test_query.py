# End-to-end tests of `kloset-blocks query`, all real parts: a real PostgreSQL 15 cluster, five
# pg_basebackup tars (-X fetch) taken while rows are inserted, updated and deleted, a store written
# by the fixture writer, the real CLI in another process, the real plugin under one nbdkit, qemu,
# FUSE, loop, a kernel ext4 mount, and Postgres on each snapshot.
#
# Oracle: the live server's answers (json_agg, a path independent of psql --csv and our parser)
# recorded just before each backup; for the golden fixture, its README. Damage is done to a COPY of
# the store; the original's digest must not change. After every run nothing may be left behind.
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kloset_blocks.demo import sample
from kloset_blocks.host.procs import processes_mentioning
from kloset_blocks.host.rundir import RUN_ROOT_ENV
from kloset_blocks.store import codec as c
from kloset_blocks.store import open_store
from kloset_blocks.writer.store import add_snapshot, write_store

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO.parent / "shared" / "fixtures" / "golden-plain"
GOLDEN_A, GOLDEN_B = "bf6afbae", "3b116f40"

pytestmark = [pytest.mark.root, pytest.mark.slow]

WATCHED = (7, 42, 101, 500)
ROWS_SQL = f"select id, name, note from people where id in {WATCHED} order by id"
ORACLE_SQL = (
    "select coalesce(json_agg(json_build_array(id::text, name, note) order by id), '[]') "
    f"from people where id in {WATCHED}"
)
# What happens before each of the five backups (the first creates the table).
STEPS = [
    "create table people (id int primary key, name text not null, note text);"
    "insert into people select g, 'p-' || g, 'n' || g from generate_series(1, 100) g;",
    "delete from people where id = 42; update people set name = 'seven-v2' where id = 7;"
    "insert into people values (101, 'p-101', 'a,\"quoted\"\nnote');",
    "insert into people values (42, 'forty-two-again', ''); delete from people where id = 101;",
    "update people set name = 'seven-v3', note = null where id = 7; delete from people where id = 42;",
    "delete from people where id = 7; insert into people values (500, 'p-500', null);",
]


@dataclass
class Snaps:
    work: Path
    store: Path = Path()
    ids: list[str] = field(default_factory=list)  # backup order, 64 hex
    live: list[list[list[str | None]]] = field(default_factory=list)  # rows per backup
    digest: str = ""

    def short(self, i: int) -> str:
        return self.ids[i][:8]


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


@pytest.fixture(scope="module")
def snaps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Snaps]:
    s = Snaps(tmp_path_factory.mktemp("query"))
    s.store = s.work / "store"
    cluster = sample.make_cluster(1)
    tars = []
    try:
        last = 0.0
        for i, step in enumerate(STEPS):
            cluster.psql(step, "shop")
            s.live.append(json.loads(cluster.psql(ORACLE_SQL, "shop")))
            time.sleep(max(0.0, 1.05 - (time.time() - last)))  # tar mtimes are whole seconds
            last = time.time()
            tars.append(cluster.basebackup(s.work / f"{i}.tar", wal="fetch"))
    finally:
        cluster.cleanup()
    for i, tar in enumerate(tars):
        if i == 0:
            s.ids.append(write_store(s.store, tar, seed=i))
        else:
            s.ids.append(add_snapshot(s.store, tar, seed=i))
        tar.unlink()
    assert len({json.dumps(x) for x in s.live}) == 5, "every backup must differ in the watched rows"
    s.digest = tree_digest(s.store)
    yield s
    assert tree_digest(s.store) == s.digest, "the store changed"


def query(
    run_root: Path, store: Path, sql: str, *args: str, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """The real CLI in another process; afterwards nothing of the run may be left."""
    base = {k: v for k, v in os.environ.items() if k != "PLAKAR_PASSPHRASE"}
    res = subprocess.run(
        [sys.executable, "-m", "kloset_blocks", "query", f"fs:{store}", sql, *args],
        cwd=REPO,
        env={**base, RUN_ROOT_ENV: str(run_root)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert list(run_root.iterdir()) == [], f"run directory left behind\n{res.stderr}"
    assert str(run_root) not in Path("/proc/mounts").read_text(), "mount left behind"
    assert processes_mentioning(str(run_root) + "/") == [], "process left running"
    assert processes_mentioning(f"store=fs:{store}") == [], "nbdkit left running"
    return res


def as_json(res: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


# --- the golden fixture (written by Kloset's own code): its README is the oracle ------------------


def test_golden_customer_150_is_in_a_only(run_root: Path) -> None:
    res = query(
        run_root,
        GOLDEN,
        "select id, name, email from customers where id = 150",
        "--db",
        "shop",
        "--format",
        "json",
    )
    doc = as_json(res)
    got = {s["short_id"]: (s["status"], s["rows"]) for s in doc["snapshots"]}
    assert got == {
        GOLDEN_B: ("no rows", []),
        GOLDEN_A: ("rows", [["150", "customer-150", "customer150@example.com"]]),
    }
    assert [s["short_id"] for s in doc["snapshots"]] == [GOLDEN_B, GOLDEN_A]  # newest first
    assert doc["summary"]["with_rows"] == [GOLDEN_A] and doc["summary"]["failed"] == []


def test_golden_table_output_and_summary(run_root: Path) -> None:
    res = query(run_root, GOLDEN, "select count(*), sum(id) from customers", "--db", "shop")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.index(f"== snapshot {GOLDEN_B}") < out.index(f"== snapshot {GOLDEN_A}")
    assert "\n 4900  | 12487550\n" in out and "\n 5000  | 12502500\n" in out
    assert f"with rows: {GOLDEN_B} {GOLDEN_A}" in out


# --- five snapshots of a changing table -----------------------------------------------------------


def test_finds_exactly_the_snapshots_that_hold_the_row(snaps: Snaps, run_root: Path) -> None:
    res = query(run_root, snaps.store, "select id, name, note from people where id = 42", "--db", "shop",
                "--format", "json")  # fmt: skip
    doc = as_json(res)
    order = [s["id"] for s in doc["snapshots"]]
    assert order == snaps.ids[::-1]  # newest first
    expected = {
        snaps.ids[i]: [r for r in snaps.live[i] if r[0] == "42"] for i in range(5)
    }  # fmt: skip
    assert {s["id"]: s["rows"] for s in doc["snapshots"]} == expected
    holders = [snaps.short(i) for i in (2, 0)]  # 42 was deleted before 1, back in 2, gone in 3
    assert doc["summary"]["with_rows"] == holders
    assert sorted(doc["summary"]["without_rows"]) == sorted(snaps.short(i) for i in (1, 3, 4))
    # the values, NULL and '' distinct: backup 2 holds (42, 'forty-two-again', '')
    assert expected[snaps.ids[2]] == [["42", "forty-two-again", ""]]


def test_all_watched_rows_json_with_jobs(snaps: Snaps, run_root: Path) -> None:
    doc = as_json(query(run_root, snaps.store, ROWS_SQL, "--db", "shop", "--format", "json", "--jobs", "3"))
    got = {s["id"]: s["rows"] for s in doc["snapshots"]}
    assert got == {snaps.ids[i]: snaps.live[i] for i in range(5)}
    assert all(s["columns"] == ["id", "name", "note"] for s in doc["snapshots"])
    assert [s["id"] for s in doc["snapshots"]] == snaps.ids[::-1]  # order kept with --jobs


def test_csv_output_parses(snaps: Snaps, run_root: Path) -> None:
    sel = ",".join(snaps.short(i) for i in (1, 3))
    res = query(run_root, snaps.store, ROWS_SQL, "--db", "shop", "--format", "csv", "--snapshots", sel, "-q")
    assert res.returncode == 0, res.stderr
    records = list(csv.reader(io.StringIO(res.stdout)))
    assert records[0] == ["snapshot", "date", "id", "name", "note"]
    by_snap: dict[str, list[list[str]]] = {}
    for rec in records[1:]:
        by_snap.setdefault(rec[0], []).append(rec[2:])
    # csv has no NULL: a NULL is an empty field
    for i in (1, 3):
        assert by_snap[snaps.short(i)] == [["" if v is None else v for v in r] for r in snaps.live[i]]
    assert list(by_snap) == [snaps.short(3), snaps.short(1)]  # newest first
    assert any("\n" in r[2] for r in by_snap[snaps.short(1)])  # the quoted, multi-line note survived


def test_since_until_select_by_date(snaps: Snaps, run_root: Path) -> None:
    with open_store(f"fs:{snaps.store}") as st:
        times = {i.hex_id: i.timestamp for i in st.snapshots()}
    t1, t3 = times[snaps.ids[1]], times[snaps.ids[3]]
    since, until = t1.strftime("%Y-%m-%dT%H:%M:%S.%f"), t3.isoformat()
    res = query(run_root, snaps.store, "select count(*) from people", "--db", "shop", "--format", "json",
                "--since", since, "--until", until, "--oldest-first")  # fmt: skip
    doc = as_json(res)
    assert [s["id"] for s in doc["snapshots"]] == snaps.ids[1:4]


# --- one damaged snapshot does not stop the others ------------------------------------------------


def flip(store_dir: Path, store: Any, rtype: int, mac: bytes) -> None:
    loc = store.locate(rtype, mac)
    path = Path(store.packfiles.path(loc.packfile))
    with open(path, "r+b") as f:
        pos = c.HEADER_SIZE + loc.offset + loc.length // 2
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0xFF]))


def chunk_set(store: Any, ident: str) -> set[bytes]:
    snap = store.open_snapshot(ident)
    macs: set[bytes] = set()
    for p, e in snap.walk(b"/"):
        if e.is_reg and e.size:
            macs.update(snap.open_file(p).macs)
    return macs


def vfs_type(store: Any, mac: bytes) -> int:
    for rtype in (c.RT_VFS_BTREE, c.RT_BTREE_ROOT, c.RT_VFS_NODE, c.RT_BTREE_NODE):
        if store.index.locations(rtype, mac):
            return rtype
    raise AssertionError("VFS root blob not found")


@pytest.fixture(scope="module")
def damaged(snaps: Snaps) -> Iterator[tuple[Path, dict[str, str]]]:
    """A copy of the store where snapshot 1's VFS root and every chunk only snapshot 3 has are
    damaged, plus a snapshot of a PostgreSQL 99 data directory and one of no data directory."""
    copy = snaps.work / "damaged"
    shutil.copytree(snaps.store, copy)
    pg99 = snaps.work / "pg99"
    (pg99 / "base").mkdir(parents=True)
    (pg99 / "PG_VERSION").write_text("99\n")
    notpg = snaps.work / "notpg"
    (notpg / "docs").mkdir(parents=True)
    (notpg / "docs" / "hello.txt").write_text("hello\n")
    time.sleep(1.05)
    extra = {"pg99": add_snapshot(copy, pg99, seed=99)[:8]}
    time.sleep(1.05)
    extra["notpg"] = add_snapshot(copy, notpg, seed=98)[:8]
    with open_store(f"fs:{copy}") as st:
        sets = [chunk_set(st, i) for i in snaps.ids]
        only3 = sets[3] - set().union(*(sets[i] for i in (0, 1, 2, 4)))
        assert only3, "snapshot 3 has no chunk of its own"
        for mac in only3:
            flip(copy, st, c.RT_CHUNK, mac)
        roots = [st.find_snapshot(i).vfs_root for i in snaps.ids]
        assert roots.count(roots[1]) == 1
        flip(copy, st, vfs_type(st, roots[1]), roots[1])
    yield copy, extra


def test_damaged_snapshots_are_reported_and_the_others_answer(
    snaps: Snaps, damaged: tuple[Path, dict[str, str]], run_root: Path
) -> None:
    copy, extra = damaged
    res = query(run_root, copy, ROWS_SQL, "--db", "shop", "--format", "json", "--timeout", "60")
    assert res.returncode == 1
    doc = json.loads(res.stdout)
    by_id = {s["short_id"]: s for s in doc["snapshots"]}
    assert len(by_id) == 7
    for i in (0, 2, 4):  # untouched: the right answers
        assert by_id[snaps.short(i)]["rows"] == snaps.live[i], by_id[snaps.short(i)]
    failed = {snaps.short(1), snaps.short(3), extra["pg99"], extra["notpg"]}
    assert set(doc["summary"]["failed"]) == failed
    assert "MAC mismatch" in by_id[snaps.short(1)]["error"]
    assert by_id[snaps.short(3)]["error"]  # Postgres' words for the I/O error it met
    assert "PostgreSQL 99" in by_id[extra["pg99"]]["error"]
    assert "not a PostgreSQL data directory" in by_id[extra["notpg"]]["error"]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("kloset-blocks: query failed on 4 snapshot(s): ")
    assert set(last.split(": ", 1)[1].split(": ", 1)[1].split(", ")) == failed
    assert "Traceback" not in res.stderr


# --- the persistent on-disk cache -----------------------------------------------------------------


def test_second_run_with_cache_dir_fetches_far_less(snaps: Snaps, run_root: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    args = ("--db", "shop", "--format", "json", "--cache-dir", str(cache))
    first = as_json(query(run_root, snaps.store, ROWS_SQL, *args))
    second = as_json(query(run_root, snaps.store, ROWS_SQL, *args))
    cold, warm = first["summary"]["fetched_bytes"], second["summary"]["fetched_bytes"]
    assert cold > 1 << 20
    assert warm < cold / 100, (warm, cold)
    for doc in (first, second):
        assert {s["id"]: s["rows"] for s in doc["snapshots"]} == {
            snaps.ids[i]: snaps.live[i] for i in range(5)
        }
    # and the snapshots after the first share the run's cache: each fetches little that is new
    firsts = [s["fetched_bytes"] for s in first["snapshots"]]
    assert all(f < firsts[0] for f in firsts[1:]), firsts
