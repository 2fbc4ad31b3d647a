# Reading blobs out of packfiles: one ranged read (Backend.read_range: os.pread on fs, a ranged GET
# on S3) of exactly the blob's bytes at object offset 16 + offset (offsets are relative to the
# payload, §5.2), then decode and, for content-addressed types, check MAC(plaintext) == the blob id
# (§3.2). Nothing ever reads a whole packfile.
#
# Invariants:
# - Thread-safe: the backend is; `_checked` (packfiles whose header was checked) and the pool are
#   only mutated under `_lock`.
# - Errors name the packfile, the blob type and MAC: CorruptionError for damaged bytes,
#   UnsupportedVersion for blobs recorded with a newer version.
# - `bytes_read` / `preads` count every pread (encoded bytes, any blob type) for the nbdkit plugin's
#   stats; updated under `_count_lock` since `+=` on an attribute is not atomic across threads.
# - read_many coalesces blobs lying close together in one packfile into one read (<= 4 MiB,
#   like Go's read planner), which is what makes scanning a VFS tree cheap; on a remote store the
#   reads of different spans are in flight at once.
# - warm() fetches spans of packfiles ahead, in parallel, and keeps their bytes (at most
#   WARM_KEPT in all): a later pread that lies inside a kept span is served from memory. The bytes
#   are the store's, checked as any read's are (decode, MAC), so a span only saves round trips.
from __future__ import annotations

import bisect
import contextlib
import os
import struct
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from kloset_blocks.errors import CorruptionError, KlosetError, StoreError, UnsupportedVersion
from kloset_blocks.store import codec as c
from kloset_blocks.store.backend import Backend, as_backend
from kloset_blocks.store.state import Location, LocationIndex, NamedCache

MAX_COALESCED = 4 << 20
PACKFILE_VERSION_MAX = c.pack_version(1, 0, 0)
MAX_GAP = 64 << 10
# Metadata preloaded from a remote store: every blob but file contents (chunks, objects: the
# objects lie among the chunks, so fetching them would fetch the data too) and padding, when they
# add up to at most PRELOAD_MAX encoded bytes.
PRELOAD_TYPES = frozenset(
    {
        c.RT_SNAPSHOT,
        c.RT_VFS_BTREE,
        c.RT_VFS_NODE,
        c.RT_VFS_ENTRY,
        c.RT_ERROR_BTREE,
        c.RT_ERROR_NODE,
        c.RT_XATTR_BTREE,
        c.RT_XATTR_NODE,
        c.RT_BTREE_ROOT,
        c.RT_BTREE_NODE,
        c.RT_VFS_SUMMARY,
    }
)
PRELOAD_MAX = 64 << 20
# Bytes of packfile spans warm() keeps in memory, all calls together.
WARM_KEPT = 64 << 20


