# The reader against the golden stores written by Kloset itself: every path of every snapshot
# must match the manifests made from the tar members (type, size, mode, owner, mtime, sha256).
from __future__ import annotations

import hashlib
import stat
import threading
import tracemalloc
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kloset_blocks.errors import AmbiguousSnapshot, NotFound
from kloset_blocks.store import Snapshot, match_prefix
from kloset_blocks.store import codec as c
from tests.store_helpers import (
    SNAP_A_ENC,
    SNAP_A_PLAIN,
    SNAP_B_PLAIN,
    enc_store,
    manifest,
    plain_store,
)

CASES = [
    pytest.param((plain_store, SNAP_A_PLAIN, "A"), id="plain-A"),
    pytest.param((plain_store, SNAP_B_PLAIN, "B"), id="plain-B"),
    pytest.param((enc_store, SNAP_A_ENC, "A"), id="enc-A"),
]
BIG = b"/base/16384/16397"
TYPES = {"file": stat.S_IFREG, "dir": stat.S_IFDIR}


def _sha(f) -> str:
    h = hashlib.sha256()
    for piece in f.iter_read():
        h.update(piece)
    return h.hexdigest()


@pytest.fixture(scope="module", params=CASES)
def case(request) -> tuple[Snapshot, dict[str, dict]]:
    opener, snap_id, name = request.param
    return opener().open_snapshot(snap_id[:10]), manifest(name)


def test_walk_matches_manifest(case) -> None:
    snap, man = case
    seen = {}
    for path, e in snap.walk():
        seen[path.decode()] = e
    assert len(seen) == 1311
    assert set(seen) == set(man) | {"/"}
    for path, m in man.items():
        e = seen[path]
        assert stat.S_IFMT(e.st_mode) == TYPES[m["type"]], path
        assert oct(stat.S_IMODE(e.st_mode)) == m["mode"], path
        assert (e.uid, e.gid, e.username, e.groupname) == (m["uid"], m["gid"], m["uname"], m["gname"]), path
        assert e.mtime_ns == m["mtime"] * 1_000_000_000, path
        if m["type"] == "file":
            assert e.size == m["size"], path
    root = seen["/"]
    assert (root.st_mode, root.uid, root.gid, root.mtime_ns) == (stat.S_IFDIR | 0o750, 0, 0, 0)


def test_walk_is_in_pathcmp_order(case) -> None:
    snap, _ = case
    paths = [p for p, _ in snap.walk()]
    assert paths == sorted(paths, key=lambda p: (p.count(b"/"), p))


def test_every_file_content_through_nodes(case) -> None:
    snap, man = case
    nodes = list(snap.nodes())
    assert len(nodes) == 1311
    for node in nodes:
        m = man.get(node.path.decode())
        if m is None:
            assert node.path == b"/" and stat.S_ISDIR(node.mode)
            continue
        assert stat.S_IFMT(node.mode) == TYPES[m["type"]]
        assert (stat.S_IMODE(node.mode), node.uid, node.gid) == (int(m["mode"], 8), m["uid"], m["gid"])
        if m["type"] == "file":
            assert node.size == m["size"] and node.data is not None and node.data.size == m["size"]
            assert _sha(node.data) == m["sha256"], node.path
            assert hashlib.sha256(node.data.read(0, node.size)).hexdigest() == m["sha256"]
        else:
            assert node.data is None and node.hardlink_to is None


def test_lookup_and_listdir_agree_with_manifest(case) -> None:
    snap, man = case
    children: dict[str, set[str]] = {"/": set()}
    for path, m in man.items():
        parent = path.rsplit("/", 1)[0] or "/"
        children.setdefault(parent, set()).add(path.rsplit("/", 1)[1])
        if m["type"] == "dir":
            children.setdefault(path, set())
    for d, names in children.items():
        listing = snap.listdir(d.encode())
        assert {n.decode() for n, _ in listing} == names, d
        for n, e in listing:
            assert e.path == (d.rstrip("/") + "/" + n.decode()).encode()
    for path in man:
        assert snap.lookup(path.encode()).path == path.encode()


