# A real nbdkit serving a damaged copy of golden-plain: each failed read is EIO and one log line
# (the snapshot path, chunk, packfile and reason the first time; a short line on repeats), never a
# Python traceback; the failures, counted, are in the stats file; every other read is right
# (oracle: the image built in this process from the undamaged store).
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import nbd
import pytest

from kloset_blocks.store import codec as c
from kloset_blocks.store import open_store
from tests.conftest import REPO
from tests.store_helpers import PLAIN, SNAP_A_PLAIN, copy_store, plain_store
from tests.test_damage_store import damage_blob
from tests.test_plugin import first_offset_using

PLUGIN = str(REPO / "nbdplugin" / "kloset.py")
VICTIM = b"/base/1/1259"


def serve(store: Path, tmp_path: Path, *params: str) -> tuple[subprocess.Popen, Path, Path]:
    sock, stats, log = tmp_path / "nbd.sock", tmp_path / "stats.json", tmp_path / "nbdkit.log"
    argv = [
        "nbdkit",
        "-f",
        "-U",
        str(sock),
        "python",
        PLUGIN,
        f"store={store}",
        f"snapshot={SNAP_A_PLAIN[:8]}",
    ]
    with open(log, "wb") as err:
        proc = subprocess.Popen([*argv, f"stats={stats}", *params], stderr=err, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    return proc, sock, stats


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=60)


@pytest.fixture
def oracle_image():
    from kloset_blocks.image.snapshot import ImageOptions, snapshot_image

    return snapshot_image(plain_store().open_snapshot(SNAP_A_PLAIN), ImageOptions())[0]


@pytest.mark.parametrize("damage", ["flipped", "missing-packfile"])
def test_failed_reads_are_one_line_each(tmp_path: Path, oracle_image, damage: str) -> None:
    store = copy_store(PLAIN, tmp_path / "store")
    mac = plain_store().open_snapshot(SNAP_A_PLAIN).open_file(VICTIM).macs[0]
    loc = plain_store().locate(c.RT_CHUNK, mac)
    if damage == "flipped":
        damage_blob(store, c.RT_CHUNK, mac)
    else:
        (store / "packfiles" / loc.packfile.hex()[:2] / loc.packfile.hex()).unlink()
    offset = first_offset_using(oracle_image, mac)
    proc, sock, stats = serve(store, tmp_path, "readahead=0")
    try:
        h = nbd.NBD()
        h.connect_unix(str(sock))
        for _ in range(5):
            with pytest.raises(nbd.Error) as info:
                h.pread(4096, offset)
            assert info.value.errno == "EIO"
        assert h.pread(4096, 0) == oracle_image.pread(0, 4096)
        h.shutdown()
    finally:
        stop(proc)
    log = (tmp_path / "nbdkit.log").read_text()
    assert "Traceback" not in log, log
    lines = [line for line in log.splitlines() if "error" in line]
    assert len(lines) == 5, log
    assert f"of export {SNAP_A_PLAIN}: {VICTIM.decode()}: " in lines[0] and loc.packfile.hex() in lines[0]
    if damage == "flipped":
        assert "chunk 0: packfile " in lines[0] and "MAC mismatch" in lines[0]
    else:  # the file's object lived in that packfile too
        assert "missing packfile" in lines[0]
    assert all(f"{VICTIM.decode()}: failed again ({n} times)" in lines[n - 1] for n in range(2, 6))
    failures = json.loads(stats.read_text())["read_failures"]
    assert [(f["path"], f["count"]) for f in failures] == [(VICTIM.decode(), 5)]
    assert loc.packfile.hex() in failures[0]["reason"]


def test_damaged_entry_is_eio(tmp_path: Path) -> None:
    store = copy_store(PLAIN, tmp_path / "store")
    entry = plain_store().open_snapshot(SNAP_A_PLAIN).lookup(b"/PG_VERSION")
    damage_blob(store, c.RT_VFS_ENTRY, entry.mac)
    from kloset_blocks.image.snapshot import ImageOptions, snapshot_image

    image = snapshot_image(open_store(str(store)).open_snapshot(SNAP_A_PLAIN), ImageOptions())[0]
    region = next(r for r in image.regions if getattr(r.source, "path", None) == b"/PG_VERSION")
    proc, sock, _ = serve(store, tmp_path)
    try:
        h = nbd.NBD()
        h.connect_unix(str(sock))
        with pytest.raises(nbd.Error) as info:
            h.pread(4096, region.start)
        assert info.value.errno == "EIO"
        assert h.pread(4096, 0) == image.pread(0, 4096)
        h.shutdown()
    finally:
        stop(proc)
    log = (tmp_path / "nbdkit.log").read_text()
    assert "Traceback" not in log, log
    errors = [line for line in log.splitlines() if "error" in line]
    assert len(errors) == 1 and "/PG_VERSION: entry cannot be read: " in errors[0], log


def test_export_that_cannot_be_built_fails_its_open_in_one_line(tmp_path: Path) -> None:
    store = copy_store(PLAIN, tmp_path / "store")
    damage_blob(store, c.RT_VFS_ENTRY, plain_store().open_snapshot(SNAP_A_PLAIN).lookup(b"/").mac)
    proc, sock, _ = serve(store, tmp_path, "lazy=true")
    try:
        h = nbd.NBD()
        with pytest.raises(nbd.Error):
            h.connect_unix(str(sock))
    finally:
        stop(proc)
    log = (tmp_path / "nbdkit.log").read_text()
    assert "Traceback" not in log, log
    errors = [line for line in log.splitlines() if "error" in line]
    assert len(errors) == 1 and f"open of export {SNAP_A_PLAIN!r}: " in errors[0], log
    assert "vfs entry blob" in errors[0]