class Packfiles:
    def __init__(self, backend: Backend | str, codec: c.Codec, index: LocationIndex) -> None:
        self.backend = as_backend(backend)
        self.codec = codec
        self.index = index
        self._checked: set[bytes] = set()
        self._header_reads: dict[bytes, Future[bytes]] = {}  # pread's, in flight
        self._lock = threading.Lock()
        self._closed = False
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = os.getpid()
        self._count_lock = threading.Lock()
        self.bytes_read = 0
        self.preads = 0
        self._preloaded: dict[tuple[int, bytes], bytes] = {}
        # warm(): packfile -> its kept spans as (payload offset, bytes), sorted; replaced, never
        # mutated, so that readers need no lock.
        self._spans: dict[bytes, list[tuple[int, bytes]]] = {}
        self._kept_bytes = 0

    def preload(
        self,
        rtypes: frozenset[int] = PRELOAD_TYPES,
        limit: int = PRELOAD_MAX,
        cache: NamedCache | None = None,
    ) -> int:
        """Fetch every blob of `rtypes` at once, in coalesced ranges all in flight together, and keep
        their encoded bytes (decoded and MAC-checked when read, like any blob): on a remote store a
        B-tree descent is otherwise one round trip per level. Nothing when they exceed `limit`
        bytes. With `cache`, each span is kept there (packfiles never change) and read from it
        next time. Returns the bytes kept."""
        blobs = list(self.index.blobs_of_types(rtypes))
        total = sum(loc.length for _, _, loc in blobs)
        if not blobs or total > limit:
            return 0
        by_pf: dict[bytes, list[tuple[int, Location]]] = {}
        for i, (_, _, loc) in enumerate(blobs):
            by_pf.setdefault(loc.packfile, []).append((i, loc))
        runs = [run for pf, items in by_pf.items() for run in plan_runs(pf, items)]
        kept: dict[tuple[int, bytes], bytes] = {}

        def fetch(run: tuple[Location, list[tuple[int, Location]]]) -> None:
            span, items = run
            data = _kept_span(cache, span)
            if data is None:
                try:
                    data = self.pread(span)
                except (FileNotFoundError, CorruptionError):
                    return  # read (and reported) blob by blob later, if ever needed
                _keep_span(cache, span, data)
            buf = memoryview(data)
            for i, loc in items:
                rel = loc.offset - span.offset
                kept[(blobs[i][0], blobs[i][1])] = bytes(buf[rel : rel + loc.length])

        for future in [self.pool().submit(fetch, run) for run in runs]:
            future.result()
        self._preloaded = kept
        return total

    def warm(
        self, locs: Sequence[Location], budget: int, lead: int = 0, cache: NamedCache | None = None
    ) -> int:
        """Fetch the packfile bytes around `locs` (the most wanted first) in coalesced spans, all in
        flight together, within `budget` bytes, and keep them: a later read of any blob inside a
        span costs no request, the blobs asked for and their neighbours alike (a small file's
        chunks lie just before its object). Each span starts up to `lead` bytes before its first
        blob (not before the packfile's payload). With `cache`, spans are kept there too and read
        from it next time (the same `locs` make the same spans). Returns the bytes of the spans."""
        budget = min(budget, WARM_KEPT - self._kept_bytes)
        by_pf: dict[bytes, list[tuple[int, Location]]] = {}
        for rank, loc in enumerate(locs):
            if not self.in_span(loc):
                by_pf.setdefault(loc.packfile, []).append((rank, loc))
        runs = sorted(
            (min(rank for rank, _ in items), _reach_back(span, lead))
            for pf, located in by_pf.items()
            for span, items in plan_runs(pf, located)
        )
        chosen: list[Location] = []
        total = 0
        for _, span in runs:
            if total + span.length <= budget:
                chosen.append(span)
                total += span.length
        # Each packfile's header is checked by a request of its own, in flight with the spans (a
        # span far from the start would otherwise wait for its header's round trip).
        fetched = [(span, data) for span in chosen if (data := _kept_span(cache, span)) is not None]
        on_disk = {span for span, _ in fetched}
        chosen = [span for span in chosen if span not in on_disk]
        unchecked = {span.packfile for span in chosen if span.packfile not in self._checked}
        bad: set[bytes] = set()

        def fetch(span: Location) -> None:
            with contextlib.suppress(FileNotFoundError, KlosetError):  # read blob by blob later
                data = self._read(span.packfile, c.HEADER_SIZE + span.offset, span.length)
                fetched.append((span, data))
                _keep_span(cache, span, data)  # its blobs are checked when read

        def check(packfile: bytes) -> None:
            try:
                self._check_header(self.backend.read_range(self.key(packfile), 0, c.HEADER_SIZE), packfile)
            except (FileNotFoundError, KlosetError):
                bad.add(packfile)  # its blobs are read (and the error said) one by one later

        pool = self.pool()
        futures = [pool.submit(check, pf) for pf in unchecked] + [pool.submit(fetch, s) for s in chosen]
        for future in futures:
            future.result()
        with self._lock:
            spans = {pf: list(kept) for pf, kept in self._spans.items()}
            for span, data in fetched:
                if span.packfile not in bad and len(data) == span.length:
                    spans.setdefault(span.packfile, []).append((span.offset, data))
            spans = {pf: _merged(kept) for pf, kept in spans.items()}
            self._spans = spans
            self._kept_bytes = sum(len(data) for kept in spans.values() for _, data in kept)
        return total

    def warmed(self, most: int) -> list[str]:
        """The keys of the packfiles warm() kept spans of (up to `most`, the most bytes first):
        the next reads that miss are likeliest there (a file's chunks lie near its object)."""
        kept = sorted(self._spans.items(), key=lambda item: -sum(len(data) for _, data in item[1]))
        return [self.key(pf) for pf, _ in kept[:most]]

    def in_span(self, loc: Location) -> bool:
        """Whether a span warm() kept holds the blob whole."""
        return self._span_bytes_of(loc) is not None

    def _span_bytes_of(self, loc: Location) -> bytes | None:
        """The blob's bytes when a kept span holds them whole."""
        kept = self._spans.get(loc.packfile)
        if not kept:
            return None
        i = bisect.bisect_right(kept, loc.offset, key=lambda item: item[0]) - 1
        if i < 0:
            return None
        start, data = kept[i]
        rel = loc.offset - start
        if rel + loc.length > len(data):
            return None
        return data[rel : rel + loc.length]

    # ------------------------------------------------------------ files

    @staticmethod
    def key(packfile: bytes) -> str:
        name = packfile.hex()
        return f"packfiles/{name[:2]}/{name}"

    def path(self, packfile: bytes) -> str:
        return self.backend.describe(self.key(packfile))

    def _check_header(self, head: bytes, packfile: bytes) -> None:
        """Magic, type and version of the wrapper, once per packfile (the trailer MAC would need
        the whole file: blobs are checked by their own MACs instead)."""
        path = self.path(packfile)
        if len(head) < c.HEADER_SIZE or head[:8] not in (c.MAGIC, c.LEGACY_MAGIC):
            raise CorruptionError(f"packfile {path}: not a kloset object (bad magic)")
        rtype, version = struct.unpack_from("<II", head, 8)
        if rtype != c.RT_PACKFILE:
            raise CorruptionError(f"packfile {path}: resource type is {c.rt_name(rtype)}, expected packfile")
        if version > PACKFILE_VERSION_MAX:
            raise UnsupportedVersion(
                f"unsupported packfile version {c.version_str(version)} (this reader supports 1.0.0): {path}"
            )
        with self._lock:
            self._checked.add(packfile)

    def _header_read(self, packfile: bytes) -> Future[bytes]:
        """The packfile's header, read in a thread of its own (one per packfile at a time; the
        pool's threads may be the ones waiting for it)."""
        with self._lock:
            reading = self._header_reads.get(packfile)
            if reading is not None:
                return reading
            reading = self._header_reads[packfile] = Future()

        def read() -> None:
            try:
                reading.set_result(self.backend.read_range(self.key(packfile), 0, c.HEADER_SIZE))
            except BaseException as e:
                reading.set_exception(e)
            finally:
                with self._lock:
                    self._header_reads.pop(packfile, None)  # checked by the waiters, or read again

        threading.Thread(target=read, name="kloset-header", daemon=True).start()
        return reading

    def stop_threads(self) -> None:
        """End the fetch pool's threads (a later read makes a new pool). nbdkit forks with C's
        fork() after get_ready, so Python's at-fork handlers do not run: a thread alive then would
        be waited for forever at the child's exit."""
        with self._lock:
            pool, self._pool = self._pool, None
            header_reads = list(self._header_reads.values())
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for reading in header_reads:  # each ends within the backend's deadline
            with contextlib.suppress(BaseException):
                reading.result()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.stop_threads()
        self.backend.close()

    def _read(self, packfile: bytes, offset: int, length: int) -> bytes:
        if self._closed:
            raise StoreError("store is closed")
        data = self.backend.read_range(self.key(packfile), offset, length)
        with self._count_lock:
            self.bytes_read += len(data)
            self.preads += 1
        return data

    def pread(self, loc: Location) -> bytes:
        """The encoded bytes of one blob (FileNotFoundError when its packfile is gone). The
        packfile's header is checked on its first read: on a remote store within the same request
        when the blob lies near the start, else by a request in flight with the blob's (one round
        trip, not two)."""
        if self._spans and (data := self._span_bytes_of(loc)) is not None:
            return data
        start = c.HEADER_SIZE + loc.offset
        if loc.packfile in self._checked:
            data = self._read(loc.packfile, start, loc.length)
        elif start <= MAX_GAP and self.backend.location.remote:
            data = self._read(loc.packfile, 0, start + loc.length)
            self._check_header(data[: c.HEADER_SIZE], loc.packfile)
            data = data[start:]
        elif self.backend.location.remote:  # the header's request in flight with the blob's
            header = self._header_read(loc.packfile)
            data = self._read(loc.packfile, start, loc.length)
            self._check_header(header.result(), loc.packfile)
        else:  # a local header read is not counted: the counters are the blobs' bytes, as before
            self._check_header(
                self.backend.read_range(self.key(loc.packfile), 0, c.HEADER_SIZE), loc.packfile
            )
            data = self._read(loc.packfile, start, loc.length)
        if len(data) != loc.length:
            raise CorruptionError(
                f"packfile {self.path(loc.packfile)}: truncated (blob at {loc.offset}+{loc.length}"
                f" ends past the end of the file)"
            )
        return data

    def pool(self) -> ThreadPoolExecutor:
        """Threads that keep `backend.parallelism` requests in flight (remote stores). A child of
        fork() makes its own: threads do not survive a fork, and an executor whose threads are gone
        queues work that never runs (see stop_threads)."""
        if self._pool_pid != os.getpid():
            with self._lock:
                self._pool, self._pool_pid = None, os.getpid()
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.backend.parallelism, thread_name_prefix="kloset-fetch")
            return self._pool

    # ------------------------------------------------------------ blobs

    def locate(self, rtype: int, mac: bytes) -> list[Location]:
        locs = self.index.locations(rtype, mac)
        if not locs:
            note = self.index.damage_note()
            what = f"{c.rt_name(rtype)} blob {mac.hex()}"
            raise CorruptionError(f"missing {what}: not in any live packfile{note}")
        newer = self.index.blob_version(rtype, mac)
        if newer is not None:
            raise UnsupportedVersion(
                f"unsupported {c.rt_name(rtype)} blob version {c.version_str(newer)}"
                f" (this reader supports 1.0.0): blob {mac.hex()}"
            )
        return locs

    def preloaded(self, rtype: int, mac: bytes) -> bool:
        """Whether preload() holds this blob in memory."""
        return (rtype, mac) in self._preloaded

    def read_encoded(self, rtype: int, mac: bytes) -> tuple[Location, bytes]:
        data = self._preloaded.get((rtype, mac))
        if data is not None:
            return self.locate(rtype, mac)[0], data
        last: OSError | None = None
        for loc in self.locate(rtype, mac):
            try:
                return loc, self.pread(loc)
            except FileNotFoundError as e:  # maintenance may have removed it: try another copy
                last = e
        raise CorruptionError(
            f"missing packfile {last.filename if last else '?'} for {c.rt_name(rtype)} blob {mac.hex()}"
        )

    def read(self, rtype: int, mac: bytes) -> c.Buffer:
        loc, data = self.read_encoded(rtype, mac)
        return self._decode(rtype, mac, loc, data)

    def _decode(self, rtype: int, mac: bytes, loc: Location, data: bytes) -> c.Buffer:
        if rtype == c.RT_RANDOM:
            return data  # padding is stored raw
        checked = rtype in c.CONTENT_ADDRESSED
        try:
            plain = self.codec.decode(data, "", mac_checked=checked)
        except CorruptionError as e:  # the message is built only on failure: this is the hot path
            raise CorruptionError(f"{self._what(rtype, mac, loc)}{e}") from None
        if checked and self.codec.mac(plain) != mac:
            raise CorruptionError(f"{self._what(rtype, mac, loc)}: MAC mismatch (damaged data)")
        return plain

    def _what(self, rtype: int, mac: bytes, loc: Location) -> str:
        return f"packfile {self.path(loc.packfile)}: {c.rt_name(rtype)} blob {mac.hex()}"

    def read_many(self, rtype: int, macs: Sequence[bytes]) -> list[bytes]:
        """Decoded blobs in the order of `macs`, fetched with coalesced reads (in parallel on a
        remote store)."""
        if len(macs) <= 1:
            return [self.read(rtype, m) for m in macs]
        wanted: dict[bytes, list[tuple[int, Location]]] = {}
        for i, mac in enumerate(macs):
            loc = self.locate(rtype, mac)[0]
            wanted.setdefault(loc.packfile, []).append((i, loc))
        if self._preloaded and all((rtype, m) in self._preloaded for m in macs):
            return [self.read(rtype, m) for m in macs]
        out: list[bytes | None] = [None] * len(macs)
        runs = [run for packfile, items in wanted.items() for run in plan_runs(packfile, items)]

        def fetch(run: tuple[Location, list[tuple[int, Location]]]) -> None:
            span, items = run
            try:
                buf = memoryview(self.pread(span))
            except FileNotFoundError:  # maintenance may have removed it: the other copies
                for i, _ in items:
                    out[i] = self.read(rtype, macs[i])
                return
            for i, loc in items:
                rel = loc.offset - span.offset
                out[i] = self._decode(rtype, macs[i], loc, bytes(buf[rel : rel + loc.length]))

        if self.backend.parallelism > 2 and len(runs) > 1:
            for future in [self.pool().submit(fetch, run) for run in runs]:
                future.result()
        else:
            for run in runs:
                fetch(run)
        return out  # type: ignore[return-value]