def test_lookup_cleans_paths_and_reports_missing(case) -> None:
    snap, _ = case
    assert snap.lookup(b"base/16384/../16384//16397").path == BIG
    with pytest.raises(NotFound, match="no such path"):
        snap.lookup(b"/base/nope")
    with pytest.raises(NotFound, match="not a directory"):
        snap.listdir(b"/PG_VERSION")
    with pytest.raises(NotFound, match="not a regular file"):
        snap.open_file(b"/base")


def test_snapshot_listing_order_and_info() -> None:
    infos = plain_store().snapshots()
    assert [i.id.hex() for i in infos] == [SNAP_A_PLAIN, SNAP_B_PLAIN]
    assert infos[0].timestamp < infos[1].timestamp
    for info in infos:
        assert info.short_id == info.id.hex()[:8]
        assert (info.name, info.importer_type, info.importer_origin, info.importer_directory) == (
            "default",
            "tar",
            "golden-host",
            "/",
        )
        assert info.timestamp.tzinfo is not None
        assert datetime(2026, 1, 1, tzinfo=UTC) < info.timestamp < datetime(2027, 1, 1, tzinfo=UTC)
    total_a = sum(m["size"] for m in manifest("A").values() if m["type"] == "file")
    assert infos[0].size == total_a
    [enc] = enc_store().snapshots()
    assert enc.id.hex() == SNAP_A_ENC and enc.size == total_a


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [("", SNAP_B_PLAIN), ("latest", SNAP_B_PLAIN), ("bf", SNAP_A_PLAIN), ("3B116F40", SNAP_B_PLAIN)],
)
def test_find_snapshot(prefix: str, expected: str) -> None:
    assert plain_store().find_snapshot(prefix).id.hex() == expected


def test_find_snapshot_unknown_prefix() -> None:
    with pytest.raises(NotFound, match="no snapshot has prefix 'ff'"):
        plain_store().find_snapshot("ff")


@pytest.mark.parametrize(
    ("ids", "prefix", "error"),
    [
        (["ab12", "ab34"], "ab", "snapshot prefix 'ab' is ambiguous: matches ab12"),
        (["ab12", "cd34"], "ab", None),
        (["ab12", "cd34"], "ef", "no snapshot has prefix 'ef'"),
        (["ab12", "ab34"], "ab3", None),
    ],
)
def test_match_prefix_table(ids: list[str], prefix: str, error: str | None) -> None:
    full = [bytes.fromhex(i + "00" * 30) for i in ids]
    if error is None:
        assert match_prefix(full, prefix).hex().startswith(prefix)
    else:
        with pytest.raises((NotFound, AmbiguousSnapshot), match=error.replace("'", ".")):
            match_prefix(full, prefix)


def test_ambiguous_message_lists_matches() -> None:
    full = [bytes.fromhex("ab12" + "00" * 30), bytes.fromhex("ab34" + "11" * 30)]
    with pytest.raises(AmbiguousSnapshot) as e:
        match_prefix(full, "ab")
    assert str(e.value) == "snapshot prefix 'ab' is ambiguous: matches ab120000, ab341111"


# ---------------------------------------------------------------- range reads


@pytest.fixture(
    scope="module", params=[(plain_store, SNAP_A_PLAIN), (enc_store, SNAP_A_ENC)], ids=["plain", "enc"]
)
def big_file(request):
    opener, snap_id = request.param
    snap = opener().open_snapshot(snap_id)
    f = snap.open_file(BIG)
    return f, f.read(0, f.size)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_random_ranges_equal_slices(big_file, data) -> None:
    f, whole = big_file
    offset = data.draw(st.integers(0, f.size))
    # Bias towards chunk boundaries, where off-by-one errors live.
    if data.draw(st.booleans()):
        boundary = f.offsets[data.draw(st.integers(0, len(f.offsets) - 1))]
        offset = max(0, min(f.size, boundary + data.draw(st.integers(-3, 3))))
    length = data.draw(st.integers(0, min(f.size - offset, 3 << 20)))
    assert f.read(offset, length) == whole[offset : offset + length]


