# The location index rebuilt from `states/` alone (§6), read through the store's Backend
# (fetched in parallel from a remote one): every state file is checked (wrapper type, version
# <= 1.1.0, trailer MAC), decoded, ordered topologically by parent and applied in that order, so
# DELETE entries undo exactly what came before them. ALL states are merged: each
# backup writes its own state listing only the blobs it added (§17.9).
#
# Invariants:
# - The index is keyed by (type, mac) -- a snapshot id is both an RT_SNAPSHOT and an
#   RT_SIGNATURE blob -- stored as one 33-byte key, type byte first.
# - A location is one int (packfile number << 96 | offset << 32 | length) to keep memory near
#   100-200 bytes per blob; a blob stored in several packfiles keeps the others in `_more`.
# - Immutable after build(): lookups from many threads need no lock.
# - Unknown entry types are skipped by length; known types must have their fixed length.
# - A state that cannot be read (damaged, foreign, truncated, of a newer version) is left out and
#   recorded in `damaged`: only the blobs it alone locates go missing, so only the snapshots that
#   need them fail (their errors say the store has damaged states), and the others are served.
#   A DELETE or colouring lost with it may bring back a deleted snapshot, still MAC-checked.
from __future__ import annotations

import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from kloset_blocks.errors import CorruptionError, KlosetError, UnsupportedVersion
from kloset_blocks.store import codec as c
from kloset_blocks.store.backend import Backend, as_backend

STATE_VERSION_MAX = c.pack_version(1, 1, 0)
STATE_V1_1 = c.pack_version(1, 1, 0)
BLOB_VERSION_MAX = c.pack_version(1, 0, 0)

ET_METADATA = 1
ET_LOCATIONS = 2
ET_COLOURED = 3
ET_PACKFILE = 4
ET_CONFIGURATION = 5
ET_DELETE = 6

_LOCATION = struct.Struct("<BI32s32sQII")  # 85 bytes
_COLOURED = struct.Struct("<B32sQ")  # 41
_PACKFILE = struct.Struct("<32s32sQ")  # 72
_DELETE = struct.Struct("<BB32s32s")  # 66
_METADATA = struct.Struct("<IQ16s")  # 28, after the type byte
_TL = struct.Struct("<BI")
_FIXED = {ET_LOCATIONS: _LOCATION.size, ET_COLOURED: _COLOURED.size, ET_PACKFILE: _PACKFILE.size}
_FIXED_V11 = {**_FIXED, ET_DELETE: _DELETE.size}


def is_hex_id(name: str) -> bool:
    if len(name) != 64:
        return False
    try:
        bytes.fromhex(name)
    except ValueError:
        return False
    return True


def list_bucketed(backend: Backend, kind: str) -> list[tuple[bytes, str]]:
    """(id, key) of every `<kind>/<bucket>/<64 hex>` object, skipping anything else as plakar does."""
    out = []
    for key in backend.list(kind + "/"):
        parts = key.split("/")
        if len(parts) == 3 and is_hex_id(parts[2]):
            out.append((bytes.fromhex(parts[2]), key))
    return out


class NamedCache(Protocol):
    """Where immutable objects of the store are kept between runs (store/diskcache.py)."""

    def load_named(self, name: str) -> bytes | None: ...

    def save_named(self, name: str, data: bytes) -> None: ...


@dataclass(frozen=True, slots=True)
class Location:
    packfile: bytes
    offset: int
    length: int


@dataclass(slots=True)
class _State:
    ident: bytes
    path: str
    parent: bytes
    timestamp: int
    stream: bytes
    start: int  # 32 after the v1.1.0 parent header, else 0

    def entries(self) -> Iterator[tuple[int, memoryview]]:
        """(type, body) of every known entry; the stream was validated by _parse_state."""
        mv = memoryview(self.stream)
        pos = self.start
        while self.stream[pos] != ET_METADATA:
            etype, length = _TL.unpack_from(self.stream, pos)
            pos += _TL.size
            yield etype, mv[pos : pos + length]
            pos += length


