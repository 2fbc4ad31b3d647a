# The persistent on-disk chunk cache: a second tier under the in-memory ChunkCache, so that a second
# run over the same snapshots (a second `kloset-blocks query`, a later `psql`) fetches almost
# nothing from the store.
#
# Strategy: one file per decoded chunk, DIR/<RepositoryID hex>/<mac[:1] hex>/<mac hex>, holding
#   MAGIC (8 bytes) | MAC length (1 byte) | MAC | payload,  payload = codec.encrypt(zstd(chunk))
# The store's own codec encrypts the entry (identity for a plaintext store), so an encrypted
# store's chunks never sit in the clear on disk. Entries are written by one background thread, so
# a miss does not wait on a disk write, unless the writer is MAX_PENDING entries behind (a burst of
# prefetches): then the fetching thread writes its own entry (back-pressure: memory stays bounded
# and no entry is skipped). Each entry goes to a temporary file renamed into place, so a reader
# never sees half an entry. A hit touches the file's mtime; when the total passes `max_bytes`, the
# oldest entries by mtime are deleted down to 90% of it (LRU-ish, shared with other processes
# using the same directory).
#
# Metadata blobs (VFS entries and nodes, objects: every content-addressed type) are cached the
# same way under DIR/<RepositoryID hex>/t<type>/..., through wrap_store(): once a run's chunks
# come from the disk, the snapshot metadata a new process must read again is most of what is left.
# Immutable objects of the store that are not blobs (its states, named by their id, and the
# packfile spans a remote store preloads and warms up, named by packfile, offset and length:
# packfiles never change) are kept under DIR/<RepositoryID hex>/n/<name> (load_named/save_named),
# their entry's MAC field the MAC of their bytes: so a warm start of a remote store reads nothing
# but CONFIG and the list of states from it.
#
# Invariants:
# - Never returns wrong bytes: every hit is decoded and its MAC recomputed with the store's MAC
#   function and compared with the key; an entry that fails any check (magic, MAC field, decrypt,
#   decompress, MAC) is counted, deleted and the chunk fetched from the store as on a miss.
# - Never fails a read because of the cache: any OSError on the cache path falls back to the store.
# - Entries of different stores never mix: the directory is per RepositoryID, and MACs are keyed
#   per store anyway.
from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import zstandard

from kloset_blocks.errors import CorruptionError
from kloset_blocks.store.codec import CONTENT_ADDRESSED, RT_CHUNK

MAGIC = b"KBDCACH1"
DISK_CACHE_SIZE = 4 << 30  # the default bound (cache-dir-size=)
ZSTD_LEVEL = 3
MAX_PENDING = 32  # entries waiting for the writer thread; beyond that, misses are not cached
EVICT_TO = 0.9
TOUCH_AFTER = 600.0  # a hit refreshes an entry's mtime only when older than this: one syscall saved
_local = threading.local()  # zstd (de)compressors are not thread-safe: one pair per thread


def _zstd() -> tuple[zstandard.ZstdCompressor, zstandard.ZstdDecompressor]:
    pair = getattr(_local, "pair", None)
    if pair is None:
        pair = _local.pair = (zstandard.ZstdCompressor(level=ZSTD_LEVEL), zstandard.ZstdDecompressor())
    return pair


