# The decoded-chunk cache between the block image and the store.
#
# Strategy: one page read by Postgres needs its whole chunk decoded (a chunk is 512 KiB to 8 MiB of
# plaintext, LZ4 or GZIP compressed, maybe encrypted), so decoded chunks are kept in an LRU bounded
# in bytes and keyed by MAC: identical chunks across files and snapshots are one entry.
#
# Invariants:
# - Thread-safe (nbdkit PARALLEL): the LRU and the in-flight table are only touched under `_lock`;
#   fetching and decoding run outside it, and they release the GIL for the heavy work.
# - Concurrent misses on one MAC share one fetch: the first caller fetches, the others wait on its
#   future. A failed fetch is not cached: every waiter gets the error, the next get() tries again.
# - Prefetched chunks go through the same path, so a foreground get() of a chunk being prefetched
#   waits for that fetch instead of starting a second one. A prefetch still queued (no worker has
#   started it) is taken over by the get(): it fetches on its own thread and resolves the same
#   future, so a foreground read never waits behind the prefetch queue.
# - shutdown() fails the futures of prefetches it cancels, so nobody waits on them forever.
# - Memory is bounded by `max_bytes` plus the chunks in flight (at most workers + callers).
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass

from cachetools import LRUCache

from kloset_blocks.errors import StoreError


@dataclass
class ChunkStats:
    hits: int = 0
    misses: int = 0
    shared_waits: int = 0
    prefetched: int = 0
    prefetch_taken: int = 0  # queued prefetches a foreground get() fetched itself
    fetch_errors: int = 0
    bytes_decoded: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class ChunkCache:
    def __init__(
        self,
        fetch: Callable[[bytes], bytes],
        max_bytes: int = 512 << 20,
        prefetch_workers: int = 2,
    ) -> None:
        self._fetch = fetch
        self._lru: LRUCache[bytes, bytes] = LRUCache(maxsize=max(max_bytes, 1), getsizeof=_chunk_size)
        self._inflight: dict[bytes, Future[bytes]] = {}
        self._queued: dict[bytes, Future[bytes]] = {}  # prefetches no worker has started yet
        self._lock = threading.Lock()
        self._workers = prefetch_workers
        self._pool: ThreadPoolExecutor | None = None
        self.stats = ChunkStats()

    def get(self, mac: bytes) -> bytes:
        """The decoded chunk `mac`, from the cache or fetched once however many ask at once."""
        with self._lock:
            chunk = self._lru.get(mac)
            if chunk is not None:
                self.stats.hits += 1
                return chunk
            future = self._inflight.get(mac)
            if future is None:
                self.stats.misses += 1
                future = self._inflight[mac] = Future()
                fetch_here = True
            elif self._queued.pop(mac, None) is not None:
                self.stats.prefetch_taken += 1
                fetch_here = True
            else:
                self.stats.shared_waits += 1
                fetch_here = False
        return self._fill(mac, future) if fetch_here else future.result()

    def prefetch(self, macs: Iterable[bytes]) -> None:
        """Start fetching the chunks not cached nor in flight, in the background."""
        todo: list[tuple[bytes, Future[bytes]]] = []
        with self._lock:
            for mac in macs:
                if mac in self._lru or mac in self._inflight:
                    continue
                future = self._inflight[mac] = self._queued[mac] = Future()
                self.stats.prefetched += 1
                todo.append((mac, future))
        pool = self._executor()
        for mac, future in todo:
            pool.submit(self._run_prefetch, mac, future)

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        with self._lock:
            cancelled, self._queued = self._queued, {}
            for mac in cancelled:
                del self._inflight[mac]
        for future in cancelled.values():
            future.set_exception(StoreError("chunk cache shut down"))

    def _executor(self) -> ThreadPoolExecutor:
        # Created on first use, not in __init__: nbdkit forks after get_ready, and threads do not
        # survive a fork.
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="kloset-prefetch")
        return self._pool

    def _fill(self, mac: bytes, future: Future[bytes]) -> bytes:
        try:
            chunk = self._fetch(mac)
        except BaseException as e:
            with self._lock:
                self.stats.fetch_errors += 1
                del self._inflight[mac]
            future.set_exception(e)
            raise
        with self._lock:
            self.stats.bytes_decoded += len(chunk)
            if len(chunk) <= self._lru.maxsize:
                self._lru[mac] = chunk
            del self._inflight[mac]
        future.set_result(chunk)
        return chunk

    def _run_prefetch(self, mac: bytes, future: Future[bytes]) -> None:
        with self._lock:
            if self._queued.pop(mac, None) is None:
                return  # taken over by a get(), or cancelled
        self._fill_quietly(mac, future)

    def _fill_quietly(self, mac: bytes, future: Future[bytes]) -> None:
        # A failed prefetch is not an error for anyone yet: the foreground read that needs the
        # chunk fetches it again and reports the error to its own client.
        try:
            self._fill(mac, future)
        except Exception:
            future.exception()


def _chunk_size(chunk: bytes) -> int:
    # Zero-length chunks exist (empty files); give them a nominal size so the LRU stays bounded.
    return max(len(chunk), 64)
