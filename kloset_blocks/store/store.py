# A read-only Kloset store: open_store() resolves the location to a Backend (store/backend.py:
# a local directory, an S3 bucket, an SFTP directory), unlocks CONFIG (one key derivation per
# Store), rebuilds the location index from every state, and then serves blobs, snapshots and their
# files.
#
# Invariants:
# - Never writes: backends are read-only; nothing is created in the store.
# - Thread-safe (nbdkit PARALLEL): the index and codec are immutable after open; packfile reads
#   go through the thread-safe backend; the small caches (snapshot headers, B-tree nodes) are
#   guarded by a lock.
# - Every failure is a KlosetError subclass with a one-line message naming the file or blob.
# - Damage costs what it touches: a state that cannot be read is left out of the index (state.py),
#   a snapshot whose header cannot be read is left out of snapshots(); problems() lists both.
from __future__ import annotations

import contextlib
import os
import resource
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kloset_blocks.errors import AmbiguousSnapshot, CorruptionError, KlosetError, NotFound
from kloset_blocks.store import codec as c
from kloset_blocks.store.backend import Backend, open_backend
from kloset_blocks.store.btree import BNode
from kloset_blocks.store.config import StoreConfig, load_config
from kloset_blocks.store.diskcache import DISK_CACHE_SIZE, DiskCache, default_cache_dir
from kloset_blocks.store.location import parse_location
from kloset_blocks.store.packfile import Packfiles
from kloset_blocks.store.passphrase import Secret
from kloset_blocks.store.snapshot import Snapshot, SnapshotInfo
from kloset_blocks.store.state import Location, LocationIndex, list_bucketed
from kloset_blocks.store.view import make_view, parse_view, save_view

NODE_CACHE = 4096


def _raise_fd_limit() -> None:
    # Packfile fds stay open (one per packfile touched); allow as many as the hard limit does.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def match_prefix(ids: Sequence[bytes], prefix: str, note: str = "") -> bytes:
    """The one id whose hex starts with `prefix` (NotFound / AmbiguousSnapshot otherwise; `note`
    is added to NotFound's message)."""
    p = prefix.lower()
    hits = [i for i in ids if i.hex().startswith(p)]
    if not hits:
        raise NotFound(f"no snapshot has prefix '{prefix}'{note}")
    if len(hits) > 1:
        width = max(8, len(p) + 4)
        shown = ", ".join(h.hex()[:width] for h in sorted(hits)[:5])
        more = f" and {len(hits) - 5} more" if len(hits) > 5 else ""
        raise AmbiguousSnapshot(f"snapshot prefix '{prefix}' is ambiguous: matches {shown}{more}")
    return hits[0]


