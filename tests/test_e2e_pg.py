# End to end with the real plugin: `kloset-blocks psql / pg start / pg stop / mount / down`, as a user
# runs them (the CLI in another process), on Kloset stores written from a real PostgreSQL 15 cluster.
#
# Oracle: the live server's answers just before each backup. Snapshot A is pg_basebackup -F tar -X
# fetch -c fast written with the project's writer (plaintext, and encrypted with cheap KDF settings);
# then, on the live server, a DELETE, an UPDATE and a CHECKPOINT; snapshot B is the next backup, added
# to the plaintext store (backups spaced >= 1 s apart: references §3.4, tar mtimes are whole seconds).
# The golden fixture (written by Kloset's own Go code) is checked against its README's answers.
#
# "Nothing left behind" is checked against the kernel (/proc/mounts, sysfs loop backing files), /proc
# (command lines naming the run root or the store) and the run root (empty). Every store's files must be
# byte-identical (sha256) after every test.
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kloset_blocks.demo import sample
from kloset_blocks.host.procs import proc_alive, processes_mentioning
from kloset_blocks.host.rundir import RUN_ROOT_ENV
from kloset_blocks.store import codec as c
from kloset_blocks.store import open_store
from kloset_blocks.store.passphrase import KEY_ENV
from kloset_blocks.writer.store import add_snapshot, write_store
from tests.conftest import FIXTURES, REPO

pytestmark = [pytest.mark.root, pytest.mark.slow]

PASSPHRASE = "tr0ub4dor & 3, not in argv"
GOLDEN = FIXTURES / "golden-plain"
GOLDEN_A, GOLDEN_B = "bf6afbae", "3b116f40"

# Between A and B, on the live server.
CHANGES = """
delete from items where id <= 10;
update pgbench_accounts set abalance = 42 where aid <= 10;
checkpoint;
"""
# (database, query): one line each, whatever the snapshot (coalesce: no row still prints a line).
QUERIES: dict[str, tuple[str, str]] = {
    **sample.LIVE_QUERIES,
    "item5": ("shop", "select coalesce((select name from items where id = 5), '<none>')"),
    "low_accounts": ("shop", "select sum(abalance) from pgbench_accounts where aid <= 20"),
}
# The golden fixture's README: answers on the live server just before each backup.
GOLDEN_QUERIES = [
    "select count(*), sum(id) from customers",
    "select coalesce((select name from customers where id = 150), '<none>')",
    "select sum(abalance) from pgbench_accounts",
    "select count(*) from pgbench_accounts",
]
GOLDEN_ANSWERS = {
    GOLDEN_A: ["5000|12502500", "customer-150", "0", "200000"],
    GOLDEN_B: ["4900|12487550", "<none>", "420", "200000"],
}


@dataclass
class Stores:
    work: Path
    plain: Path = Path()
    enc: Path = Path()
    faults: Path = Path()
    snaps: dict[str, str] = field(default_factory=dict)  # name -> 64-hex id
    live: dict[str, dict[str, str]] = field(default_factory=dict)  # snapshot name -> answers
    sizes: dict[str, int] = field(default_factory=dict)
    digests: dict[Path, dict[str, str]] = field(default_factory=dict)


