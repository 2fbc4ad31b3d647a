# Startup prefetch: PostgreSQL reads nearly the same chunks at every start (the control file, the
# catalogs, the WAL named by backup_label), one after another, each a round trip to a remote store.
# So the chunks fetched during a start are recorded, and at the next start of any snapshot of the
# same store they are all fetched at once, in parallel, before Postgres asks for them.
#
# Strategy: the profile is a file in the store's on-disk cache directory, `startup-chunks`: the MACs
# (32 bytes each) of the first LIMIT chunks the client's reads fetched (not the prefetches: a profile
# must not keep itself alive) within WINDOW seconds of the first one, in that order. It is written
# at exit (temporary file renamed into place) and read at the next start. A later snapshot has new
# chunks where its files changed (the table a query reads, the WAL), so the profile also keeps
# where each chunk was, `startup-positions` (lines "INDEX PATH-HEX": the chunk's index in the file
# at that path of the snapshot served): the next start prefetches the chunks at the same places of
# its own snapshot too.
#
# The profile cannot help the first start (or a start after the store's content moved on), where
# Postgres' first reads each cost two round trips, one for the file's object (its chunk list),
# one for the chunk. So a remote snapshot's image is warmed up when it is built (warm_up): the
# objects of its files, smallest files first (the control file, catalogs, maps, configuration:
# what every start and first connection read), are fetched in coalesced spans all in flight at
# once, within WARM_MAX bytes. A small file's chunks are written just before its object, so the
# same spans (each reaching WARM_LEAD back before its first object) usually hold them too
# (Packfiles.warm keeps the spans' bytes). Decoding every small file's chunk list to fetch the
# chunks the spans missed cost more CPU than the round trips it saved (bench/RESULTS.md). The
# command that starts nbdkit (app/check.prepare) warms up first, on the connection it has open
# (warm_snapshot: the same files, so the same spans, kept in the on-disk cache): the plugin then
# gets ready without a request, and connects in the background once ready (Server.after_fork).
# The WAL recovery begins with is named by backup_label, a new file in every backup: the first
# open prefetches its chunks too (wal_start), with the last start's positions.
#
# Invariants:
# - A hint only: a MAC that is not (or no longer) in the store is skipped; every chunk is fetched
#   and MAC-checked as on any read, so a damaged or stale profile costs bytes, never correctness.
# - Bounded: LIMIT MACs in memory and on disk.
from __future__ import annotations

import contextlib
import functools
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kloset_blocks.errors import KlosetError
from kloset_blocks.ext4.layout import FILE
from kloset_blocks.store.codec import RT_CHUNK, RT_OBJECT
from kloset_blocks.store.snapshot import Snapshot, SnapshotFile

if TYPE_CHECKING:
    from kloset_blocks.image.block import BlockImage
    from kloset_blocks.store import Store
    from kloset_blocks.store.diskcache import DiskCache

LIMIT = 4096
WINDOW = 60.0
NAME = "startup-chunks"
POSITIONS = "startup-positions"
MAC = 32
PREFETCH_THREAD = "kloset-prefetch"  # ChunkCache's worker threads (serving/chunks.py)
# Bytes fetched to warm up a snapshot's image: objects and what lies between them.
WARM_MAX = 16 << 20
WARM_LEAD = 64 << 10
# The WAL a start reads first (wal_start), from backup_label (PostgreSQL's format since 8.0:
# "START WAL LOCATION: 1/1B000028 (file 00000001000000010000001B)").
BACKUP_LABEL = b"backup_label"
LABEL_MAX = 64 << 10
WAL_HEAD = 256 << 10
_START_WAL = re.compile(
    rb"^START WAL LOCATION: [0-9A-F]{1,8}/([0-9A-F]{1,8}) \(file ([0-9A-F]{24})\)\r?$", re.M
)