class Store:
    def __init__(
        self,
        location: str,
        backend: Backend,
        cfg: StoreConfig,
        *,
        disk: DiskCache | None = None,
        listed: list[tuple[bytes, str]] | None = None,
        cache_chunks: bool = True,
    ) -> None:
        self.location = location
        self.backend = backend
        self.remote = backend.location.remote
        self.version = cfg.version
        self.config = cfg.config
        self.codec = cfg.codec
        self.encrypted = cfg.codec.encrypted
        # The on-disk cache (open_store's cache_dir): states, preloaded spans, metadata blobs and
        # chunks read through it.
        self.disk = disk
        self._config_raw = cfg.raw
        if listed is None:
            listed = list_bucketed(backend, "states")
        self._listed = listed
        self.index = LocationIndex.build(backend, cfg.codec, listed=listed, cache=disk)
        self.packfiles = Packfiles(backend, cfg.codec, self.index)
        if self.remote:  # snapshot headers and trees in one parallel round, not a request per node
            self.packfiles.preload(cache=disk)
        if disk is not None:
            disk.wrap_store(self)
            if cache_chunks:
                self.read_chunk = disk.wrap(self.read_chunk)  # type: ignore[method-assign]
        self._lock = threading.Lock()
        self._infos: dict[bytes, SnapshotInfo] = {}
        self._unreadable: dict[bytes, str] = {}
        self._nodes: OrderedDict[tuple[int, bytes], BNode] = OrderedDict()
        self._executor: ThreadPoolExecutor | None = None

    def __repr__(self) -> str:
        return f"<Store {self.location}>"

    def view(self) -> str:
        """CONFIG and the list of states as this Store read them, for open_store(view=...) in a
        child process or a later command (store/view.py)."""
        return make_view(self.location, self._config_raw, self._listed)

    def changes(self, prefix: str = "") -> tuple[str | None, bool]:
        """The store's view now when it differs from this Store's (None when not; CONFIG and the
        list of states read again now, the listing in flight with CONFIG), and whether what
        `prefix` names here is still what the store would serve: CONFIG unchanged, no state gone,
        and the new states (read through the on-disk cache) only adding blobs and snapshots, none
        named by `prefix` ("" or latest: none at all). StoreError when it cannot be read."""
        with ThreadPoolExecutor(1) as side:
            listing = side.submit(list_bucketed, self.backend, "states")
            try:
                raw = self.backend.read("CONFIG")
            except FileNotFoundError:
                return "", False
            listed = listing.result()
        before, now = set(self._listed), set(listed)
        if raw == self._config_raw and before == now:
            return None, True
        view = make_view(self.location, raw, listed)
        if raw != self._config_raw or not before <= now:
            return view, False
        added = LocationIndex.build(self.backend, self.codec, listed=sorted(now - before), cache=self.disk)
        wanted = "" if prefix in ("", "latest") else prefix.lower()
        named = any(ident.hex().startswith(wanted) for ident in added.recorded_snapshots())
        return view, not (added.damaged or added.erasing or named)

    @property
    def executor(self) -> ThreadPoolExecutor:
        """Worker threads for read-ahead (SnapshotFile.iter_read), created on first use."""
        with self._lock:
            if self._executor is None:
                workers = self.backend.parallelism if self.remote else min(8, os.cpu_count() or 2)
                self._executor = ThreadPoolExecutor(
                    max_workers=workers, thread_name_prefix="kloset-readahead"
                )
            return self._executor

    def close(self) -> None:
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        self.packfiles.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ blobs

    def locate(self, rtype: int, mac: bytes) -> Location:
        return self.packfiles.locate(rtype, mac)[0]

    def read_encoded(self, rtype: int, mac: bytes) -> bytes:
        """The blob as stored (encoded), for benchmarks and diagnostics."""
        return self.packfiles.read_encoded(rtype, mac)[1]

    def read_blob(self, rtype: int, mac: bytes) -> c.Buffer:
        """One blob, decoded; MAC-checked for content-addressed types."""
        return self.packfiles.read(rtype, mac)

    def read_blobs(self, rtype: int, macs: Sequence[bytes]) -> list[bytes]:
        return self.packfiles.read_many(rtype, macs)

    def read_chunk(self, mac: bytes) -> c.Buffer:
        return self.packfiles.read(c.RT_CHUNK, mac)

    def stats(self) -> dict[str, int]:
        """Encoded bytes read from packfiles (every blob type) and the preads that read them."""
        return {"store_bytes_read": self.packfiles.bytes_read, "store_preads": self.packfiles.preads}

    def read_record(self, rtype: int, mac: bytes) -> Any:
        return self._unpack(rtype, mac, self.read_blob(rtype, mac))

    def read_records(self, rtype: int, macs: Sequence[bytes]) -> list[Any]:
        return [self._unpack(rtype, m, b) for m, b in zip(macs, self.read_blobs(rtype, macs), strict=True)]

    def _unpack(self, rtype: int, mac: bytes, data: bytes) -> Any:
        try:
            rec = c.unpack(data)
        except Exception:
            loc = self.locate(rtype, mac)
            raise CorruptionError(
                f"packfile {self.packfiles.path(loc.packfile)}: {c.rt_name(rtype)} blob {mac.hex()}:"
                " not valid msgpack"
            ) from None
        if not isinstance(rec, dict):
            raise CorruptionError(f"{c.rt_name(rtype)} blob {mac.hex()}: not a map")
        return rec

    def cached_node(self, rtype: int, mac: bytes, load: Callable[[], BNode]) -> BNode:
        key = (rtype, mac)
        with self._lock:
            node = self._nodes.get(key)
            if node is not None:
                self._nodes.move_to_end(key)
                return node
        node = load()
        with self._lock:
            self._nodes[key] = node
            if len(self._nodes) > NODE_CACHE:
                self._nodes.popitem(last=False)
        return node

    # ------------------------------------------------------------ snapshots

    def _info(self, ident: bytes) -> SnapshotInfo:
        with self._lock:
            info = self._infos.get(ident)
        if info is None:
            info = SnapshotInfo.from_header(ident, self.read_record(c.RT_SNAPSHOT, ident))
            with self._lock:
                self._infos[ident] = info
        return info

    def snapshots(self) -> list[SnapshotInfo]:
        """Live snapshots whose header can be read, oldest first (by header timestamp, then id);
        the others are in problems()."""
        infos = []
        for ident in self.index.snapshot_ids():
            try:
                infos.append(self._info(ident))
            except KlosetError as e:
                with self._lock:
                    self._unreadable[ident] = str(e)
        return sorted(infos, key=lambda s: (s.timestamp, s.id))

    def problems(self) -> list[str]:
        """One line per damage found so far that hides snapshots: states left out of the index,
        snapshot headers that cannot be read (after snapshots())."""
        lines = [f"damaged state left out: {why}" for _, why in self.index.damaged]
        with self._lock:
            unreadable = sorted(self._unreadable.items())
        return lines + [f"snapshot {i.hex()} cannot be read: {why}" for i, why in unreadable]

    def find_snapshot(self, prefix: str = "") -> SnapshotInfo:
        """By hex id prefix; "" or "latest" is the newest snapshot."""
        if prefix in ("", "latest"):
            infos = self.snapshots()
            if not infos:
                raise NotFound(f"store {self.location} has no snapshot{self.index.damage_note()}")
            return infos[-1]
        return self._info(match_prefix(self.index.snapshot_ids(), prefix, self.index.damage_note()))

    def open_snapshot(self, prefix: str = "") -> Snapshot:
        return Snapshot(self, self.find_snapshot(prefix))