def tree_digest(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def live_answers(cluster: sample.PgCluster) -> dict[str, str]:
    return {name: cluster.psql(sql, db) for name, (db, sql) in QUERIES.items()}


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stores]:
    s = Stores(tmp_path_factory.mktemp("e2e"))
    s.plain, s.enc, s.faults = s.work / "plain", s.work / "enc", s.work / "faults"
    cluster = sample.make_cluster(1)
    try:
        s.live["A"] = live_answers(cluster)
        tar_a = cluster.basebackup(s.work / "a.tar", wal="fetch")
        t_a = time.monotonic()
        tar_none = cluster.basebackup(s.work / "none.tar", wal="none")
        cluster.psql(CHANGES, "shop")
        s.live["B"] = live_answers(cluster)
        time.sleep(max(0.0, 1.1 - (time.monotonic() - t_a)))
        tar_b = cluster.basebackup(s.work / "b.tar", wal="fetch")
    finally:
        cluster.cleanup()
    assert s.live["A"] != s.live["B"]
    s.snaps["A"] = write_store(s.plain, tar_a, seed=1)
    s.snaps["B"] = add_snapshot(s.plain, tar_b, seed=2)
    s.snaps["Aenc"] = write_store(
        s.enc, tar_a, passphrase=PASSPHRASE.encode(), kdf_time=1, kdf_memory_kib=8192, seed=3
    )
    # The fault store: a snapshot that is no data directory, one whose PG_VERSION says 99, and a
    # backup taken without its WAL.
    plain_dir = s.work / "plain-dir"
    (plain_dir / "docs").mkdir(parents=True)
    (plain_dir / "docs" / "hello.txt").write_text("hello\n")
    pg99 = s.work / "pg99"
    (pg99 / "base").mkdir(parents=True)
    (pg99 / "PG_VERSION").write_text("99\n")
    s.snaps["notpg"] = write_store(s.faults, plain_dir, seed=4)
    s.snaps["pg99"] = add_snapshot(s.faults, pg99, seed=5)
    s.snaps["nowal"] = add_snapshot(s.faults, tar_none, seed=6)
    for name in ("a.tar", "b.tar", "none.tar"):
        (s.work / name).unlink()
    s.sizes = {"A": tar_size_of(s.plain, s.snaps["A"])}
    s.digests = {p: tree_digest(p) for p in (s.plain, s.enc, s.faults, GOLDEN)}
    yield s


def tar_size_of(store: Path, snap: str) -> int:
    from kloset_blocks.store import open_store

    with open_store(str(store)) as st:
        return st.find_snapshot(snap).size


@pytest.fixture(autouse=True)
def stores_unchanged(stores: Stores) -> Iterator[None]:
    yield
    for root, digest in stores.digests.items():
        assert tree_digest(root) == digest, f"{root} changed"