class StartupProfile:
    def __init__(self, directory: Path, limit: int = LIMIT, window: float = WINDOW) -> None:
        self.path = directory / NAME
        self.limit = limit
        self.window = window
        self._seen: dict[bytes, None] = {}
        self._first: float | None = None
        self._lock = threading.Lock()

    def load(self) -> list[bytes]:
        """The MACs recorded by the last start (none when there is no readable profile)."""
        try:
            data = self.path.read_bytes()[: self.limit * MAC]
        except OSError:
            return []
        return [data[i : i + MAC] for i in range(0, len(data) - MAC + 1, MAC)]

    def wrap(self, fetch: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
        """`fetch`, recording what it is asked for during the start window."""

        def recording(mac: bytes) -> Any:
            self.note(mac)
            return fetch(mac)

        return recording

    def note(self, mac: bytes) -> None:
        if threading.current_thread().name == PREFETCH_THREAD:
            return  # only what the client asked for: else a profile would keep its own prefetches
        now = time.monotonic()
        with self._lock:
            if self._first is None:
                self._first = now
            if now - self._first <= self.window and len(self._seen) < self.limit:
                self._seen.setdefault(mac, None)

    def save(self, images: Iterable[BlockImage] = ()) -> None:
        """Replace the profile with this start's (kept as it was when this start fetched nothing),
        with the places in `images` of the chunks recorded."""
        with self._lock:
            macs = list(self._seen)
        if not macs:
            return
        wanted = dict.fromkeys(macs)
        places: list[str] = []
        for image in images:
            for f in _files(image).values():
                loaded = f.loaded_macs()
                for index, mac in enumerate(loaded or ()):
                    if mac in wanted and len(places) < self.limit:
                        places.append(f"{index} {f.path.hex()}\n")
        _replace(self.path, b"".join(macs))
        _replace(self.path.with_name(POSITIONS), "".join(places).encode())

    def load_positions(self) -> list[tuple[bytes, int]]:
        """(path, chunk index) of the chunks the last start read (none when unreadable)."""
        try:
            lines = self.path.with_name(POSITIONS).read_text().splitlines()[: self.limit]
        except (OSError, UnicodeDecodeError):
            return []
        out = []
        for line in lines:
            index, _, path = line.partition(" ")
            with contextlib.suppress(ValueError):
                out.append((bytes.fromhex(path), int(index)))
        return out


def at_positions(image: BlockImage, positions: list[tuple[bytes, int]]) -> list[bytes]:
    """The MACs of the chunks at `positions` (path, index) of this image's snapshot: what a start
    read, placed in another snapshot. Files missing, shorter or unreadable are skipped."""
    return _at({f.path: f for f in _files(image).values()}.get, positions)


def _at(open_file: Callable[[bytes], SnapshotFile | None], positions: list[tuple[bytes, int]]) -> list[bytes]:
    """at_positions' chunks, the files found by `open_file` (None: not there)."""
    out = []
    for path, index in positions:
        f = open_file(path)
        if f is None:
            continue
        try:
            macs = f.macs
        except KlosetError:
            continue
        if 0 <= index < len(macs):
            out.append(macs[index])
    return out


def wal_start(image: BlockImage) -> list[bytes]:
    """The MACs of the chunks of the WAL where a base backup's recovery begins: from the LSN its
    backup_label names, WAL_HEAD bytes on. Every start of the backup reads them first, and they are
    another file in every backup (the last start's positions miss them). None when the image holds
    no backup_label, or none naming a WAL file it holds (looked up among the image's own files)."""
    files = {f.path: f for f in _files(image).values()}
    labels = sorted((p for p in files if p.endswith(b"/" + BACKUP_LABEL)), key=len)
    return _wal_head(files.get, labels[0]) if labels else []


def _wal_head(open_file: Callable[[bytes], SnapshotFile | None], label_path: bytes) -> list[bytes]:
    """wal_start's chunks, the files found by `open_file` (None: not there)."""
    try:
        label = open_file(label_path)
        if label is None or label.size > LABEL_MAX:
            return []
        found = recovery_start(label.read(0, label.size))
        segment = open_file(label_path[: -len(BACKUP_LABEL)] + b"pg_wal/" + found[0]) if found else None
        if found is None or segment is None or segment.size == 0:
            return []
        start = found[1] % segment.size  # the LSN's offset in its segment
        head = segment.chunk_ranges(start, min(WAL_HEAD, segment.size - start))
        return [segment.macs[i] for i, _, _ in head]
    except KlosetError:
        return []


def recovery_chunks(snapshot: Snapshot, root: str, disk: DiskCache) -> list[bytes]:
    """What a start of the data directory at `root` reads first and the on-disk cache lacks: the
    WAL its recovery begins with, and the chunks at the places the last start read (the startup
    profile's positions, in this snapshot), for the command to fetch on its own connection while
    the plugin is still making one. Each file is read through the warm-up (its object at hand)."""

    @functools.cache  # once a path: many positions lie in one file
    def open_file(path: bytes) -> SnapshotFile | None:
        try:
            return snapshot.open_file(path)
        except KlosetError:
            return None

    base = os.fsencode(root).rstrip(b"/") + b"/"
    positions = StartupProfile(disk.dir).load_positions()
    macs = _wal_head(open_file, base + BACKUP_LABEL) + _at(open_file, positions)
    return [m for m in dict.fromkeys(macs) if not os.path.exists(disk.path(m))]


def fetch_into(store: Store, macs: list[bytes], disk: DiskCache, batch: int = 32) -> None:
    """Fetch the chunks `macs` (coalesced, in flight together, `batch` at a time: memory bounded)
    into the on-disk cache, each MAC-checked as on any read; what fails is left to the reader."""
    for i in range(0, len(macs), batch):
        part = macs[i : i + batch]
        with contextlib.suppress(KlosetError, OSError):
            for mac, data in zip(part, store.packfiles.read_many(RT_CHUNK, part), strict=True):
                disk.save(mac, data)


def recovery_start(label: bytes) -> tuple[bytes, int] | None:
    """(WAL segment file name, low 32 bits of the LSN) of backup_label's START WAL LOCATION line,
    or None: the backup's own text, so the name must be exactly 24 hex digits."""
    found = _START_WAL.search(label)
    return (found.group(2), int(found.group(1), 16)) if found else None


def _files(image: BlockImage) -> dict[bytes, SnapshotFile]:
    """The image's snapshot files with an object, by object MAC (one for hard links)."""
    files: dict[bytes, SnapshotFile] = {}
    for region in image.regions:
        source = region.source
        if region.kind == FILE and isinstance(source, SnapshotFile) and source.entry.object:
            files.setdefault(source.entry.object, source)
    return files


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with contextlib.suppress(OSError):
        tmp.write_bytes(data)
        os.replace(tmp, path)


def warm_up(image: BlockImage, store: Store, disk: DiskCache | None = None) -> int:
    """Fetch the objects of the image's files (smallest files first; from `disk` when it holds them) and
    the packfile bytes around them, within WARM_MAX bytes: see the module comment. Returns the
    bytes of the spans."""
    return _warm_objects(store, ((f.size, f.entry.object or b"") for f in _files(image).values()), disk)


def warm_snapshot(snapshot: Snapshot, root: bytes | str, disk: DiskCache) -> int:
    """The same warm-up, of the files under `root` the plugin's image will hold, by the command
    that starts the plugin: it has a connection to the store already, and the plugin then finds
    every span in the on-disk cache, so that it needs none to get ready (an SSH handshake is five
    or six round trips). The files are the image's: regular, not empty, one per object."""
    files = ((e.size, e.object) for _, e in snapshot.walk(root) if e.is_reg and e.size > 0 and e.object)
    return _warm_objects(snapshot.store, files, disk)


def _warm_objects(store: Store, files: Iterable[tuple[int, bytes]], disk: DiskCache | None) -> int:
    """(size, object MAC) of each file; sorted by both, so that any process warming the same files
    plans the same spans (the on-disk cache keeps them by name)."""
    objects = []
    for _, mac in sorted(set(files)):
        found = store.index.locations(RT_OBJECT, mac)
        if found:
            objects.append(found[0])
    # Each span reaches back a little before its first object: that file's chunks lie there. The
    # spans go to the on-disk cache whole: the next start plans the same ones and reads them there.
    return store.packfiles.warm(objects, WARM_MAX, lead=WARM_LEAD, cache=disk) if objects else 0
