# ChunkCache prefetch queue: a foreground get() takes over a prefetch no worker has started (so it
# never waits behind the queue), and shutdown() fails cancelled prefetches instead of leaving
# them pending forever (a later get() of that chunk would hang).
from __future__ import annotations

import threading
import time
from collections import Counter

from kloset_blocks.serving.chunks import ChunkCache


class SlowSource:
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.calls: Counter[bytes] = Counter()
        self._lock = threading.Lock()

    def __call__(self, mac: bytes) -> bytes:
        with self._lock:
            self.calls[mac] += 1
        time.sleep(self.delay)
        return mac * 100


def mac(i: int) -> bytes:
    return bytes([i]) * 32


def test_get_takes_over_a_queued_prefetch() -> None:
    source = SlowSource(0.3)
    cache = ChunkCache(source, prefetch_workers=1)
    cache.prefetch([mac(i) for i in range(4)])
    t = time.perf_counter()
    assert cache.get(mac(3)) == mac(3) * 100
    assert time.perf_counter() - t < 0.9  # not behind the three queued before it
    assert cache.stats.prefetch_taken == 1 and cache.stats.misses == 0
    cache.shutdown()
    assert source.calls[mac(3)] == 1


def test_shutdown_fails_cancelled_prefetches_and_get_still_works() -> None:
    source = SlowSource(0.2)
    cache = ChunkCache(source, prefetch_workers=1)
    cache.prefetch([mac(i) for i in range(5)])
    cache.shutdown()
    result: list[bytes] = []
    reader = threading.Thread(target=lambda: result.append(cache.get(mac(4))), daemon=True)
    reader.start()
    reader.join(timeout=5)
    assert result == [mac(4) * 100]
    assert source.calls[mac(4)] == 1
    cache.shutdown()


def test_prefetch_after_shutdown_starts_no_worker_and_shutdown_returns() -> None:
    """A prefetch that comes after shutdown (a background prefetcher still running at cleanup) once
    started workers that ate the stop sentinels of the ones shutdown joined: it hung for good."""
    source = SlowSource(0.05)
    cache = ChunkCache(source, prefetch_workers=2)
    cache.prefetch([mac(0)])
    cache.shutdown()
    before = threading.active_count()
    cache.prefetch([mac(i) for i in range(1, 5)])
    assert threading.active_count() == before  # no worker started
    assert cache.get(mac(3)) == mac(3) * 100  # the foreground still reads
    done = threading.Thread(target=cache.shutdown, daemon=True)
    done.start()
    done.join(timeout=10)
    assert not done.is_alive()