def cli(
    run_root: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """The real `kloset-blocks`, in another process, with a private run root."""
    base = {k: v for k, v in os.environ.items() if k != "PLAKAR_PASSPHRASE"}
    return subprocess.run(
        [sys.executable, "-m", "kloset_blocks", *args],
        cwd=REPO,
        env={**base, RUN_ROOT_ENV: str(run_root), **(env or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def psql_args(queries: list[tuple[str, str]]) -> list[str]:
    """One psql session per database is not needed: every query names its database via \\c."""
    args = ["-XAtq", "-v", "ON_ERROR_STOP=1", "-d", queries[0][0]]
    db = queries[0][0]
    for qdb, sql in queries:
        if qdb != db:
            args += ["-c", f"\\c {qdb}"]
            db = qdb
        args += ["-c", sql]
    return args


def assert_nothing_left(run_root: Path, *stores: Path) -> None:
    assert list(run_root.iterdir()) == [], "run directory left behind"
    assert str(run_root) not in Path("/proc/mounts").read_text(), "mount left behind"
    for d in Path("/sys/block").glob("loop*"):
        backing = d / "loop" / "backing_file"
        if backing.exists():
            assert not backing.read_text().startswith(str(run_root)), f"{d.name} left attached"
    assert processes_mentioning(str(run_root) + "/") == [], "process left running"
    for store in stores:
        assert processes_mentioning(f"store={store}") == [], f"nbdkit on {store} left running"


def fetched_line(stderr: str) -> tuple[float, float, float]:
    """(fetched MiB, logical MiB, percent) from "fetched 4.1 MiB of 62 MiB (6.6 %) from the store"."""
    m = re.search(r"^fetched ([\d.]+) (KiB|MiB) of ([\d.]+) MiB \(([\d.]+) %\) from the store$", stderr, re.M)
    assert m, stderr
    scale = 1 / 1024 if m.group(2) == "KiB" else 1
    return float(m.group(1)) * scale, float(m.group(3)), float(m.group(4))


def one_error_line(res: subprocess.CompletedProcess[str]) -> str:
    """Exit 1 and exactly one error line, the last (any others are progress lines)."""
    assert res.returncode == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("kloset-blocks: ")]
    assert errors == lines[-1:], res.stderr
    assert "Traceback" not in res.stderr
    return lines[-1]


# --- answers -------------------------------------------------------------------------------------------

CASES = [
    # (id, store attribute, snapshot name, live answers, extra args, extra env)
    ("A-plain", "plain", "A", "A", [], {}),
    ("B-plain", "plain", "B", "B", [], {}),
    ("A-encrypted-file", "enc", "Aenc", "A", ["--passphrase-file", "{pwfile}"], {}),
    ("A-encrypted-env", "enc", "Aenc", "A", [], {"PLAKAR_PASSPHRASE": PASSPHRASE}),
    # A stale derived key in the shell is for no one: the explicit option wins (it used to be read).
    (
        "A-encrypted-file-stale-key",
        "enc",
        "Aenc",
        "A",
        ["--passphrase-file", "{pwfile}"],
        {KEY_ENV: "00" * 32},
    ),
]


@pytest.mark.parametrize(("store_attr", "snap", "live", "extra", "env"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_psql_answers_equal_live_answers(
    stores: Stores,
    run_root: Path,
    tmp_path: Path,
    store_attr: str,
    snap: str,
    live: str,
    extra: list[str],
    env: dict[str, str],
) -> None:
    pwfile = tmp_path / "pw"
    pwfile.write_text(PASSPHRASE + "\n")
    store = getattr(stores, store_attr)
    names = list(QUERIES)
    t0 = time.monotonic()
    res = cli(
        run_root,
        "psql", f"fs:{store}", stores.snaps[snap][:10],
        *[a.replace("{pwfile}", str(pwfile)) for a in extra], "--",
        *psql_args([QUERIES[n] for n in names]),
        env=env,
    )  # fmt: skip
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stderr
    assert dict(zip(names, res.stdout.splitlines(), strict=True)) == stores.live[live]
    for phase in ("open", "serve", "overlay", "attach", "mount", "start", "recovery", "ready", "teardown"):
        assert re.search(rf"^{phase} \d+\.\d\d s$", res.stderr, re.M), (phase, res.stderr)
    fetched, logical, pct = fetched_line(res.stderr)
    assert logical == pytest.approx(stores.sizes["A"] / 2**20, rel=0.1)
    assert 0 < fetched < logical / 2 and 0 < pct < 50
    print(f"{snap}: psql {took:.2f} s, fetched {fetched:.1f} of {logical:.0f} MiB")
    assert_nothing_left(run_root, store)


@pytest.mark.parametrize("snap", [GOLDEN_A, GOLDEN_B])
def test_golden_fixture_answers(run_root: Path, snap: str) -> None:
    res = cli(run_root, "psql", str(GOLDEN), snap, "--", *psql_args([("shop", q) for q in GOLDEN_QUERIES]))
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == GOLDEN_ANSWERS[snap]
    assert_nothing_left(run_root, GOLDEN)


def test_read_only_refuses_writes(stores: Stores, run_root: Path) -> None:
    res = cli(run_root, "psql", str(stores.plain), stores.snaps["A"][:8], "--read-only", "--",
              "-XAtq", "-v", "ON_ERROR_STOP=1", "-d", "shop", "-c", QUERIES["items"][1],
              "-c", "insert into items values (1000, 'x')")  # fmt: skip
    assert res.returncode != 0
    assert res.stdout.strip() == stores.live["A"]["items"]
    assert "cannot execute INSERT in a read-only transaction" in res.stderr
    assert_nothing_left(run_root, stores.plain)


def pg_state(run_root: Path) -> dict[str, Any]:
    (run_dir,) = run_root.iterdir()
    return json.loads((run_dir / "state.json").read_text())


def query_started(state: dict[str, Any], sql: str, db: str = "shop") -> subprocess.CompletedProcess[str]:
    pgrec = state["postgres"]
    return subprocess.run(
        ["runuser", "-u", "postgres", "--", "psql", "-XAtq", "-h", pgrec["sockdir"], "-p", str(pgrec["port"]),
         "-d", db, "-c", sql],
        capture_output=True, text=True, cwd="/", timeout=60,
    )  # fmt: skip


def test_reused_overlay_starts_without_recovery(stores: Stores, run_root: Path, tmp_path: Path) -> None:
    overlay = tmp_path / "kept.qcow2"
    store, snap = str(stores.plain), stores.snaps["B"][:8]
    first = cli(run_root, "psql", store, snap, "--overlay", str(overlay), "--",
                "-XAtq", "-d", "shop", "-c", "insert into items values (1000, 'kept')")  # fmt: skip
    assert first.returncode == 0, first.stderr
    assert overlay.is_file()
    started = cli(run_root, "pg", "start", "--overlay", str(overlay), store, snap)
    assert started.returncode == 0, started.stderr
    state = pg_state(run_root)
    try:
        assert query_started(state, "select name from items where id = 1000").stdout.strip() == "kept"
        q = query_started(state, QUERIES["accounts"][1])
        assert q.stdout.strip() == stores.live["B"]["accounts"]
        log = Path(state["postgres"]["log"]).read_text()
        assert "database system was shut down at" in log
        assert "redo starts at" not in log
    finally:
        stopped = cli(run_root, "pg", "stop")
    assert stopped.returncode == 0, stopped.stderr
    fetched_line(stopped.stderr)  # the fetch report at `pg stop`
    assert_nothing_left(run_root, stores.plain)
    assert overlay.is_file(), "a user-given overlay is kept"


def test_pg_start_encrypted_key_only_in_nbdkits_environment(stores: Stores, run_root: Path) -> None:
    # The CLI derives the key once and hands nbdkit the key (not the passphrase) in its environment:
    # nbdkit does not derive it again. Neither is in any argv, nor in Postgres' environment.
    snap = stores.snaps["Aenc"][:8]
    with open_store(str(stores.enc), PASSPHRASE) as st:  # the oracle: the key derived here
        key = st.codec.key
    started = cli(run_root, "pg", "start", str(stores.enc), snap, env={"PLAKAR_PASSPHRASE": PASSPHRASE})
    assert started.returncode == 0, started.stderr
    assert started.stdout.startswith("psql -h ")
    state = pg_state(run_root)
    try:
        pid = state["nbdkit"]["pid"]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert PASSPHRASE.encode() not in cmdline and b"passphrase" not in cmdline
        assert key.hex().encode() not in cmdline
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert f"{KEY_ENV}={key.hex()}".encode() in environ
        assert not any(PASSPHRASE.encode() in e for e in environ)
        assert b"pgdata=true" in cmdline.split(b"\0")
        postmaster = state["postgres"]["postmaster"]["pid"]
        pg_environ = Path(f"/proc/{postmaster}/environ").read_bytes()
        assert b"PLAKAR_PASSPHRASE" not in pg_environ and KEY_ENV.encode() not in pg_environ
        assert query_started(state, QUERIES["items"][1]).stdout.strip() == stores.live["A"]["items"]
    finally:
        down = cli(run_root, "down")
    assert down.returncode == 0, down.stderr
    fetched_line(down.stderr)  # the fetch report at `down` of a pg session
    assert not proc_alive(state["nbdkit"])
    assert_nothing_left(run_root, stores.enc)


def test_mount_then_down(stores: Stores, run_root: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = cli(run_root, "mount", str(stores.plain), stores.snaps["A"][:8], str(mnt), "--path", "/global")
    assert res.returncode == 0, res.stderr
    try:
        assert (mnt / "pg_control").stat().st_size == 8192
        (mnt / "written").write_text("x")  # read-write, into the overlay
    finally:
        down = cli(run_root, "down")
    assert down.returncode == 0, down.stderr
    assert not os.path.ismount(mnt) and list(mnt.iterdir()) == []
    assert_nothing_left(run_root, stores.plain)


@pytest.mark.parametrize("backend", ["nbd", "fuse"])
def test_mount_encrypted_with_passphrase_file(
    stores: Stores, run_root: Path, tmp_path: Path, backend: str
) -> None:
    # --backend fuse used to ignore --passphrase-file ("store ... is encrypted: set PLAKAR_PASSPHRASE").
    pwfile = tmp_path / "pw"
    pwfile.write_text(PASSPHRASE + "\n")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = cli(
        run_root, "mount", "--backend", backend, "--passphrase-file", str(pwfile),
        str(stores.enc), stores.snaps["Aenc"][:8], str(mnt), "--path", "/global",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    try:
        assert (mnt / "pg_control").stat().st_size == 8192
        started = processes_mentioning(str(run_root) + "/")
        assert started  # nbdkit or expose, and qemu-storage-daemon
        for rec in started:
            for name in ("environ", "cmdline"):
                assert PASSPHRASE.encode() not in Path(f"/proc/{rec['pid']}/{name}").read_bytes()
    finally:
        down = cli(run_root, "down")
    assert down.returncode == 0, down.stderr
    assert_nothing_left(run_root, stores.enc)


# --- faults --------------------------------------------------------------------------------------------


def test_killing_nbdkit_mid_query_gives_an_error_and_down_cleans(stores: Stores, run_root: Path) -> None:
    started = cli(run_root, "pg", "start", str(stores.plain), stores.snaps["A"][:8])
    assert started.returncode == 0, started.stderr
    state = pg_state(run_root)
    pgrec = state["postgres"]
    # pg_sleep first, then a scan of pages nobody has read yet: nbdkit dies in between.
    q = subprocess.Popen(
        ["runuser", "-u", "postgres", "--", "psql", "-XAtq", "-v", "ON_ERROR_STOP=1", "-h", pgrec["sockdir"],
         "-p", str(pgrec["port"]), "-d", "shop", "-c", "select pg_sleep(1.5)",
         "-c", "select sum(abalance) from pgbench_accounts"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
    )  # fmt: skip
    # Kill only once the session is in pg_sleep (connecting reads files too: under load, a kill
    # right away would fail the connection instead of the query).
    deadline = time.monotonic() + 30
    sleeping = "select count(*) from pg_stat_activity where query = 'select pg_sleep(1.5)'"
    while query_started(state, sleeping, "postgres").stdout.strip() != "1":
        assert time.monotonic() < deadline and q.poll() is None, "the query never started"
        time.sleep(0.02)
    os.kill(state["nbdkit"]["pid"], signal.SIGKILL)
    _, err = q.communicate(timeout=60)
    assert q.returncode != 0
    assert re.search(r"Input/output error|could not read block", err), err
    down = cli(run_root, "down")
    assert down.returncode == 0, down.stderr
    assert "down: 1 chain(s) torn down" in down.stderr
    assert "fetched" not in down.stderr  # a killed nbdkit wrote no counters: nothing is made up
    for rec in (state["nbdkit_keeper"], state.get("qsd"), pgrec.get("postmaster"), pgrec.get("runuser")):
        assert not proc_alive(rec)
    assert_nothing_left(run_root, stores.plain)


def _unsupported_version_store(stores: Stores, tmp_path: Path) -> Path:
    dest = tmp_path / "v2"
    shutil.copytree(stores.plain, dest)
    raw = bytearray((dest / "CONFIG").read_bytes())
    raw[12:16] = c.pack_version(2, 0, 0).to_bytes(4, "little")
    (dest / "CONFIG").write_bytes(bytes(raw))
    return dest


FAULTS = [
    # (id, store, snapshot, args before --, env, expected one-line message)
    ("wrong-passphrase", "enc", "Aenc", ["--passphrase-file", "{wrong}"], {}, r"wrong passphrase for store"),
    ("wrong-passphrase-env", "enc", "Aenc", [], {"PLAKAR_PASSPHRASE": "nope"}, r"wrong passphrase for store"),
    ("no-passphrase", "enc", "Aenc", [], {}, r"is encrypted: set PLAKAR_PASSPHRASE, pass --passphrase-file"),
    ("unknown-snapshot", "plain", "ffffffffff", [], {}, r"no snapshot has prefix 'ffffffffff'"),
    ("not-a-pg-snapshot", "faults", "notpg", [], {}, r"is not a PostgreSQL data directory \(no PG_VERSION\)"),
    ("missing-pg-version", "faults", "pg99", [], {}, r"PostgreSQL 99, .*apt-get install postgresql-99$"),
    ("unsupported-store-version", "v2", "A", [], {}, r"unsupported store version 2\.0\.0"),
    ("no-such-store", "missing", "A", [], {}, r"store not found"),
    ("backup-without-wal", "faults", "nowal", [], {}, r"the backup has no WAL .*-X fetch"),
]


@pytest.mark.parametrize(("store_attr", "snap", "extra", "env", "message"), [f[1:] for f in FAULTS],
                         ids=[f[0] for f in FAULTS])  # fmt: skip
def test_failure_is_one_line_and_leaves_nothing(
    stores: Stores,
    run_root: Path,
    tmp_path: Path,
    store_attr: str,
    snap: str,
    extra: list[str],
    env: dict[str, str],
    message: str,
) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase\n")
    if store_attr == "v2":
        store = _unsupported_version_store(stores, tmp_path)
    elif store_attr == "missing":
        store = tmp_path / "no-store"
    else:
        store = getattr(stores, store_attr)
    snap_id = stores.snaps.get(snap, snap)[:10]
    for command in (["psql"], ["pg", "start"]):
        args = [*command, str(store), snap_id, *[a.replace("{wrong}", str(wrong)) for a in extra]]
        if command == ["psql"]:
            args += ["--", "-c", "select 1"]
        t0 = time.monotonic()
        res = cli(run_root, *args, env=env)
        line = one_error_line(res)
        assert re.search(message, line), line
        if snap != "nowal":  # found out before anything was started: no progress at all
            assert res.stderr.count("\n") == 1 and time.monotonic() - t0 < 10, res.stderr
        assert_nothing_left(run_root, store)


@pytest.mark.parametrize(("typed", "ok"), [(PASSPHRASE, True), ("not it", False)], ids=["right", "wrong"])
def test_passphrase_prompt_on_the_terminal_before_anything_starts(
    stores: Stores, run_root: Path, typed: str, ok: bool
) -> None:
    import pty

    env = {k: v for k, v in os.environ.items() if k != "PLAKAR_PASSPHRASE"}
    env.update({RUN_ROOT_ENV: str(run_root), "PAGER": "cat"})
    argv = [sys.executable, "-m", "kloset_blocks", "psql", str(stores.enc), stores.snaps["Aenc"][:8], "--",
            "-XAtq", "-d", "shop", "-c", QUERIES["items"][1]]  # fmt: skip
    pid, fd = pty.fork()
    if pid == 0:  # the child: a new session whose controlling terminal is the pty
        os.chdir(REPO)
        os.execve(sys.executable, argv, env)
    out = b""
    try:
        deadline = time.monotonic() + 60
        while b"passphrase for" not in out:
            assert time.monotonic() < deadline, f"no prompt: {out!r}"
            if select.select([fd], [], [], 1.0)[0]:
                out += os.read(fd, 1024)
        assert list(run_root.iterdir()) == [], "something was started before the passphrase was typed"
        os.write(fd, typed.encode() + b"\n")
        with contextlib.suppress(OSError):  # EIO once the child has exited
            while chunk := os.read(fd, 4096):
                out += chunk
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    text = out.decode(errors="replace")
    assert PASSPHRASE not in text  # not echoed
    if ok:
        assert os.waitstatus_to_exitcode(status) == 0, text
        assert stores.live["A"]["items"] in text
    else:
        assert os.waitstatus_to_exitcode(status) == 1, text
        assert "kloset-blocks: wrong passphrase for store" in text and "serve " not in text
    assert_nothing_left(run_root, stores.enc)
