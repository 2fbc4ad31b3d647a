"""Packfile spans fetched ahead (Packfiles.warm) and the on-disk cache of a store's immutable
objects (states, preloaded spans), on Kloset's own fixture stores: every blob read through a kept
span or a cached state equals the one read from the store without them, reads inside a span cost no
pread, and a damaged cache entry is read again from the store."""

from __future__ import annotations

from pathlib import Path

import pytest

from kloset_blocks.store import codec as c
from kloset_blocks.store import open_store
from kloset_blocks.store.backend import FsBackend
from kloset_blocks.store.packfile import _merged, _reach_back
from kloset_blocks.store.state import Location

PF = b"\x01" * 32

# (spans as (offset, bytes) in any order, the merged spans): overlapping and touching spans become
# one, the bytes of each offset kept once.
MERGES = [
    ([(0, b"abc")], [(0, b"abc")]),
    ([(10, b"xy"), (0, b"abc")], [(0, b"abc"), (10, b"xy")]),
    ([(0, b"abc"), (3, b"de")], [(0, b"abcde")]),  # touching
    ([(0, b"abcd"), (2, b"cdef")], [(0, b"abcdef")]),  # overlapping
    ([(0, b"abcdef"), (1, b"bc")], [(0, b"abcdef")]),  # inside
    ([(5, b"fg"), (0, b"abcdef"), (9, b"j")], [(0, b"abcdefg"), (9, b"j")]),
]


@pytest.mark.parametrize(("spans", "merged"), MERGES)
def test_merged(spans: list[tuple[int, bytes]], merged: list[tuple[int, bytes]]) -> None:
    assert _merged(spans) == merged


@pytest.mark.parametrize(
    ("offset", "length", "lead", "want"), [(100, 10, 0, 100), (100, 10, 30, 70), (20, 10, 64, 0)]
)
def test_reach_back(offset: int, length: int, lead: int, want: int) -> None:
    span = _reach_back(Location(PF, offset, length), lead)
    assert (span.offset, span.offset + span.length) == (want, offset + length)


def _objects_and_chunks(location: str) -> tuple[list[bytes], list[bytes]]:
    with open_store(location) as st:
        objects, chunks = [], []
        for info in st.snapshots():
            snap = st.open_snapshot(info.hex_id)
            for path, entry in snap.walk(b"/"):
                if entry.is_reg and entry.object:
                    objects.append(entry.object)
                    chunks.extend(snap.open_file(path).macs)
        return sorted(set(objects)), sorted(set(chunks))


def test_reads_inside_warm_spans_cost_no_pread_and_equal_the_store(fixtures_dir: Path) -> None:
    location = str(fixtures_dir / "golden-plain")
    objects, chunks = _objects_and_chunks(location)
    with open_store(location) as plain:
        want = {m: bytes(plain.read_blob(c.RT_OBJECT, m)) for m in objects}
        want.update({m: bytes(plain.read_chunk(m)) for m in chunks})
    with open_store(location) as st:
        locs = [st.locate(c.RT_OBJECT, m) for m in objects]
        kept = st.packfiles.warm(locs, 64 << 20, lead=64 << 10)
        assert kept > sum(loc.length for loc in locs)  # the spans hold more than the objects
        before = st.packfiles.preads
        assert all(st.packfiles.in_span(loc) for loc in locs)
        assert {m: bytes(st.read_blob(c.RT_OBJECT, m)) for m in objects} == {m: want[m] for m in objects}
        assert st.packfiles.preads == before  # every object came from a span
        spanned = [m for m in chunks if st.packfiles.in_span(st.locate(c.RT_CHUNK, m))]
        assert spanned  # small files' chunks lie next to their objects
        assert all(bytes(st.read_chunk(m)) == want[m] for m in chunks)
        assert st.packfiles.preads - before == len(chunks) - len(spanned)


def test_warm_keeps_to_its_budget(fixtures_dir: Path) -> None:
    location = str(fixtures_dir / "golden-plain")
    objects, _ = _objects_and_chunks(location)
    kept_by_budget = []
    for budget in (0, 4096, 64 << 10, 256 << 10, 64 << 20):
        with open_store(location) as st:
            locs = [st.locate(c.RT_OBJECT, m) for m in objects]
            kept = st.packfiles.warm(locs, budget)
            assert kept <= budget
            kept_by_budget.append((kept, sum(st.packfiles.in_span(loc) for loc in locs)))
    assert kept_by_budget == sorted(kept_by_budget)  # more room, more kept
    assert kept_by_budget[0] == (0, 0) and kept_by_budget[-1][1] == len(objects)