class LocationIndex:
    def __init__(self) -> None:
        self._packfile_ids: list[bytes] = []
        self._packfile_no: dict[bytes, int] = {}
        self._loc: dict[bytes, int] = {}
        self._more: dict[bytes, list[int]] = {}
        self._newer: dict[bytes, int] = {}
        self._packfiles: set[int] = set()
        self._coloured: set[bytes] = set()
        self._snapshot_macs: set[bytes] = set()
        self._live: frozenset[int] = frozenset()
        self.states: list[bytes] = []
        self.damaged: list[tuple[str, str]] = []  # (path, why) of states left out
        self.erasing = False  # a COLOURED or DELETE entry was applied (maintenance, a deletion)

    def damage_note(self) -> str:
        """What to add to an error about a missing blob or snapshot when states were left out."""
        if not self.damaged:
            return ""
        more = f"; and {len(self.damaged) - 1} more damaged states" if len(self.damaged) > 1 else ""
        return f" (the store is damaged: {self.damaged[0][1]}{more})"

    # ------------------------------------------------------------ building

    @classmethod
    def build(
        cls,
        backend: Backend | str,
        codec: c.Codec,
        *,
        listed: list[tuple[bytes, str]] | None = None,
        cache: NamedCache | None = None,
    ) -> LocationIndex:
        """From every state of the store (`listed`: list_bucketed's answer, when the caller has
        it); remote states are fetched `backend.parallelism` at a time. With `cache`, a state
        kept there is read from it (states never change; its bytes are checked as the store's)."""
        backend = as_backend(backend)
        if listed is None:
            listed = list_bucketed(backend, "states")

        def read(item: tuple[bytes, str]) -> _State | str:
            # A state that cannot be read is left out (and said): only the snapshots whose blobs
            # it located fail, with the reason.
            try:
                return _read_state(item[0], backend, item[1], codec, cache)
            except KlosetError as e:
                return str(e)

        if backend.parallelism > 2 and len(listed) > 1:
            with ThreadPoolExecutor(min(backend.parallelism, len(listed))) as pool:
                read_states = list(pool.map(read, listed))
        else:
            read_states = [read(item) for item in listed]
        index = cls()
        states = []
        for (_, key), state in zip(listed, read_states, strict=True):
            if isinstance(state, str):
                index.damaged.append((backend.describe(key), state))
            else:
                states.append(state)
        for state in _topo_order(states):
            index._apply(state)
            index.states.append(state.ident)
        index._live = frozenset(
            n
            for n in index._packfiles
            if bytes([c.RT_PACKFILE]) + index._packfile_ids[n] not in index._coloured
        )
        return index

    def _pf(self, packfile: bytes) -> int:
        n = self._packfile_no.get(packfile)
        if n is None:
            n = self._packfile_no[packfile] = len(self._packfile_ids)
            self._packfile_ids.append(packfile)
        return n

    def _apply(self, state: _State) -> None:
        for etype, body in state.entries():
            if etype == ET_LOCATIONS:
                rtype, version, mac, packfile, offset, length, _flags = _LOCATION.unpack(body)
                self._add_location(bytes([rtype]) + mac, (self._pf(packfile) << 96) | (offset << 32) | length)
                if version > BLOB_VERSION_MAX:
                    self._newer[bytes([rtype]) + mac] = version
                if rtype == c.RT_SNAPSHOT:
                    self._snapshot_macs.add(mac)
            elif etype == ET_COLOURED:
                rtype, mac, _when = _COLOURED.unpack(body)
                self._coloured.add(bytes([rtype]) + mac)
                self.erasing = True
            elif etype == ET_PACKFILE:
                packfile, _state, _ts = _PACKFILE.unpack(body)
                self._packfiles.add(self._pf(packfile))
            elif etype == ET_DELETE and state.start:  # DELETE exists in state 1.1.0 only
                self._apply_delete(body)
                self.erasing = True

    def _add_location(self, key: bytes, packed: int) -> None:
        first = self._loc.get(key)
        if first is None:
            self._loc[key] = packed
            return
        pf = packed >> 96
        more = self._more.get(key, [])
        if any(p >> 96 == pf for p in [first, *more]):
            return  # de-duplicated on (type, mac, packfile), as Go does
        self._more.setdefault(key, []).append(packed)

    def _apply_delete(self, body: memoryview) -> None:
        etype, rtype, blob, packfile = _DELETE.unpack(body)
        key = bytes([rtype]) + blob
        if etype == ET_LOCATIONS:
            pf = self._packfile_no.get(packfile)
            if pf is None or key not in self._loc:
                return
            remaining = [p for p in [self._loc[key], *self._more.pop(key, [])] if p >> 96 != pf]
            if remaining:
                self._loc[key] = remaining[0]
                if len(remaining) > 1:
                    self._more[key] = remaining[1:]
            else:
                del self._loc[key]
                if rtype == c.RT_SNAPSHOT:
                    self._snapshot_macs.discard(blob)
        elif etype == ET_COLOURED:
            self._coloured.discard(key)
        elif etype == ET_PACKFILE:
            pf = self._packfile_no.get(packfile)
            if pf is not None:
                self._packfiles.discard(pf)

    # ------------------------------------------------------------ queries

    def locations(self, rtype: int, mac: bytes) -> list[Location]:
        """Every live location of (rtype, mac), best first; [] when the blob is unknown."""
        key = bytes([rtype]) + mac
        first = self._loc.get(key)
        if first is None:
            return []
        out = []
        for p in [first, *self._more.get(key, ())]:
            pf = p >> 96
            if pf in self._live:
                out.append(Location(self._packfile_ids[pf], (p >> 32) & 0xFFFFFFFFFFFFFFFF, p & 0xFFFFFFFF))
        return out

    def blobs_of_types(self, rtypes: frozenset[int]) -> Iterator[tuple[int, bytes, Location]]:
        """(type, mac, best live location) of every indexed blob of one of `rtypes`."""
        for key in self._loc:
            if key[0] in rtypes:
                locs = self.locations(key[0], key[1:])
                if locs:
                    yield key[0], key[1:], locs[0]

    def blob_version(self, rtype: int, mac: bytes) -> int | None:
        """The delta version when newer than this reader knows, else None."""
        return self._newer.get(bytes([rtype]) + mac)

    def recorded_snapshots(self) -> list[bytes]:
        """Every snapshot id a state records, live or not."""
        return sorted(self._snapshot_macs)

    def snapshot_ids(self) -> list[bytes]:
        """Live snapshots: RT_SNAPSHOT blobs in a live packfile and not coloured (deleted)."""
        return sorted(
            mac
            for mac in self._snapshot_macs
            if bytes([c.RT_SNAPSHOT]) + mac not in self._coloured and self.locations(c.RT_SNAPSHOT, mac)
        )

    def __len__(self) -> int:
        return len(self._loc)