def _span_name(span: Location) -> str:
    return f"span-{span.packfile.hex()}-{span.offset}-{span.length}"


def _kept_span(cache: NamedCache | None, span: Location) -> bytes | None:
    """The span's bytes from the on-disk cache (None: not there, or not whole)."""
    data = cache.load_named(_span_name(span)) if cache is not None else None
    return data if data is not None and len(data) == span.length else None


def _keep_span(cache: NamedCache | None, span: Location, data: bytes) -> None:
    if cache is not None and len(data) == span.length:
        cache.save_named(_span_name(span), data)


def _reach_back(span: Location, lead: int) -> Location:
    start = max(0, span.offset - lead)
    return Location(span.packfile, start, span.length + span.offset - start)


def _merged(spans: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """Spans (offset, bytes) sorted and with overlapping or touching ones joined: a blob inside
    any of them is then inside the one that starts last at or before it."""
    out: list[tuple[int, bytes]] = []
    for start, data in sorted(spans, key=lambda item: item[0]):
        if out and start <= out[-1][0] + len(out[-1][1]):
            first, kept = out[-1]
            tail = data[first + len(kept) - start :]
            if tail:
                out[-1] = (first, kept + tail)
            continue
        out.append((start, data))
    return out


def plan_runs(
    packfile: bytes, items: list[tuple[int, Location]]
) -> list[tuple[Location, list[tuple[int, Location]]]]:
    """Blobs of one packfile grouped into spans of at most MAX_COALESCED bytes, a gap of at most
    MAX_GAP between neighbours: (span, the blobs in it)."""
    items = sorted(items, key=lambda t: t[1].offset)
    runs = []
    start = 0
    while start < len(items):
        first = items[start][1]
        end = start + 1
        run_end = first.offset + first.length
        while end < len(items):
            nxt = items[end][1]
            new_end = max(run_end, nxt.offset + nxt.length)
            if nxt.offset > run_end + MAX_GAP or new_end - first.offset > MAX_COALESCED:
                break
            run_end = new_end
            end += 1
        runs.append((Location(packfile, first.offset, run_end - first.offset), items[start:end]))
        start = end
    return runs
