# Damage costs only what it touches, on copies of golden-plain damaged by the tests: a state that
# cannot be read fails only the snapshots that need its blobs; a damaged VFS entry makes only its
# file unreadable (a directory's contents are still served); the image serves that file's blocks
# as EIO and every other file's bytes right; `restore` goes on past damage, never leaves a partial
# file under a real name, lists what is damaged and exits 1. The oracle is the fixture's manifest
# (sha256 of every tar member, computed when the backup was taken).
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from kloset_blocks.errors import FileDamaged, KlosetError
from kloset_blocks.ext4.layout import FILE
from kloset_blocks.image.snapshot import ImageOptions, snapshot_image
from kloset_blocks.store import codec as c
from kloset_blocks.store import open_store
from kloset_blocks.store.snapshot import DAMAGED_SIZE, Snapshot
from tests.store_helpers import (
    PLAIN,
    SNAP_A_PLAIN,
    SNAP_B_PLAIN,
    copy_store,
    flip_byte,
    manifest,
    plain_store,
    run_cli,
)

BIG = b"/base/16384/16397"


@pytest.fixture
def plain_copy(tmp_path: Path) -> Path:
    return copy_store(PLAIN, tmp_path / "plain")


def damage_blob(store_dir: Path, rtype: int, mac: bytes) -> None:
    loc = plain_store().locate(rtype, mac)
    pack = store_dir / "packfiles" / loc.packfile.hex()[:2] / loc.packfile.hex()
    flip_byte(pack, c.HEADER_SIZE + loc.offset + loc.length // 2)


def check_files(snap: Snapshot, name: str) -> tuple[int, dict[bytes, str]]:
    """(files read right, {path: error}) over every regular file of `snap`, against the manifest:
    a read either gives the manifest's bytes or a KlosetError, never other bytes."""
    man = manifest(name)
    good, failed = 0, {}
    for path, entry in snap.walk():
        if not entry.is_reg:
            continue
        try:
            data = snap.open_file(path).read(0, entry.size) if not entry.damage else None
        except KlosetError as e:
            failed[path] = str(e)
            continue
        if data is None:
            failed[path] = entry.damage or ""
            continue
        assert hashlib.sha256(data).hexdigest() == man[path.decode()]["sha256"], path
        good += 1
    return good, failed


def test_damaged_state_fails_only_its_snapshot(plain_copy: Path) -> None:
    state_b = plain_copy / "states" / SNAP_B_PLAIN[:2] / SNAP_B_PLAIN
    flip_byte(state_b, state_b.stat().st_size // 2)
    store = open_store(str(plain_copy))
    assert [i.hex_id for i in store.snapshots()] == [SNAP_A_PLAIN]
    good, failed = check_files(store.open_snapshot("bf6a"), "A")
    assert good == 1284 and not failed
    with pytest.raises(KlosetError, match=f"the store is damaged: state {state_b}: MAC mismatch"):
        store.find_snapshot("3b11")
    proc = run_cli("snapshots", str(plain_copy))
    assert proc.returncode == 1 and b"Traceback" not in proc.stderr
    assert proc.stdout.decode().startswith("bf6afbae ") and proc.stdout.count(b"\n") == 1
    assert proc.stderr.decode() == f"kloset-blocks: damaged state left out: state {state_b}: MAC mismatch" + (
        " (file damaged or wrong key)\n"
    )


def test_damaged_state_of_the_older_snapshot(plain_copy: Path) -> None:
    # B's own state lists only what B added: whatever B shares with A is lost with A's state, and
    # says so; what B added alone is still read right.
    state_a = plain_copy / "states" / SNAP_A_PLAIN[:2] / SNAP_A_PLAIN
    state_a.write_bytes(os.urandom(300))  # a foreign file under a state's name
    store = open_store(str(plain_copy))
    assert [i.hex_id for i in store.snapshots()] == [SNAP_B_PLAIN]
    _, failed = check_files(store.open_snapshot("3b11"), "B")
    assert len(failed) > 1000 and all(f"the store is damaged: state {state_a}" in w for w in failed.values())


def test_foreign_files_under_states(plain_copy: Path) -> None:
    (plain_copy / "states" / "ab").mkdir()
    (plain_copy / "states" / "ab" / ("ab" * 32)).write_bytes(b"not a state at all")
    store = open_store(str(plain_copy))
    assert [i.hex_id for i in store.snapshots()] == [SNAP_A_PLAIN, SNAP_B_PLAIN]
    assert len(store.problems()) == 1 and "ab" * 32 in store.problems()[0]


def _damage_entries(plain_copy: Path, *paths: bytes) -> None:
    snap = plain_store().open_snapshot(SNAP_A_PLAIN)
    for p in paths:
        damage_blob(plain_copy, c.RT_VFS_ENTRY, snap.lookup(p).mac)


def test_damaged_entries_cost_only_their_file(plain_copy: Path) -> None:
    _damage_entries(plain_copy, b"/PG_VERSION", b"/base/1")
    snap = open_store(str(plain_copy)).open_snapshot(SNAP_A_PLAIN)
    entries = dict(snap.walk())
    version, base1 = entries[b"/PG_VERSION"], entries[b"/base/1"]
    assert version.damage and version.is_reg and version.size == DAMAGED_SIZE
    assert base1.damage and base1.is_dir and base1.perm == 0o700
    assert "vfs entry blob" in version.damage and "MAC mismatch" in version.damage
    # Everything else, the files below the damaged directory included, reads right.
    good, failed = check_files(snap, "A")
    assert set(failed) == {b"/PG_VERSION"} and good == 1283
    assert sum(1 for p in entries if p.startswith(b"/base/1/")) > 100
    # ls lists the directory and names the damaged entry in one line, exit 1.
    proc = run_cli("ls", str(plain_copy), "bf6a:/")
    assert proc.returncode == 1 and b"PG_VERSION\n" in proc.stdout
    err = proc.stderr.decode()
    assert err.count("\n") == 1 and err.startswith("kloset-blocks: /PG_VERSION: entry cannot be read: ")


def test_image_serves_damaged_files_as_errors(plain_copy: Path) -> None:
    _damage_entries(plain_copy, b"/PG_VERSION")
    mac = plain_store().open_snapshot(SNAP_A_PLAIN).open_file(BIG).macs[1]
    damage_blob(plain_copy, c.RT_CHUNK, mac)
    snap = open_store(str(plain_copy)).open_snapshot(SNAP_A_PLAIN)
    image, _ = snapshot_image(snap, ImageOptions(owner="root"))
    man = manifest("A")
    seen: dict[bytes, int] = {}
    failed: dict[bytes, str] = {}
    for r in image.regions:
        if r.kind != FILE or not r.src_len:
            continue
        path = r.source.path
        try:
            data = image.pread(r.start, min(r.length, r.src_len))
        except FileDamaged as e:
            failed[path] = str(e)
            assert e.path == path.decode()
            continue
        if path != BIG:
            assert hashlib.sha256(data).hexdigest() == man[path.decode()]["sha256"], path
        seen[path] = seen.get(path, 0) + 1
    assert set(failed) == {b"/PG_VERSION", BIG}
    assert failed[BIG].startswith(f"{BIG.decode()}: chunk 1: packfile ") and mac.hex() in failed[BIG]
    assert failed[b"/PG_VERSION"].startswith("/PG_VERSION: entry cannot be read: ")
    nonempty = {p.encode() for p, e in man.items() if e["type"] == "file" and e["size"]}
    assert set(seen) == nonempty - {b"/PG_VERSION", BIG}


def test_restore_goes_past_damage(plain_copy: Path, tmp_path: Path) -> None:
    _damage_entries(plain_copy, b"/PG_VERSION", b"/base/1")
    mac = plain_store().open_snapshot(SNAP_A_PLAIN).open_file(BIG).macs[2]
    damage_blob(plain_copy, c.RT_CHUNK, mac)
    dest = tmp_path / "restored"
    proc = run_cli("restore", str(plain_copy), "bf6a", str(dest))
    err = proc.stderr.decode()
    assert proc.returncode == 1 and "Traceback" not in err, err
    lines = err.splitlines()
    assert "kloset-blocks: restore: 3 damaged paths" in err
    damaged = sorted(line.split(": ")[2] for line in lines if line.startswith("kloset-blocks: damaged: "))
    assert damaged == ["/PG_VERSION", "/base/1", BIG.decode()]
    # Never a partial file under its real name, no temporary left behind.
    assert not (dest / "PG_VERSION").exists() and not (dest / BIG.decode().lstrip("/")).exists()
    assert not [p for p in dest.rglob("*") if p.name.startswith(".kloset-restore-")]
    man = manifest("A")
    count = 0
    for path, e in man.items():
        if e["type"] != "file" or path in ("/PG_VERSION", BIG.decode()):
            continue
        local = dest / path.lstrip("/")
        assert hashlib.sha256(local.read_bytes()).hexdigest() == e["sha256"], path
        count += 1
    assert count == 1282
    assert (dest / "base" / "1").is_dir() and (dest / "base" / "1").stat().st_mode & 0o777 == 0o700