def _read_state(
    ident: bytes, backend: Backend, key: str, codec: c.Codec, cache: NamedCache | None = None
) -> _State:
    path = backend.describe(key)
    name = f"state-{ident.hex()}"
    raw = cache.load_named(name) if cache is not None else None
    kept = raw is not None
    if raw is None:
        try:
            raw = backend.read(key)
        except FileNotFoundError:
            raise CorruptionError(f"cannot read state {path}: it disappeared") from None
    version, payload = c.unwrap(raw, c.RT_STATE, codec.mac, f"state {path}")
    if version > STATE_VERSION_MAX:
        raise UnsupportedVersion(
            f"unsupported state version {c.version_str(version)} (this reader supports up to 1.1.0): {path}"
        )
    stream = codec.decode(payload, f"state {path}")
    try:
        state = _parse_state(ident, path, stream, version >= STATE_V1_1)
    except (struct.error, IndexError):
        raise CorruptionError(f"state {path}: truncated record stream") from None
    if cache is not None and not kept:
        cache.save_named(name, raw)  # only a state that reads well: damage is read anew each time
    return state


def _parse_state(ident: bytes, path: str, stream: bytes, has_parent: bool) -> _State:
    pos = 0
    parent = c.ZERO_MAC
    if has_parent:
        parent = stream[:32]
        if len(parent) != 32:
            raise IndexError
        pos = 32
    start = pos
    fixed = _FIXED_V11 if has_parent else _FIXED
    while True:
        etype = stream[pos]
        if etype == ET_METADATA:
            _version, timestamp, _serial = _METADATA.unpack_from(stream, pos + 1)
            return _State(ident, path, parent, timestamp, stream, start)
        _, length = _TL.unpack_from(stream, pos)
        pos += _TL.size
        if pos + length > len(stream):
            raise IndexError
        want = fixed.get(etype)
        if want is not None and length != want:
            raise CorruptionError(f"state {path}: entry type {etype} has length {length}, expected {want}")
        pos += length


def _topo_order(states: list[_State]) -> list[_State]:
    """Parents before children; roots (zero or unknown parent) by timestamp; cycles last."""
    by_id = {s.ident: s for s in states}
    children: dict[bytes, list[_State]] = {}
    roots = []
    for s in states:
        if s.parent == c.ZERO_MAC or s.parent not in by_id or s.parent == s.ident:
            roots.append(s)
        else:
            children.setdefault(s.parent, []).append(s)
    order: list[_State] = []
    seen: set[bytes] = set()
    stack = sorted(roots, key=lambda s: (s.timestamp, s.ident), reverse=True)
    while stack:
        s = stack.pop()
        if s.ident in seen:
            continue
        seen.add(s.ident)
        order.append(s)
        stack.extend(sorted(children.get(s.ident, []), key=lambda s: (s.timestamp, s.ident), reverse=True))
    order.extend(sorted((s for s in states if s.ident not in seen), key=lambda s: (s.timestamp, s.ident)))
    return order