def test_chunk_layout_and_lazy_object(big_file) -> None:
    f, whole = big_file
    assert len(f.offsets) == len(f.macs) + 1 and f.offsets[0] == 0 and f.offsets[-1] == f.size
    assert f.offsets.typecode == "Q"
    assert hashlib.sha256(whole).hexdigest() == manifest("A")[BIG.decode()]["sha256"]
    with pytest.raises(ValueError):
        f.read(f.size - 1, 2)


def test_read_fetches_only_overlapping_chunks(big_file) -> None:
    f, whole = big_file
    snap = f.snapshot
    calls: list[bytes] = []
    original = snap.fetch_chunk
    snap.fetch_chunk = lambda mac: calls.append(mac) or original(mac)
    try:
        i = len(f.macs) // 2
        start, end = f.offsets[i], f.offsets[i + 1]
        assert f.read(start + 1, end - start - 2) == whole[start + 1 : end - 1]
        assert calls == [f.macs[i]]
        calls.clear()
        assert f.read(end - 1, 2) == whole[end - 1 : end + 1]
        assert calls == [f.macs[i], f.macs[i + 1]]
    finally:
        snap.fetch_chunk = original


def test_streaming_holds_few_chunks(big_file) -> None:
    f, _ = big_file
    biggest = max(f.offsets[i + 1] - f.offsets[i] for i in range(len(f.macs)))
    h = hashlib.sha256()
    tracemalloc.start()
    try:
        for piece in f.iter_read():
            h.update(piece)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert f.size > 8 * biggest / 2  # the file spans many chunks...
    assert peak < 4 * biggest + (1 << 20), (peak, biggest)  # ...but memory holds a few at most


def test_concurrent_reads_from_threads(big_file) -> None:
    f, whole = big_file
    errors: list[str] = []

    def worker(seed: int) -> None:
        import random

        rng = random.Random(seed)
        for _ in range(20):
            off = rng.randrange(f.size)
            n = rng.randrange(min(f.size - off, 1 << 20) + 1)
            if f.read(off, n) != whole[off : off + n]:
                errors.append(f"{off}+{n}")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_blobs_by_type_and_mac() -> None:
    store = plain_store()
    snap = store.open_snapshot(SNAP_A_PLAIN)
    f = snap.open_file(b"/PG_VERSION")
    assert store.read_chunk(f.macs[0]) == b"15\n"
    assert store.read_blob(c.RT_CHUNK, f.macs[0]) == b"15\n"
    # A snapshot id is both an RT_SNAPSHOT and (possibly) an RT_SIGNATURE blob: keyed by type.
    header = store.read_record(c.RT_SNAPSHOT, bytes.fromhex(SNAP_A_PLAIN))
    assert header["identifier"] == bytes.fromhex(SNAP_A_PLAIN)
    with pytest.raises(Exception, match="missing chunk blob"):
        store.read_chunk(bytes(32))


@pytest.mark.parametrize(("offset", "length"), [(0, None), (1, 5_000_000), (12_345_678, 7), (0, 0)])
@pytest.mark.parametrize("readahead", [0, 1, 3])
def test_iter_read_with_readahead(big_file, offset: int, length: int | None, readahead: int) -> None:
    f, whole = big_file
    end = f.size if length is None else offset + length
    assert b"".join(f.iter_read(offset, length, readahead=readahead)) == whole[offset:end]


def test_iter_read_early_close(big_file) -> None:
    f, whole = big_file
    it = f.iter_read(readahead=3)
    assert next(it) == whole[: f.offsets[1]]
    it.close()  # pending read-ahead is cancelled or finishes harmlessly


def test_walk_batches_entry_reads(case) -> None:
    """walk() must not do one pread per entry: entries come in coalesced runs."""
    snap, _ = case
    packs = snap.store.packfiles
    calls = 0
    original = packs.pread

    def counting(loc):
        nonlocal calls
        calls += 1
        return original(loc)

    packs.pread = counting
    try:
        n = sum(1 for _ in snap.walk())
    finally:
        del packs.pread
    assert calls < n / 5, (calls, n)
