from __future__ import annotations

import hashlib
import threading
import time

import pytest

from kloset_blocks.errors import CorruptionError
from kloset_blocks.serving.chunks import ChunkCache


class CountingSource:
    """Chunks derived from their MAC; counts fetches per MAC and can fail or be slow on purpose."""

    def __init__(self, size: int = 1000, delay: float = 0.0, bad: frozenset[bytes] = frozenset()) -> None:
        self.size = size
        self.delay = delay
        self.bad = bad
        self.calls: dict[bytes, int] = {}
        self._lock = threading.Lock()

    def __call__(self, mac: bytes) -> bytes:
        with self._lock:
            self.calls[mac] = self.calls.get(mac, 0) + 1
        time.sleep(self.delay)
        if mac in self.bad:
            raise CorruptionError(f"blob {mac.hex()} fails its MAC")
        return hashlib.sha256(mac).digest() * (self.size // 32)


def mac(i: int) -> bytes:
    return i.to_bytes(32, "big")


def test_hit_after_miss_returns_same_bytes_and_fetches_once() -> None:
    source = CountingSource()
    cache = ChunkCache(source, max_bytes=1 << 20)
    first = cache.get(mac(1))
    assert cache.get(mac(1)) == first == source(mac(1))
    assert source.calls[mac(1)] == 2  # once by the cache, once by the assertion above
    assert (cache.stats.hits, cache.stats.misses) == (1, 1)


def test_concurrent_misses_share_one_fetch() -> None:
    source = CountingSource(delay=0.2)
    cache = ChunkCache(source)
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda: results.append(cache.get(mac(7)))) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert source.calls[mac(7)] == 1
    assert len(set(results)) == 1 and len(results) == 16
    assert cache.stats.shared_waits == 15


def test_lru_is_bounded_in_bytes() -> None:
    source = CountingSource(size=1024)
    cache = ChunkCache(source, max_bytes=10 * 1024)
    for i in range(50):
        cache.get(mac(i))
    assert cache.cached_bytes <= 10 * 1024
    cache.get(mac(49))  # most recent: still cached
    assert source.calls[mac(49)] == 1
    cache.get(mac(0))  # evicted long ago: fetched again
    assert source.calls[mac(0)] == 2


def test_errors_reach_every_waiter_and_are_not_cached() -> None:
    source = CountingSource(delay=0.1, bad=frozenset({mac(3)}))
    cache = ChunkCache(source)
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            cache.get(mac(3))
        except CorruptionError as e:
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 4
    with pytest.raises(CorruptionError):
        cache.get(mac(3))
    assert source.calls[mac(3)] == 2  # the failure was not cached
    assert cache.get(mac(4)) == source(mac(4))  # other chunks unaffected


def test_prefetch_fills_the_cache_in_background_and_get_joins_it() -> None:
    source = CountingSource(delay=0.1)
    cache = ChunkCache(source, prefetch_workers=2)
    cache.prefetch([mac(i) for i in range(4)])
    for i in range(4):
        assert cache.get(mac(i)) == source(mac(i))
    assert all(source.calls[mac(i)] == 2 for i in range(4))  # one prefetch + one by the assertion
    assert cache.stats.prefetched == 4 and cache.stats.misses == 0
    cache.shutdown()


def test_counters_are_exact_under_many_threads() -> None:
    # The hit path takes no lock: the counters must still add up (a `+= 1` would lose some).
    source = CountingSource(size=64)
    cache = ChunkCache(source)
    macs = [mac(i) for i in range(8)]
    for m in macs:
        cache.get(m)

    def hammer() -> None:
        for _ in range(5000):
            for m in macs:
                cache.get(m)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.stats.misses == 8 and cache.stats.hits == 8 * 5000 * 8
    assert all(source.calls[m] == 1 for m in macs)


def test_a_scan_does_not_push_out_a_chunk_used_twice() -> None:
    # 2Q: a chunk used again after it left the first-use queue lives in the main LRU, which a
    # scan of chunks used once never enters. A plain LRU of the same size would evict it.
    source = CountingSource(size=1024)
    cache = ChunkCache(source, max_bytes=64 * 1024)
    assert cache.recent_max == 16 * 1024
    hot = mac(255)
    cache.get(hot)
    for i in range(20):  # pushes `hot` out of the first-use queue: remembered as a ghost
        cache.get(mac(i))
    cache.get(hot)
    assert source.calls[hot] == 2
    for i in range(1000, 3000):  # a long scan, every chunk used once
        cache.get(i.to_bytes(32, "big"))
    assert cache.get(hot) == source(hot)
    assert source.calls[hot] == 3  # the one above; the get() before it was a hit
    assert cache.stats.hits >= 1
    assert cache.cached_bytes <= 64 * 1024


def test_first_use_queue_is_bounded_and_hits_in_it_need_no_refetch() -> None:
    source = CountingSource(size=1024)
    cache = ChunkCache(source, max_bytes=1 << 20)  # first-use queue: 256 KiB
    for i in range(200):
        cache.get(mac(i % 250))
        cache.get(mac(i % 250))  # a sub-read of the same chunk: a hit, no refetch
    assert all(source.calls[mac(i)] == 1 for i in range(200))
    assert cache.cached_bytes <= cache.recent_max
