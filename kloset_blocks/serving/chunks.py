# The decoded-chunk cache between the block image and the store.
#
# Strategy: one page read by Postgres needs its whole chunk decoded (a chunk is 512 KiB to 8 MiB of
# plaintext, LZ4 or GZIP compressed, maybe encrypted), so decoded chunks are kept in memory bounded
# in bytes and keyed by MAC: identical chunks across files and snapshots are one entry.
#
# Replacement is 2Q (Johnson and Shasha, VLDB 1994), the idea behind the kernel's inactive/active
# page lists and Postgres' ring buffers for scans: a chunk fetched for the first time goes into
# `_recent`, a FIFO of at most a quarter of the cache and RECENT_MAX; hits there do not reorder it
# (the sub-reads of one chunk, a readahead window read on: one use). Pushed out of `_recent`, its
# MAC stays in `_ghosts`; fetched again while remembered there, it goes into `_main`, the LRU of
# chunks used more than once, which has the rest of the bytes. So a long scan (nbdcopy of the whole
# image, a sequential scan of a big table) cycles through `_recent` and does not push out the
# catalog and index chunks a database keeps coming back to. It also keeps a cold scan fast: memory
# freed by `_recent` is reused by malloc for the next chunks, where filling a cache of fresh memory
# costs a page fault per 4 KiB (bench/RESULTS.md, "Cold read at target").
#
# Invariants:
# - Thread-safe (nbdkit PARALLEL) with no lock on the paths every request takes: a hit is a dict
#   get and move_to_end, a miss claims the chunk with dict.setdefault on the in-flight table; each
#   is one C call, atomic under the GIL. `_lock` guards only the queues' byte counts (insert and
#   evict, once per fetched chunk). Why: a contended Python lock is re-taken with the GIL still to
#   win, so under many nbdkit threads it becomes a convoy; an LRU that reorders on every read and is
#   not thread-safe would need that lock on hits too. Fetching and decoding release the GIL for the
#   heavy work.
# - A chunk is put in the cache before it leaves the in-flight table, so a get() always finds it
#   in one or the other (or fetches it anew after eviction).
# - Concurrent misses on one MAC share one fetch: the first caller fetches, the others wait for it.
#   A failed fetch is not cached: every waiter gets the error, the next get() tries again.
# - Prefetched chunks go through the same path, so a foreground get() of a chunk being prefetched
#   waits for that fetch instead of starting a second one. A prefetch still queued (no worker has
#   started it) is taken over by the get(): it fetches on its own thread and completes the same
#   fetch, so a foreground read never waits behind the prefetch queue.
# - shutdown() fails the prefetches it cancels, so nobody waits on them forever.
# - Memory is bounded by `max_bytes` plus the chunks in flight (at most workers + callers).
# - Counters are bumped without a lock too, with next() on an itertools.count (one C call): a
#   `+= 1` on an attribute is three bytecodes, and loses updates when threads interleave.
#
# For the same reason a fetch in flight is a bare lock held until its result is in (waiting =
# acquiring it), not a concurrent.futures.Future (a Condition built in Python per chunk), and
# prefetches go to the workers through a SimpleQueue, whose put() never blocks: with
# ThreadPoolExecutor.submit(), which takes a process-wide lock, request threads queue behind each
# other on it (bench/RESULTS.md, "Cold read at target", has the profile).
from __future__ import annotations

import _thread
import contextlib
import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from queue import SimpleQueue

from kloset_blocks.errors import StoreError
from kloset_blocks.store.codec import Buffer

# 2Q's first-use queue: at most a quarter of the cache, and at most this much: room for the
# readahead windows (8 MiB) of a few concurrent streams, small enough to be reused while warm.
RECENT_MAX = 64 << 20
# MACs remembered after they leave the first-use queue: one per this many bytes of cache.
GHOST_PER = 128 << 10


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


class Count:
    """A counter threads bump without a lock (see the module comment)."""

    __slots__ = ("_it",)

    def __init__(self) -> None:
        self._it = itertools.count(1)

    def bump(self) -> None:
        next(self._it)

    @property
    def value(self) -> int:
        return int(repr(self._it)[len("count(") : -1]) - 1  # the next value, minus the start


