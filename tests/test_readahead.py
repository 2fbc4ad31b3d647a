# The plugin's adaptive readahead, through Server in-process on the golden fixture (a real
# Postgres 15 cluster written by Kloset's own code): a stream of sequential reads ramps its window
# up from the request size to `readahead=`, and never prefetches past the end of the file it reads.
# Oracles independent of the readahead code: the image's regions (which file each byte belongs to)
# and `chunk_macs` of a file's own bytes; every prefetch is waited for before counting, so the
# counts do not depend on thread timing.
from __future__ import annotations

from pathlib import Path

import pytest

from kloset_blocks.ext4.layout import BYTES, FILE, ZERO
from kloset_blocks.image.snapshot import chunk_macs
from kloset_blocks.serving.server import RA_MIN, Server
from tests.conftest import server_for

SNAP_A = "bf6afbae"
KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture(scope="module")
def store(fixtures_dir: Path) -> Path:
    return fixtures_dir / "golden-plain"


def settle(server: Server) -> None:
    """Wait until every prefetch asked for so far has been planned and fetched."""
    server.settle()


def read(server: Server, offset: int, length: int) -> None:
    export = server.exports[server.default_export]
    server.pread(export, memoryview(bytearray(length)), offset)


def file_regions(server: Server) -> list:
    image = server.exports[server.default_export].image
    return [r for r in image.regions if r.kind == FILE and r.src_len == r.length]


def file_macs(server: Server, region) -> set[bytes]:
    image = server.exports[server.default_export].image
    return set(chunk_macs(image, region.start, region.src_len))


def cached(server: Server) -> set[bytes]:
    assert server.cache is not None
    return set(server.cache.cached_macs())


@pytest.fixture(scope="module")
def small_file(store: Path):
    """A 16-64 KiB file whose region is followed, within 8 MiB, by other files' chunks: what the
    fixed 8 MiB window used to prefetch."""
    server = server_for(store)
    image = server.exports[server.default_export].image
    for r in file_regions(server):
        if 16 * KiB <= r.src_len <= 64 * KiB and r.start + 8 * MiB <= image.size:
            ahead = set(chunk_macs(image, r.start, 8 * MiB))
            if len(ahead - file_macs(server, r)) >= 3:
                return r
    pytest.fail("no small file followed by other files in the golden image")


@pytest.fixture(scope="module")
def big_file(store: Path):
    server = server_for(store)
    r = max(file_regions(server), key=lambda r: r.src_len)
    assert r.src_len >= 16 * MiB and len(file_macs(server, r)) >= 8, "the largest file should be big"
    return r


@pytest.mark.parametrize("readahead", ["8M", "1M"])
def test_sequential_reads_of_a_small_file_stay_in_it(store: Path, small_file, readahead: str) -> None:
    server = server_for(store, f"readahead={readahead}")
    before = cached(server)
    for n in range(small_file.src_len // (8 * KiB)):
        read(server, small_file.start + n * 8 * KiB, 8 * KiB)
        settle(server)
    new = cached(server) - before
    assert new and new <= file_macs(server, small_file)
    stats = server.cache.stats
    assert stats.misses + stats.prefetched == len(new)
    server.cleanup()


def test_a_long_sequential_read_ramps_up_and_is_served_ahead(store: Path, big_file) -> None:
    server = server_for(store)
    export = server.exports[server.default_export]
    request = 128 * KiB
    before = cached(server)
    misses_after: list[int] = []
    windows: list[int] = []
    for offset in range(big_file.start, big_file.start + big_file.src_len - request + 1, request):
        read(server, offset, request)
        windows.append(export.streams[offset + request].window)
        settle(server)
        misses_after.append(server.cache.stats.misses)
    stats = server.cache.stats
    # The window: 0 after the stream's first read, then the request size (>= RA_MIN), doubling, 8M.
    assert windows[:5] == [0, max(request, RA_MIN), 2 * max(request, RA_MIN), 4 * request, 8 * request]
    assert windows[-1] == 8 * MiB and windows == sorted(windows)
    # Only the first two reads miss: from then on the prefetch has always run ahead of the reader.
    assert misses_after[-1] == misses_after[1] <= 2
    assert stats.prefetched > 0 and stats.hits >= len(windows) - 2
    assert cached(server) - before <= file_macs(server, big_file)  # nothing past its end
    server.cleanup()


def test_readahead_zero_prefetches_nothing(store: Path, big_file) -> None:
    server = server_for(store, "readahead=0")
    for offset in range(big_file.start, big_file.start + 4 * MiB, 256 * KiB):
        read(server, offset, 256 * KiB)
    settle(server)
    assert server.cache.stats.prefetched == 0
    assert not server.exports[server.default_export].streams
    server.cleanup()


def test_random_reads_prefetch_nothing(store: Path, big_file) -> None:
    server = server_for(store)
    for k in (7, 3, 11, 5, 0, 9):
        read(server, big_file.start + k * MiB, 8 * KiB)
    settle(server)
    assert server.cache.stats.prefetched == 0
    server.cleanup()


def test_cache_hint_still_prefetches_its_range(store: Path, big_file) -> None:
    server = server_for(store)
    export = server.exports[server.default_export]
    server.prefetch(export, big_file.start, 4 * MiB)
    settle(server)
    image = export.image
    assert set(chunk_macs(image, big_file.start, 4 * MiB)) <= cached(server)
    assert server.cache.stats.prefetched > 0
    server.cleanup()


def test_file_end_of_each_kind_of_region(store: Path) -> None:
    server = server_for(store)
    image = server.exports[server.default_export].image
    seen: set[int] = set()
    for r in image.regions:
        if r.kind in seen:
            continue
        last = r.start + r.length - 1
        if r.kind == FILE and r.src_len < r.length:  # a file with padding: inside, then in the padding
            assert image.file_end(r.start) == r.start + r.src_len
            assert image.file_end(last) <= last
            seen.add(r.kind)
        elif r.kind in (BYTES, ZERO):
            assert image.file_end(r.start) <= r.start and image.file_end(last) <= last
            seen.add(r.kind)
    assert seen == {FILE, BYTES, ZERO}