def open_store(
    location: str,
    passphrase: Secret | None = None,
    *,
    key: bytes | None = None,
    cache_dir: str | None = None,
    cache_size: int = DISK_CACHE_SIZE,
    cache_chunks: bool = True,
    view: str | None = None,
) -> Store:
    """Open a Kloset store read-only. An encrypted one needs its passphrase (bytes, str, or a
    callable called only then: store.passphrase.passphrase_source) or its derived `key`. With
    `cache_dir`, what is read from the store is kept on disk there (store/diskcache.py, bounded by
    `cache_size`) and read from there next time (file contents too unless not `cache_chunks`: a
    restore reads each chunk once): see cache_dir_for(). `view` is Store.view() of the same store
    opened by a parent process moments ago (CONFIG and the list of states: the nbdkit a command
    starts need not ask a remote store for them again); one that does not parse, or names another
    location, is ignored."""
    loc = parse_location(location)
    backend = open_backend(loc)
    seen = parse_view(view, loc.display) if view else None
    try:
        if seen is not None:  # what a parent read a moment ago: no round trip at all
            cfg = load_config(backend, loc.display, passphrase, key, raw=seen[0])
            listed: list[tuple[bytes, str]] | None = seen[1]
        else:
            with ThreadPoolExecutor(1) as side:
                # A remote store lists its states while CONFIG is read: one round trip, not two.
                listing = side.submit(list_bucketed, backend, "states") if loc.remote else None
                cfg = load_config(backend, loc.display, passphrase, key)
                listed = listing.result() if listing is not None else None
        _raise_fd_limit()
        disk = None
        if cache_dir:
            repository_id = bytes(cfg.config.get("RepositoryID") or b"")
            disk = DiskCache(cache_dir, cfg.codec, repository_id, cache_size)
        store = Store(loc.display, backend, cfg, disk=disk, listed=listed, cache_chunks=cache_chunks)
        if seen is None and loc.remote and cache_dir:  # what the next command may start from
            save_view(cache_dir, loc.display, store.view())
        return store
    except BaseException:
        backend.close()
        raise


def cache_dir_for(location: str, cache_dir: str | None = None) -> str | None:
    """The on-disk cache a command uses for `location`: `cache_dir` when given ("off": none), else
    the default one (default_cache_dir) for a remote store, where a round trip costs far more than
    a disk read, and none for a local one."""
    if cache_dir == "off":
        return None
    if cache_dir:
        return cache_dir
    return default_cache_dir() if parse_location(location).remote else None
