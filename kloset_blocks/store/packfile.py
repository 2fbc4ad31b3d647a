# Reading blobs out of packfiles: one os.pread of exactly the blob's bytes at file offset
# 16 + offset (offsets are relative to the payload, §5.2), then decode and, for content-addressed
# types, check MAC(plaintext) == the blob id (§3.2). Nothing ever reads a whole packfile.
#
# Invariants:
# - Thread-safe: packfile fds are opened O_RDONLY once and kept; reads use os.pread only (no
#   shared file position), so any number of threads may read at once. The fd table is only
#   mutated under `_lock`.
# - Errors name the packfile, the blob type and MAC: CorruptionError for damaged bytes,
#   UnsupportedVersion for blobs recorded with a newer version.
# - `bytes_read` / `preads` count every pread (encoded bytes, any blob type) for the nbdkit plugin's
#   stats; updated under `_count_lock` since `+=` on an attribute is not atomic across threads.
# - read_many coalesces blobs lying close together in one packfile into one pread (<= 4 MiB,
#   like Go's read planner), which is what makes scanning a VFS tree cheap.
from __future__ import annotations

import os
import struct
import threading
from collections.abc import Sequence

from kloset_blocks.errors import CorruptionError, StoreError, UnsupportedVersion
from kloset_blocks.store import codec as c
from kloset_blocks.store.state import Location, LocationIndex

MAX_COALESCED = 4 << 20
PACKFILE_VERSION_MAX = c.pack_version(1, 0, 0)
MAX_GAP = 64 << 10


class Packfiles:
    def __init__(self, root: str, codec: c.Codec, index: LocationIndex) -> None:
        self.root = root
        self.codec = codec
        self.index = index
        self._fds: dict[bytes, int] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._count_lock = threading.Lock()
        self.bytes_read = 0
        self.preads = 0

    # ------------------------------------------------------------ files

    def path(self, packfile: bytes) -> str:
        name = packfile.hex()
        return os.path.join(self.root, "packfiles", name[:2], name)

    def _fd(self, packfile: bytes) -> int:
        fd = self._fds.get(packfile)
        if fd is not None:
            return fd
        with self._lock:
            if self._closed:
                raise StoreError("store is closed")
            fd = self._fds.get(packfile)
            if fd is None:
                fd = os.open(self.path(packfile), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    self._check_header(fd, packfile)
                except BaseException:
                    os.close(fd)
                    raise
                self._fds[packfile] = fd
            return fd

    def _check_header(self, fd: int, packfile: bytes) -> None:
        """Magic, type and version of the wrapper, once per packfile (the trailer MAC would need
        the whole file: blobs are checked by their own MACs instead)."""
        head = os.pread(fd, c.HEADER_SIZE, 0)
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

    def close(self) -> None:
        with self._lock:
            self._closed = True
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def pread(self, loc: Location) -> bytes:
        """The encoded bytes of one blob (FileNotFoundError when its packfile is gone)."""
        data = os.pread(self._fd(loc.packfile), loc.length, c.HEADER_SIZE + loc.offset)
        with self._count_lock:
            self.bytes_read += len(data)
            self.preads += 1
        if len(data) != loc.length:
            raise CorruptionError(
                f"packfile {self.path(loc.packfile)}: truncated (blob at {loc.offset}+{loc.length}"
                f" ends past the end of the file)"
            )
        return data

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

    def read_encoded(self, rtype: int, mac: bytes) -> tuple[Location, bytes]:
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
        """Decoded blobs in the order of `macs`, fetched with coalesced preads."""
        if len(macs) <= 1:
            return [self.read(rtype, m) for m in macs]
        wanted: dict[bytes, list[tuple[int, Location]]] = {}
        for i, mac in enumerate(macs):
            loc = self.locate(rtype, mac)[0]
            wanted.setdefault(loc.packfile, []).append((i, loc))
        out: list[bytes | None] = [None] * len(macs)
        for packfile, items in wanted.items():
            items.sort(key=lambda t: t[1].offset)
            try:
                self._read_runs(rtype, macs, packfile, items, out)
            except FileNotFoundError:
                for i, _ in items:
                    out[i] = self.read(rtype, macs[i])
        return out  # type: ignore[return-value]

    def _read_runs(
        self,
        rtype: int,
        macs: Sequence[bytes],
        packfile: bytes,
        items: list[tuple[int, Location]],
        out: list[bytes | None],
    ) -> None:
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
            span = Location(packfile, first.offset, run_end - first.offset)
            buf = memoryview(self.pread(span))
            for i, loc in items[start:end]:
                rel = loc.offset - first.offset
                out[i] = self._decode(rtype, macs[i], loc, bytes(buf[rel : rel + loc.length]))
            start = end
