# Low-level layout for the test-fixture writer: packfiles (§5.1), state streams (§6.1) and
# B+trees built bottom-up in key order (§10.1).
#
# Strategy and invariants:
# - A packfile is streamed to a temp file `packfiles/tmp.*`: wrapper header, encoded blobs back
#   to back, then the encoded index, the encoded footer, its u32 length and the wrapper trailer.
#   The trailer MAC (over header || payload) and the name MAC (over the payload, as Kloset's
#   on-disk packer names it, §5.4) are computed incrementally, so memory stays O(one blob +
#   56 bytes per index record). Only a finished packfile is renamed to packfiles/<xx>/<name>;
#   nothing references it until a state naming it is renamed into place.
# - Each packfile gets two RT_RANDOM padding blobs like Kloset's packer (one at offset 0, one
#   just before the index), random ids, raw random bytes, listed in the index and the state.
# - Offsets in the index and in state deltas are relative to the payload (file offset 16).
# - B+tree: leaves hold at most order-1 keys, internal nodes at most order children (the shape
#   Kloset's own trees show); groups are balanced, so no internal node has a single child.
#   Leaves are built right to left because a leaf's `next` is the MAC of its right neighbour.
from __future__ import annotations

import os
import random
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kloset_blocks.store import codec as C
from kloset_blocks.store.codec import Codec
from kloset_blocks.writer.chunker import mac_hasher

BLOB_VERSION = C.pack_version(1, 0, 0)
PACKFILE_VERSION = C.pack_version(1, 0, 0)
STATE_VERSION = C.pack_version(1, 1, 0)

_INDEX_RECORD = struct.Struct("<II32sQII")  # Type, Version, MAC, Offset, Length, Flags: 56 bytes
_FOOTER = struct.Struct("<qIQ32sI")  # Timestamp, Count, IndexOffset, IndexMAC, Flags: 56 bytes
_HEADER = struct.Struct("<8sII")
_LOCATION = struct.Struct("<BI32s32sQII")  # 85 bytes
_PACKFILE_ENTRY = struct.Struct("<32s32sQ")  # 72 bytes

ET_METADATA = 1
ET_LOCATIONS = 2
ET_PACKFILE = 4


@dataclass(frozen=True, slots=True)
class Location:
    rtype: int
    mac: bytes
    packfile: bytes
    offset: int
    length: int
    version: int = BLOB_VERSION


def bucket_path(root: Path, kind: str, ident: bytes) -> Path:
    name = ident.hex()
    return root / kind / name[:2] / name