@dataclass
class DiskStats:
    disk_hits: int = 0
    disk_misses: int = 0
    disk_corrupt: int = 0
    disk_written: int = 0
    disk_bytes_written: int = 0
    disk_evicted: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class DiskCache:
    def __init__(self, root: Path | str, codec: Any, repository_id: bytes, max_bytes: int) -> None:
        self.codec = codec
        self.max_bytes = max_bytes
        base = Path(root)
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.dir = base / (repository_id.hex() or "store")
        self.dir.mkdir(mode=0o700, exist_ok=True)
        self._dir = str(self.dir)
        self.stats = DiskStats()
        self._lock = threading.Lock()
        self._pending = 0
        self._writer: ThreadPoolExecutor | None = None
        self._writer_pid = os.getpid()
        self._total = sum(size for _, _, size in self._entries())

    # ---- the fetch path ------------------------------------------------------------------------

    def wrap(self, fetch: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
        """A fetch function that tries the disk first, then `fetch`, and caches what it fetched."""

        def cached_fetch(mac: bytes) -> bytes:
            chunk = self.load(mac)
            if chunk is not None:
                return chunk
            chunk = fetch(mac)
            self.save_later(mac, chunk)
            return chunk

        return cached_fetch

    def wrap_store(self, store: Any) -> None:
        """Route the store's content-addressed metadata reads (read_blob, read_blobs: VFS entries
        and nodes, objects) through the disk too. Replaces the two bound methods on this one Store
        instance; other blob types (snapshot headers: random ids, not MAC-checkable) pass through,
        and so do the blobs a remote store preloaded in memory (Packfiles.preloaded: a disk entry
        each would cost more than the one parallel round that fetched them all)."""
        read_blob, read_blobs = store.read_blob, store.read_blobs
        in_memory = store.packfiles.preloaded

        def cached_read_blob(rtype: int, mac: bytes) -> bytes:
            if rtype not in CONTENT_ADDRESSED or in_memory(rtype, mac):
                return read_blob(rtype, mac)
            data = self.load(mac, rtype)
            if data is None:
                data = read_blob(rtype, mac)
                self.save_later(mac, data, rtype)
            return data

        def cached_read_blobs(rtype: int, macs: list[bytes]) -> list[bytes]:
            if rtype not in CONTENT_ADDRESSED or all(in_memory(rtype, m) for m in macs):
                return read_blobs(rtype, macs)
            out = [self.load(m, rtype) for m in macs]
            missing = [i for i, d in enumerate(out) if d is None]
            if missing:  # still one coalesced read for all the misses
                for i, data in zip(missing, read_blobs(rtype, [macs[i] for i in missing]), strict=True):
                    out[i] = data
                    self.save_later(macs[i], data, rtype)
            return out  # type: ignore[return-value]

        store.read_blob, store.read_blobs = cached_read_blob, cached_read_blobs

    def path(self, mac: bytes, rtype: int = RT_CHUNK) -> str:
        # Strings, not Path: this runs on every read, and pathlib's joins cost ~20 us each.
        h = mac.hex()
        if rtype == RT_CHUNK:
            return f"{self._dir}/{h[:2]}/{h}"
        return f"{self._dir}/t{rtype}/{h[:2]}/{h}"

    def load_named(self, name: str) -> bytes | None:
        """An immutable object saved by save_named (None when absent or failing its checks)."""
        path = f"{self._dir}/n/{name}"
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            return None
        try:
            return self._decode(None, data)  # its MAC is its entry's own MAC field
        except CorruptionError:
            self._count("disk_corrupt")
            with contextlib.suppress(OSError):
                os.unlink(path)
            return None

    def save_named(self, name: str, data: bytes) -> None:
        """Keep an immutable object of the store (a state, a packfile span) under `name`."""
        with contextlib.suppress(OSError):
            self._write(Path(f"{self._dir}/n/{name}"), self.encode(self.codec.mac(data), data))

    def has(self, mac: bytes, rtype: int = RT_CHUNK) -> bool:
        """Whether an entry exists (unchecked: load() checks it)."""
        return os.path.exists(self.path(mac, rtype))

    def load(self, mac: bytes, rtype: int = RT_CHUNK) -> bytes | None:
        path = self.path(mac, rtype)
        try:
            with open(path, "rb") as f:
                data = f.read()
                mtime = os.fstat(f.fileno()).st_mtime
        except OSError:
            self._count("disk_misses")
            return None
        try:
            chunk = self._decode(mac, data)
        except CorruptionError:
            self._count("disk_corrupt")
            with contextlib.suppress(OSError):
                os.unlink(path)
            return None
        self._count("disk_hits")
        if time.time() - mtime > TOUCH_AFTER:
            with contextlib.suppress(OSError):
                os.utime(path)  # recently used: evicted last
        return chunk

    def _decode(self, mac: bytes | None, data: bytes) -> bytes:
        """An entry's bytes, checked: against the MAC `mac` it is filed under (a blob), or, for a
        named object (None), against the MAC field it carries."""
        head = len(MAGIC) + 1
        if len(data) < head or data[: len(MAGIC)] != MAGIC:
            raise CorruptionError("bad magic")
        n = data[len(MAGIC)]
        field = data[head : head + n]
        if mac is None:
            mac = field
        elif field != mac:
            raise CorruptionError("MAC field differs from the key")
        try:
            chunk = _zstd()[1].decompress(self.codec.decrypt(data[head + n :]))
        except zstandard.ZstdError as e:
            raise CorruptionError(f"cannot decompress: {e}") from None
        if self.codec.mac(chunk) != mac:
            raise CorruptionError("MAC mismatch")
        return chunk

    def encode(self, mac: bytes, chunk: bytes) -> bytes:
        payload = self.codec.encrypt(_zstd()[0].compress(chunk))
        return MAGIC + bytes([len(mac)]) + mac + payload

    # ---- writing -------------------------------------------------------------------------------

    def save_later(self, mac: bytes, chunk: bytes, rtype: int = RT_CHUNK) -> None:
        with self._lock:
            inline = self._pending >= MAX_PENDING  # the writer is behind: write on this thread
            if not inline:
                self._pending += 1
        if inline:
            with contextlib.suppress(OSError):
                self.save(mac, chunk, rtype)
            return
        with self._lock:
            if self._writer_pid != os.getpid():  # a child of fork(): the writer thread is gone
                self._writer, self._pending, self._writer_pid = None, 0, os.getpid()
            if self._writer is None:  # created on first use: nbdkit may fork after startup
                self._writer = ThreadPoolExecutor(1, thread_name_prefix="kloset-diskcache")
            writer = self._writer
        writer.submit(self._save_quietly, mac, chunk, rtype)

    def _save_quietly(self, mac: bytes, chunk: bytes, rtype: int) -> None:
        try:
            self.save(mac, chunk, rtype)
        except OSError:
            pass  # a full or read-only disk only costs cache hits later
        finally:
            with self._lock:
                self._pending -= 1

    def save(self, mac: bytes, chunk: bytes, rtype: int = RT_CHUNK) -> None:
        path = Path(self.path(mac, rtype))
        if path.exists():
            return
        self._write(path, self.encode(mac, chunk))

    def _write(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        with self._lock:
            self.stats.disk_written += 1
            self.stats.disk_bytes_written += len(data)
            self._total += len(data)
            over = self._total > self.max_bytes
        if over:
            self.evict()

    def evict(self) -> None:
        """Delete the least recently used entries (by mtime) down to 90% of max_bytes."""
        entries = sorted(self._entries())
        total = sum(size for _, _, size in entries)
        target = int(self.max_bytes * EVICT_TO)
        evicted = 0
        for _, path, size in entries:
            if total <= target:
                break
            with contextlib.suppress(OSError):
                path.unlink()
                total -= size
                evicted += 1
        with self._lock:
            self._total = total
            self.stats.disk_evicted += evicted

    def _entries(self) -> list[tuple[float, Path, int]]:
        out = []
        subs = [p for p in self.dir.iterdir() if p.is_dir()] if self.dir.is_dir() else []
        subs = [
            q for p in subs for q in ([x for x in p.iterdir() if x.is_dir()] if p.name[0] == "t" else [p])
        ]
        for sub in subs:
            with os.scandir(sub) as it:
                for e in it:
                    if e.name.startswith("."):
                        continue
                    with contextlib.suppress(OSError):
                        st = e.stat()
                        out.append((st.st_mtime, Path(e.path), st.st_size))
        return out

    def flush(self) -> None:
        """Wait for the queued writes (at exit, so that the next run finds them)."""
        with self._lock:
            writer, self._writer = self._writer, None
            if self._writer_pid != os.getpid():
                return  # the writer was the parent's: its thread is not ours to wait for
        if writer is not None:
            writer.shutdown(wait=True)

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self.stats, name, getattr(self.stats, name) + 1)


def default_cache_dir() -> str:
    """$XDG_CACHE_HOME/kloset-blocks (~/.cache/kloset-blocks): where remote stores are cached."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "kloset-blocks")
