# SnapshotFile.readinto (the block image's zero-copy path) against SnapshotFile.read (chunk pieces
# joined) and the fixture's manifest bytes, at ranges crossing chunk boundaries.
from __future__ import annotations

import random
from pathlib import Path

import pytest

from kloset_blocks.store import open_store

SNAP_A = "bf6afbae"


@pytest.fixture(scope="module")
def largest(fixtures_dir: Path):
    store = open_store(str(fixtures_dir / "golden-plain"))
    snap = store.open_snapshot(SNAP_A)
    path, _ = max(((p, e) for p, e in snap.walk() if e.is_reg), key=lambda pe: pe[1].size)
    yield snap.open_file(path)
    store.close()


def boundary_ranges(f, rng: random.Random) -> list[tuple[int, int]]:
    offsets = list(f.offsets)
    out = [(0, f.size), (0, 0), (f.size, 0), (0, 1), (f.size - 1, 1)]
    for b in offsets[1:-1][:20]:
        out += [(b - 1, 2), (b - 4096, 8192), (b, offsets[-1] - b)]
    for _ in range(50):
        off = rng.randrange(f.size)
        out.append((off, rng.randrange(f.size - off + 1)))
    return [(o, n) for o, n in out if o >= 0 and o + n <= f.size]


def test_readinto_equals_read(largest) -> None:
    f = largest
    assert len(f.macs) > 2, "needs a multi-chunk file"
    whole = f.read(0, f.size)
    for off, n in boundary_ranges(f, random.Random(5)):
        buf = bytearray(b"\xaa" * n)  # dirty: every byte must be written
        f.readinto(off, memoryview(buf))
        assert bytes(buf) == whole[off : off + n] == f.read(off, n), (off, n)


@pytest.mark.parametrize("where", ["before", "past_end"])
def test_readinto_outside_the_file_fails(largest, where: str) -> None:
    off = -1 if where == "before" else largest.size - 1
    with pytest.raises(ValueError):
        largest.readinto(off, memoryview(bytearray(2)))