def test_states_and_spans_come_from_the_disk_cache(
    fixtures_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    location = str(fixtures_dir / "golden-enc")
    reads: list[str] = []
    fs_read = FsBackend.read

    def counted(self: FsBackend, key: str) -> bytes:
        reads.append(key)
        return fs_read(self, key)

    monkeypatch.setattr(FsBackend, "read", counted)
    cache = str(tmp_path / "cache")
    secret = "correct horse battery staple"

    def open_twice() -> tuple[list[str], list[str]]:
        first = open_store(location, secret, cache_dir=cache)
        with first:
            ids = [i.hex_id for i in first.snapshots()]
        return ids, [k for k in reads if k.startswith("states/")]

    ids, state_reads = open_twice()
    assert state_reads  # the first open read the states from the store
    reads.clear()
    again, state_reads = open_twice()
    assert again == ids and state_reads == []  # the second, from the cache
    entries = sorted((Path(cache)).rglob("state-*"))
    assert entries
    for entry in entries:  # damaged entries: read from the store again, same snapshots
        data = bytearray(entry.read_bytes())
        data[len(data) // 2] ^= 0xFF
        entry.write_bytes(bytes(data))
    reads.clear()
    again, state_reads = open_twice()
    assert again == ids and len(state_reads) == len(entries)


# backup_label as PostgreSQL writes it (do_pg_backup_stop), and what a compromised server could put
# there instead: (text, (segment, LSN low bits) or None).
LABEL = (
    b"START WAL LOCATION: 1/1B000028 (file 00000001000000010000001B)\n"
    b"CHECKPOINT LOCATION: 1/1B000060\nBACKUP METHOD: streamed\n"
)
SEGMENT_2 = b"000000010000000000000002"
RECOVERY_STARTS = [
    (LABEL, (b"00000001000000010000001B", 0x1B000028)),
    (LABEL.replace(b"\n", b"\r\n"), (b"00000001000000010000001B", 0x1B000028)),
    (b"X: y\nSTART WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n", (SEGMENT_2, 0x2000028)),
    (b"", None),
    (b"CHECKPOINT LOCATION: 1/1B000060\n", None),
    (b"START WAL LOCATION: 1/1B000028 (file ../../etc/passwd)\n", None),  # not a segment name
    (b"START WAL LOCATION: 1/1B000028 (file 00000001000000010000001)\n", None),  # 23 digits
    (b"START WAL LOCATION: 1/1B000028 (file 00000001000000010000001BX)\n", None),
    (b"START WAL LOCATION: 1/123456789 (file 00000001000000010000001B)\n", None),  # over 32 bits
    (b"xSTART WAL LOCATION: 1/1B000028 (file 00000001000000010000001B)\n", None),  # not a line's start
]


@pytest.mark.parametrize(("label", "want"), RECOVERY_STARTS)
def test_recovery_start_is_read_from_backup_label_strictly(
    label: bytes, want: tuple[bytes, int] | None
) -> None:
    from kloset_blocks.serving.startup import recovery_start

    assert recovery_start(label) == want


def test_wal_start_names_the_chunk_holding_the_lsn_backup_label_gives(fixtures_dir: Path) -> None:
    """On Kloset's fixture (a pg_basebackup): the chunks wal_start names are those of the segment
    backup_label names, from the chunk holding the LSN's offset (found here by the chunk list)."""
    import bisect

    from kloset_blocks.serving.startup import WAL_HEAD, wal_start
    from tests.conftest import server_for

    server = server_for(f"fs:{fixtures_dir / 'golden-plain'}", "pgdata=true")
    try:
        export = server.open("")
        snapshot = server.store.open_snapshot(server.default_export)
        label = snapshot.open_file(b"/backup_label")
        words = label.read(0, label.size).split(b"\n")[0].split()  # START WAL LOCATION: H/L (file F)
        segment = snapshot.open_file(b"/pg_wal/" + words[-1].rstrip(b")"))
        offset = int(words[3].split(b"/")[1], 16) % segment.size
        first = bisect.bisect_right(segment.offsets, offset) - 1
        last = bisect.bisect_right(segment.offsets, min(offset + WAL_HEAD, segment.size) - 1) - 1
        assert wal_start(export.image) == segment.macs[first : last + 1]
    finally:
        server.cleanup()
