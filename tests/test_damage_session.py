# The CLI says what is damaged: psql / pg start / query on a copy of golden-plain with one damaged
# chunk. The error names the snapshot path whose chunk failed and says the store is damaged,
# instead of Postgres' last line; nothing is left behind. The oracle for "which file": the chunk
# the test damaged belongs to exactly one file of the snapshot (found through the undamaged store).
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kloset_blocks.host.rundir import RUN_ROOT_ENV
from kloset_blocks.store import codec as c
from tests.conftest import REPO
from tests.store_helpers import PLAIN, SNAP_A_PLAIN, copy_store, plain_store
from tests.test_damage_store import damage_blob

pytestmark = [pytest.mark.root, pytest.mark.slow]


def cli(run_root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PLAKAR_PASSPHRASE"}
    return subprocess.run(
        [sys.executable, "-m", "kloset_blocks", *args],
        cwd=REPO,
        env={**env, RUN_ROOT_ENV: str(run_root)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def damage_only_chunk_of(store: Path, path: bytes) -> bytes:
    """Damage a chunk used by `path` and by no other file of snapshot A; its MAC."""
    snap = plain_store().open_snapshot(SNAP_A_PLAIN)
    others = set()
    for node in snap.nodes():
        if node.data is not None and node.path != path:
            others.update(node.data.macs)
    mac = next(m for m in snap.open_file(path).macs if m not in others)
    damage_blob(store, c.RT_CHUNK, mac)
    return mac


def nothing_left(run_root: Path) -> None:
    assert list(run_root.iterdir()) == [], "run directory left behind"
    assert str(run_root) not in Path("/proc/mounts").read_text()


def test_psql_names_the_damaged_file(tmp_path: Path, run_root: Path) -> None:
    store = copy_store(PLAIN, tmp_path / "store")
    # pgbench_accounts of database shop (the largest relation: 200000 rows).
    victim = b"/base/16384/16397"
    mac = damage_only_chunk_of(store, victim)
    res = cli(run_root, "psql", str(store), "bf6a", "-q", "--", "-XAtq", "-d", "shop", "-c",
              "select sum(abalance) from pgbench_accounts")  # fmt: skip
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    head = "kloset-blocks: snapshot bf6afbae of the store is damaged: reading 1 file(s) failed: "
    assert last.startswith(head), last
    assert f"{victim.decode()}: chunk " in last and mac.hex() in last and "MAC mismatch" in last
    nothing_left(run_root)


def test_pg_start_names_the_damaged_file_not_postgres(tmp_path: Path, run_root: Path) -> None:
    store = copy_store(PLAIN, tmp_path / "store")
    victim = b"/postgresql.conf"
    damage_only_chunk_of(store, victim)
    for args in (["psql", str(store), "bf6a", "--", "-c", "select 1"], ["pg", "start", str(store), "bf6a"]):
        res = cli(run_root, *args)
        assert res.returncode == 1, res.stderr
        assert "Traceback" not in res.stderr
        last = res.stderr.strip().splitlines()[-1]
        assert "of the store is damaged: reading 1 file(s) failed: /postgresql.conf: chunk 0: " in last, last
        assert "configuration file" not in last
        nothing_left(run_root)


def test_query_names_the_damaged_file_and_answers_from_the_others(tmp_path: Path, run_root: Path) -> None:
    store = copy_store(PLAIN, tmp_path / "store")
    victim = b"/base/16384/16397"  # pgbench_accounts; B rewrote the chunk damaged here (A's only)
    damage_only_chunk_of(store, victim)
    res = cli(run_root, "query", str(store), "--db", "shop", "--format", "csv",
              "select sum(abalance) from pgbench_accounts")  # fmt: skip
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert "420" in res.stdout  # snapshot B's answer, from the README's live server
    errors = [line for line in res.stderr.splitlines() if line.startswith("kloset-blocks: query: snapshot")]
    assert len(errors) == 1 and errors[0].startswith(
        "kloset-blocks: query: snapshot bf6afbae: snapshot bf6afbae"
    )
    assert f"is damaged: reading 1 file(s) failed: {victim.decode()}: chunk " in errors[0]
    nothing_left(run_root)


def test_mount_then_down_names_what_could_not_be_read(tmp_path: Path, run_root: Path) -> None:
    store = copy_store(PLAIN, tmp_path / "store")
    damage_only_chunk_of(store, b"/postgresql.conf")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = cli(run_root, "mount", str(store), "bf6a", str(mnt))
    assert res.returncode == 0, res.stderr
    try:
        with pytest.raises(OSError) as info:
            (mnt / "postgresql.conf").read_bytes()
        assert info.value.errno == 5  # EIO
        assert (mnt / "PG_VERSION").read_text() == "15\n"
    finally:
        down = cli(run_root, "down")
    assert down.returncode == 0, down.stderr
    assert "is damaged: reading 1 file(s) failed: /postgresql.conf: chunk 0: " in down.stderr, down.stderr
    nothing_left(run_root)


def test_query_says_which_damage_hid_a_snapshot(tmp_path: Path, run_root: Path) -> None:
    from tests.store_helpers import SNAP_B_PLAIN, flip_byte

    store = copy_store(PLAIN, tmp_path / "store")
    state_b = store / "states" / SNAP_B_PLAIN[:2] / SNAP_B_PLAIN
    flip_byte(state_b, state_b.stat().st_size // 2)
    sql = "select count(*) from customers"
    res = cli(run_root, "query", str(store), "--db", "shop", "--format", "csv", sql)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert "5000" in res.stdout  # snapshot A's answer (README), still served
    assert f"kloset-blocks: query: damaged state left out: state {state_b}: MAC mismatch" in res.stderr
    nothing_left(run_root)