def write_atomic(path: Path, data: bytes, tmp_dir: Path) -> None:
    """Write to tmp.* beside the final place and rename, as plakar's fs backend does."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = tmp_dir / f"tmp.{os.getpid()}.{random.getrandbits(64):016x}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _OpenPackfile:
    def __init__(self, root: Path, codec: Codec) -> None:
        self.tmp = root / "packfiles" / f"tmp.{os.getpid()}.{random.getrandbits(64):016x}"
        self.file = open(self.tmp, "wb")  # noqa: SIM115 - closed in finish()/abort()
        self.trailer = mac_hasher(codec)
        self.name = mac_hasher(codec)
        self.size = 0  # payload bytes written so far
        self.index: list[tuple[int, int, bytes, int, int]] = []
        header = _HEADER.pack(C.MAGIC, C.RT_PACKFILE, PACKFILE_VERSION)
        self.file.write(header)
        self.trailer.update(header)

    def write(self, data: bytes) -> int:
        offset = self.size
        self.file.write(data)
        self.trailer.update(data)
        self.name.update(data)
        self.size += len(data)
        return offset

    def add(self, rtype: int, mac: bytes, encoded: bytes) -> int:
        offset = self.write(encoded)
        self.index.append((rtype, BLOB_VERSION, mac, offset, len(encoded)))
        return offset


class PackWriter:
    """Appends encoded blobs to a sequence of packfiles, flushing at `max_size` data bytes."""

    def __init__(
        self,
        root: Path,
        codec: Codec,
        rng: random.Random,
        max_size: int,
        padding_max: int = 0,
    ) -> None:
        self.root = root
        self.codec = codec
        self.rng = rng
        self.max_size = max_size
        self.padding_max = padding_max  # 0: no RT_RANDOM padding blobs
        self.current: _OpenPackfile | None = None
        self.pending: list[tuple[int, bytes, int, int]] = []  # locations in the open packfile
        self.locations: list[Location] = []
        self.packfiles: list[tuple[bytes, int]] = []  # (name, timestamp ns)

    def _pad(self, pack: _OpenPackfile) -> None:
        if self.padding_max > 0:
            data = self.rng.randbytes(self.rng.randint(1, self.padding_max))
            mac = self.rng.randbytes(32)
            self.pending.append((C.RT_RANDOM, mac, pack.add(C.RT_RANDOM, mac, data), len(data)))

    def put(self, rtype: int, mac: bytes, encoded: bytes) -> None:
        if self.current is None:
            self.current = _OpenPackfile(self.root, self.codec)
            self._pad(self.current)
        offset = self.current.add(rtype, mac, encoded)
        self.pending.append((rtype, mac, offset, len(encoded)))
        if self.current.size > self.max_size:
            self.flush()

    def flush(self) -> None:
        pack = self.current
        if pack is None:
            return
        self._pad(pack)
        raw_index = b"".join(_INDEX_RECORD.pack(t, v, m, o, n, 0) for t, v, m, o, n in pack.index)
        index_offset = pack.write(self.codec.encode(raw_index))
        now = time.time_ns()
        footer = self.codec.encode(
            _FOOTER.pack(now, len(pack.index), index_offset, self.codec.mac(raw_index), 0)
        )
        pack.write(footer)
        pack.write(struct.pack("<I", len(footer)))
        name = pack.name.digest()
        pack.file.write(pack.trailer.digest())
        pack.file.flush()
        os.fsync(pack.file.fileno())
        pack.file.close()
        final = bucket_path(self.root, "packfiles", name)
        final.parent.mkdir(mode=0o700, exist_ok=True)
        os.replace(pack.tmp, final)
        self.locations.extend(Location(t, m, name, o, n) for t, m, o, n in self.pending)
        self.packfiles.append((name, now))
        self.pending = []
        self.current = None

    def abort(self) -> None:
        if self.current is not None:
            self.current.file.close()
            self.current.tmp.unlink(missing_ok=True)
            self.current = None


def state_stream(
    state_id: bytes, locations: list[Location], packfiles: list[tuple[bytes, int]], serial: bytes
) -> bytes:
    """The decoded state 1.1.0 stream: zero parent, LOCATIONS, PACKFILE, then METADATA."""
    out = [C.ZERO_MAC]
    for loc in locations:
        body = _LOCATION.pack(loc.rtype, loc.version, loc.mac, loc.packfile, loc.offset, loc.length, 0)
        out.append(struct.pack("<BI", ET_LOCATIONS, len(body)) + body)
    for name, ts in packfiles:
        body = _PACKFILE_ENTRY.pack(name, state_id, ts)
        out.append(struct.pack("<BI", ET_PACKFILE, len(body)) + body)
    out.append(struct.pack("<BIQ", ET_METADATA, STATE_VERSION, time.time_ns()) + serial)
    return b"".join(out)


def iter_state_locations(stream: bytes, version: int) -> list[tuple[int, bytes]]:
    """(type, mac) of the LOCATIONS deltas in a decoded state stream."""
    pos = 32 if version >= STATE_VERSION else 0
    found: list[tuple[int, bytes]] = []
    while pos < len(stream):
        etype = stream[pos]
        if etype == ET_METADATA:
            break
        (length,) = struct.unpack_from("<I", stream, pos + 1)
        body = stream[pos + 5 : pos + 5 + length]
        if etype == ET_LOCATIONS and length == _LOCATION.size:
            found.append((body[0], bytes(body[5:37])))
        pos += 5 + length
    return found


# ---------------------------------------------------------------- B+tree

Put = Callable[[int, bytes], bytes]  # (blob type, msgpack bytes) -> MAC (stores it, deduplicated)


def _groups(n: int, most: int) -> list[tuple[int, int]]:
    """[start, end) ranges splitting n items into ceil(n/most) balanced groups."""
    count = max(1, -(-n // most))
    base, extra = divmod(n, count)
    out, start = [], 0
    for i in range(count):
        end = start + base + (1 if i < extra else 0)
        out.append((start, end))
        start = end
    return out


def build_btree(
    pairs: list[tuple[str, bytes]], order: int, node_type: int, root_type: int, put: Put
) -> bytes:
    """Persist a B+tree over `pairs` (already sorted by the tree's comparator) and return the
    MAC of its root record {Version, Order, Count, Root}."""
    if order < 3:
        raise ValueError(f"B+tree order must be >= 3 (got {order})")
    if not pairs:
        level = [
            (None, put(node_type, C.pack({"version": 0, "keys": None, "pointers": None, "values": None})))
        ]
    else:
        ranges = _groups(len(pairs), order - 1)
        leaves: list[tuple[str, bytes]] = []
        next_mac: bytes | None = None
        for start, end in reversed(ranges):
            node: dict = {
                "version": 0,
                "keys": [k for k, _ in pairs[start:end]],
                "pointers": None,
                "values": [v for _, v in pairs[start:end]],
            }
            if next_mac is not None:
                node["next"] = next_mac
            next_mac = put(node_type, C.pack(node))
            leaves.append((pairs[start][0], next_mac))
        level = list(reversed(leaves))
    while len(level) > 1:
        upper = []
        for start, end in _groups(len(level), order):
            group = level[start:end]
            node = {
                "version": 0,
                "keys": [first for first, _ in group[1:]],
                "pointers": [mac for _, mac in group],
                "values": None,
            }
            upper.append((group[0][0], put(node_type, C.pack(node))))
        level = upper
    root = {"Version": 0, "Order": order, "Count": 0, "Root": level[0][1]}
    return put(root_type, C.pack(root))