class Fetch:
    """One fetch of one chunk, shared by everyone who asks for that chunk meanwhile."""

    __slots__ = ("_done", "chunk", "error")

    def __init__(self) -> None:
        self._done = _thread.allocate_lock()
        self._done.acquire()  # held until the result is in
        self.chunk: Buffer | None = None
        self.error: BaseException | None = None

    def finish(self, chunk: Buffer | None, error: BaseException | None = None) -> None:
        self.chunk, self.error = chunk, error
        self._done.release()

    def wait(self) -> None:
        self._done.acquire()
        self._done.release()

    def result(self) -> Buffer:
        self.wait()
        if self.error is not None:
            raise self.error
        return self.chunk  # type: ignore[return-value]


class ChunkCache:
    def __init__(
        self,
        fetch: Callable[[bytes], Buffer],
        max_bytes: int = 512 << 20,
        prefetch_workers: int = 2,
    ) -> None:
        self._fetch = fetch
        self.max_bytes = max(max_bytes, 1)
        # 2Q (see the module comment): first use in _recent (FIFO), use again in _main (LRU).
        self._recent: OrderedDict[bytes, Buffer] = OrderedDict()  # oldest first
        self._main: OrderedDict[bytes, Buffer] = OrderedDict()  # least recently used first
        self._ghosts: OrderedDict[bytes, None] = OrderedDict()  # MACs pushed out of _recent
        self.recent_max = min(self.max_bytes // 4, RECENT_MAX)
        self._ghosts_max = max(1024, self.max_bytes // GHOST_PER)
        self._recent_bytes = self._main_bytes = 0  # sums of _chunk_size, under _lock
        self._inflight: dict[bytes, Fetch] = {}
        self._queued: dict[bytes, Fetch] = {}  # prefetches no worker has started yet
        self._lock = threading.Lock()
        self._queue: SimpleQueue[bytes | None] = SimpleQueue()
        self._nworkers = prefetch_workers
        self._workers: list[threading.Thread] = []
        self._workers_lock = threading.Lock()
        self._shut = False  # shutdown() was called
        self._hits, self._misses, self._shared_waits = Count(), Count(), Count()
        self._prefetched, self._prefetch_taken = Count(), Count()
        self._fetch_errors, self._bytes_decoded = Count(), 0

    @property
    def stats(self) -> ChunkStats:
        return ChunkStats(
            hits=self._hits.value,
            misses=self._misses.value,
            shared_waits=self._shared_waits.value,
            prefetched=self._prefetched.value,
            prefetch_taken=self._prefetch_taken.value,
            fetch_errors=self._fetch_errors.value,
            bytes_decoded=self._bytes_decoded,
        )

    @property
    def cached_bytes(self) -> int:
        return self._recent_bytes + self._main_bytes

    def cached_macs(self) -> list[bytes]:
        return [*self._recent, *self._main]

    def get(self, mac: bytes) -> Buffer:
        """The decoded chunk `mac`, from the cache or fetched once however many ask at once."""
        chunk = self._lookup(mac)
        if chunk is not None:
            self._hits.bump()
            return chunk
        mine = Fetch()
        fetch = self._inflight.setdefault(mac, mine)
        if fetch is mine:
            chunk = self._lookup(mac)  # filled between the lookup and the claim?
            if chunk is not None:
                self._inflight.pop(mac, None)
                mine.finish(chunk)
                self._hits.bump()
                return chunk
            self._misses.bump()
            return self._fill(mac, mine)
        if self._queued.pop(mac, None) is not None:
            self._prefetch_taken.bump()
            return self._fill(mac, fetch)
        self._shared_waits.bump()
        return fetch.result()

    def _lookup(self, mac: bytes) -> Buffer | None:
        chunk = self._recent.get(mac)  # a hit here is the same use going on: no reordering
        if chunk is not None:
            return chunk
        chunk = self._main.get(mac)
        if chunk is not None:
            with contextlib.suppress(KeyError):  # evicted meanwhile: still a valid chunk to return
                self._main.move_to_end(mac)
        return chunk

    def _cached(self, mac: bytes) -> bool:
        return mac in self._recent or mac in self._main

    def prefetch(self, macs: Iterable[bytes]) -> None:
        """Start fetching the chunks not cached nor in flight, in the background."""
        if self._shut:
            return
        started = False
        for mac in macs:
            if self._cached(mac):
                continue
            fetch = Fetch()
            if self._inflight.setdefault(mac, fetch) is not fetch:
                continue
            if self._cached(mac):  # filled meanwhile
                self._inflight.pop(mac, None)
                fetch.finish(self._lookup(mac))
                continue
            self._queued[mac] = fetch
            self._prefetched.bump()
            if not started:
                self._start_workers()
                started = True
            self._queue.put(mac)

    def wait_idle(self) -> None:
        """Return once no fetch is in flight (prefetches queued now included)."""
        while pending := list(self._inflight.values()):
            for fetch in pending:
                fetch.wait()

    def shutdown(self) -> None:
        """Stop the prefetch workers (for good: a prefetch asked for later fetches nothing; get()
        still works). Workers started after this took the list would eat its stop sentinels."""
        with self._workers_lock:
            self._shut = True
            workers, self._workers = self._workers, []
        cancelled: list[Fetch] = []
        for mac in list(self._queued):
            fetch = self._queued.pop(mac, None)
            if fetch is not None:  # else a get() or a worker took it meanwhile
                self._inflight.pop(mac, None)
                cancelled.append(fetch)
        for _ in workers:
            self._queue.put(None)
        for fetch in cancelled:
            fetch.finish(None, StoreError("chunk cache shut down"))
        for worker in workers:
            worker.join()

    def _start_workers(self) -> None:
        # Started on first use, not in __init__: nbdkit forks after get_ready, and threads do not
        # survive a fork.
        if len(self._workers) < self._nworkers:
            with self._workers_lock:
                while not self._shut and len(self._workers) < self._nworkers:
                    worker = threading.Thread(target=self._work, name="kloset-prefetch", daemon=True)
                    worker.start()
                    self._workers.append(worker)

    def _work(self) -> None:
        while (mac := self._queue.get()) is not None:
            fetch = self._queued.pop(mac, None)
            if fetch is not None:  # else taken over by a get(), or cancelled
                self._fill_quietly(mac, fetch)

    def _fill(self, mac: bytes, fetch: Fetch) -> Buffer:
        try:
            chunk = self._fetch(mac)
        except BaseException as e:
            self._fetch_errors.bump()
            self._inflight.pop(mac, None)
            fetch.finish(None, e)
            raise
        self._insert(mac, chunk)
        self._inflight.pop(mac, None)
        fetch.finish(chunk)
        return chunk

    def _insert(self, mac: bytes, chunk: Buffer) -> None:
        size = _chunk_size(chunk)
        evicted: list[Buffer] = []  # freed after the lock is released
        with self._lock:
            self._bytes_decoded += len(chunk)
            if size > self.max_bytes or self._cached(mac):
                return
            if mac in self._ghosts:
                del self._ghosts[mac]
                self._main[mac] = chunk
                self._main_bytes += size
            else:
                self._recent[mac] = chunk
                self._recent_bytes += size
                while self._recent_bytes > self.recent_max and len(self._recent) > 1:
                    evicted.append(self._evict_recent())
            while self._recent_bytes + self._main_bytes > self.max_bytes:
                if self._main:
                    _, old = self._main.popitem(last=False)
                    self._main_bytes -= _chunk_size(old)
                    evicted.append(old)
                else:
                    evicted.append(self._evict_recent())

    def _evict_recent(self) -> Buffer:
        mac, old = self._recent.popitem(last=False)
        self._recent_bytes -= _chunk_size(old)
        self._ghosts[mac] = None
        if len(self._ghosts) > self._ghosts_max:
            self._ghosts.popitem(last=False)
        return old

    def _fill_quietly(self, mac: bytes, fetch: Fetch) -> None:
        # A failed prefetch is not an error for anyone yet: the foreground read that needs the
        # chunk fetches it again and reports the error to its own client.
        with contextlib.suppress(Exception):
            self._fill(mac, fetch)


def _chunk_size(chunk: Buffer) -> int:
    # Zero-length chunks exist (empty files); give them a nominal size so the cache stays bounded.
    return max(len(chunk), 64)
