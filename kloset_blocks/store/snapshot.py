# Snapshots: header -> VFS B+tree -> entries -> objects -> chunks (§8, §10, §11), and their
# conversion to the planner's Node interface (kloset_blocks.tree).
#
# Invariants:
# - Paths are bytes, absolute, cleaned; tree keys are the names (file_info.name is "." for a
#   tar `./` member, §17.1).
# - Entry.st_mode is what a filesystem should show: Go fs.FileMode mapped per §10.7 keeping the
#   low 0o7777 bits (tar's setuid/setgid/sticky live there, §17.5) and a regular file with a
#   symlink_target presented as a symlink (§17.3).
# - walk() reads the whole VFS tree level by level and fetches entries in coalesced batches:
#   one pread per run of neighbouring blobs, never one per path.
# - SnapshotFile keeps only the chunk MACs and prefix sums (memory ~ chunks), loads its Object
#   lazily on first read (nodes() over 1M files does no Object fetch), and reads only the chunks
#   overlapping a range, through `snapshot.fetch_chunk` so that a cache can be plugged in.
# - Damage costs only what it touches. A read that fails raises FileDamaged naming the snapshot
#   path. walk() and listdir() never fail for one entry: an entry that cannot be read or decoded
#   comes back as a placeholder with `damage` set (the B+tree key still gives its path): a
#   directory (0700) when the tree has paths below it, so that they are still served, else a
#   regular file of DAMAGED_SIZE bytes whose every read fails (UnreadableFile). The image thus
#   serves such a file's blocks as EIO instead of leaving it out: a missing or empty file would
#   read as a short relation to Postgres (a silently wrong answer), an unreadable one is an error.
#   DAMAGED_SIZE is one Postgres page, so that the file holds at least one block to fail on.
from __future__ import annotations

import bisect
import itertools
import posixpath
import stat
import threading
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from kloset_blocks.errors import CorruptionError, FileDamaged, KlosetError, NotFound
from kloset_blocks.store import codec as c
from kloset_blocks.store.btree import BTree, to_bytes
from kloset_blocks.store.gomode import MODE_SYMLINK, go_mode_to_st_mode
from kloset_blocks.tree import Node

if TYPE_CHECKING:
    from kloset_blocks.store.store import Store

ENTRY_BATCH = 1024
DAMAGED_SIZE = 8192
TAR_IMPORTERS = ("tar", "tar+gz", "tgz")


def clean_path(path: bytes | str) -> bytes:
    """An absolute, cleaned snapshot path (Go path.Clean of "/" + path)."""
    if isinstance(path, str):
        path = path.encode("utf-8", "surrogateescape")
    p = posixpath.normpath(b"/" + path)
    return b"/" + p.lstrip(b"/")


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    id: bytes
    timestamp: datetime
    name: str
    size: int
    importer_type: str
    importer_origin: str
    importer_directory: str
    header: dict[str, Any] = field(repr=False, compare=False)

    @property
    def short_id(self) -> str:
        return self.id[:4].hex()

    @property
    def hex_id(self) -> str:
        return self.id.hex()

    @classmethod
    def from_header(cls, ident: bytes, h: Any) -> SnapshotInfo:
        what = f"snapshot {ident.hex()}"
        try:
            sources = h.get("sources") or []
            if not sources:
                raise CorruptionError(f"{what}: header has no source")
            src = sources[0]
            imp = src.get("importer") or {}
            summary = src.get("summary") or {}
            size = sum(int((summary.get(k) or {}).get("size") or 0) for k in ("directory", "below"))
            ts = c.timestamp_ns(h.get("timestamp"))
            return cls(
                id=ident,
                timestamp=datetime.fromtimestamp(ts // 1_000_000_000, UTC).replace(
                    microsecond=(ts % 1_000_000_000) // 1000
                ),
                name=str(h.get("name") or ""),
                size=size,
                importer_type=str(imp.get("type") or ""),
                importer_origin=str(imp.get("origin") or ""),
                importer_directory=str(imp.get("directory") or ""),
                header=h,
            )
        except (AttributeError, TypeError, ValueError, OverflowError):
            raise CorruptionError(f"{what}: malformed header") from None

    @property
    def vfs_root(self) -> bytes:
        try:
            return bytes(self.header["sources"][0]["root"]["root"])
        except (KeyError, IndexError, TypeError):
            raise CorruptionError(f"snapshot {self.hex_id}: header has no VFS root") from None


@dataclass(slots=True)
class Entry:
    path: bytes
    name: bytes
    mac: bytes
    go_mode: int
    st_mode: int
    size: int
    uid: int
    gid: int
    mtime_ns: int
    nlink: int
    username: str
    groupname: str
    symlink_target: bytes | None
    object: bytes | None
    content_type: str
    chunks: int | None
    damage: str | None = None  # why the entry could not be read (a placeholder, see the top)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.st_mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.st_mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.st_mode)

    @property
    def perm(self) -> int:
        return stat.S_IMODE(self.st_mode)

    @classmethod
    def decode(cls, path: bytes, mac: bytes, rec: Any) -> Entry:
        try:
            fi = rec["file_info"]
            go_mode = int(fi.get("mode") or 0)
            target = rec.get("symlink_target")
            target_b = to_bytes(target) if target else None
            obj = rec.get("object")
            obj_b = bytes(obj) if obj and bytes(obj) != c.ZERO_MAC else None
            chunks = rec.get("chunks")
            return cls(
                path=path,
                name=posixpath.basename(path) or b"/",
                mac=mac,
                go_mode=go_mode,
                st_mode=go_mode_to_st_mode(go_mode, target_b),
                size=int(fi.get("size") or 0),
                uid=int(fi.get("uid") or 0),
                gid=int(fi.get("gid") or 0),
                mtime_ns=c.timestamp_ns(fi.get("mod_time")),
                nlink=int(fi.get("nlink") or 0),
                username=str(fi.get("username") or ""),
                groupname=str(fi.get("groupname") or ""),
                symlink_target=target_b,
                object=obj_b,
                content_type=str(rec.get("content_type") or ""),
                chunks=int(chunks) if chunks is not None else None,
            )
        except (KeyError, AttributeError, TypeError, ValueError):
            raise CorruptionError(f"vfs entry {mac.hex()} ({path!r}): malformed") from None


class SnapshotFile:
    """FileData of one regular file: range reads over its chunk list."""

    def __init__(self, snapshot: Snapshot, entry: Entry) -> None:
        self.snapshot = snapshot
        self.entry = entry
        self.size = entry.size
        self._macs: list[bytes] | None = None
        self._offsets: array | None = None
        self._lock = threading.Lock()

    @property
    def path(self) -> bytes:
        return self.entry.path

    def _load(self) -> None:
        with self._lock:
            if self._macs is not None:
                return
            try:
                macs, offsets = self.snapshot.chunk_list(self.entry)
            except FileDamaged:
                raise
            except KlosetError as e:
                raise FileDamaged(_show(self.path), str(e)) from None
            self._offsets = offsets
            self._macs = macs

    def loaded_macs(self) -> list[bytes] | None:
        """The chunk list if it was read already (None: reading it now may cost a request)."""
        return self._macs

    @property
    def macs(self) -> list[bytes]:
        if self._macs is None:
            self._load()
        return self._macs  # type: ignore[return-value]

    @property
    def offsets(self) -> array:
        if self._macs is None:
            self._load()
        return self._offsets  # type: ignore[return-value]

    def chunk_ranges(self, offset: int, length: int) -> Iterator[tuple[int, int, int]]:
        """(chunk index, start within the chunk, byte count) covering [offset, offset+length)."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"range {offset}+{length} outside file of {self.size} bytes")
        if length == 0:
            return
        offsets = self.offsets
        i = bisect.bisect_right(offsets, offset) - 1
        end = offset + length
        pos = offset
        while pos < end:
            cstart, cend = offsets[i], offsets[i + 1]
            if cend > pos:
                n = min(cend, end) - pos
                yield i, pos - cstart, n
                pos += n
            i += 1

    def chunk(self, index: int) -> c.Buffer:
        """The decoded chunk `index`, length-checked (FileDamaged otherwise)."""
        mac = self.macs[index]
        try:
            data = self.snapshot.fetch_chunk(mac)
        except KlosetError as e:
            raise FileDamaged(_show(self.path), f"chunk {index}: {e}") from None
        want = self.offsets[index + 1] - self.offsets[index]
        if len(data) != want:
            raise FileDamaged(
                _show(self.path), f"chunk {index} ({mac.hex()}) has {len(data)} bytes, object says {want}"
            )
        return data

    def iter_read(self, offset: int = 0, length: int | None = None, readahead: int = 0) -> Iterator[c.Buffer]:
        """The bytes of a range, one piece (bytes or a buffer) per chunk: for streaming without
        holding the range.
        With readahead > 0, up to that many following chunks are fetched and decoded on the
        store's worker threads meanwhile (the codecs release the GIL): memory stays at
        readahead + 1 chunks."""
        if length is None:
            length = self.size - offset
        ranges = list(self.chunk_ranges(offset, length))
        if readahead <= 0 or len(ranges) < 2:
            for i, start, n in ranges:
                data = self.chunk(i)
                yield data if start == 0 and n == len(data) else data[start : start + n]
            return
        pool = self.snapshot.store.executor
        pending: deque[Future[c.Buffer]] = deque()
        queued = 0
        try:
            for _, start, n in ranges:
                while queued < len(ranges) and len(pending) <= readahead:
                    pending.append(pool.submit(self.chunk, ranges[queued][0]))
                    queued += 1
                data = pending.popleft().result()
                yield data if start == 0 and n == len(data) else data[start : start + n]
        finally:
            for fut in pending:
                fut.cancel()

    def read(self, offset: int, length: int) -> bytes:
        pieces = list(self.iter_read(offset, length))
        if len(pieces) == 1 and isinstance(pieces[0], bytes):
            return pieces[0]
        return b"".join(pieces)  # also turns a chunk's view or bytearray into bytes

    def readinto(self, offset: int, out: memoryview) -> None:
        """Fill `out` with the bytes at `offset`, copied straight from the decoded chunks: the
        block-device hot path, where each extra copy of the data costs as much as the read."""
        pos = 0
        for i, start, n in self.chunk_ranges(offset, len(out)):
            data = self.chunk(i)
            out[pos : pos + n] = memoryview(data)[start : start + n] if n != len(data) else data
            pos += n


class UnreadableFile:
    """FileData of a file whose entry cannot be read: every read fails, saying why."""

    def __init__(self, path: bytes, why: str, size: int = DAMAGED_SIZE) -> None:
        self.path = path
        self.why = why
        self.size = size

    def read(self, offset: int, length: int) -> bytes:
        raise FileDamaged(_show(self.path), f"entry cannot be read: {self.why}")

    def readinto(self, offset: int, out: memoryview) -> None:
        self.read(offset, len(out))


def _show(path: bytes) -> str:
    return path.decode(errors="replace")


class Snapshot:
    def __init__(self, store: Store, info: SnapshotInfo) -> None:
        self.store = store
        self.info = info
        self.fetch_chunk: Callable[[bytes], c.Buffer] = store.read_chunk
        self.vfs = BTree(store, c.RT_VFS_BTREE, c.RT_VFS_NODE, info.vfs_root, f"snapshot {info.short_id} vfs")
        self.is_tar = info.importer_type in TAR_IMPORTERS

    def __repr__(self) -> str:
        return f"<Snapshot {self.info.short_id}>"

    # ------------------------------------------------------------ entries

    def _entry(self, path: bytes, mac: Any) -> Entry:
        mac = bytes(mac)
        return Entry.decode(path, mac, self.store.read_record(c.RT_VFS_ENTRY, mac))

    def lookup(self, path: bytes | str) -> Entry:
        """The entry at `path`, not following symlinks."""
        p = clean_path(path)
        mac = self.vfs.find(p)
        if mac is None:
            raise NotFound(f"no such path in snapshot {self.info.short_id}: {p.decode(errors='replace')}")
        return self._entry(p, mac)

    def listdir(self, path: bytes | str) -> list[tuple[bytes, Entry]]:
        """(name, entry) of each direct child of the directory `path`, in name order."""
        entry = self.lookup(path)
        if not entry.is_dir:
            raise NotFound(
                f"not a directory in snapshot {self.info.short_id}: {entry.path.decode(errors='replace')}"
            )
        prefix = entry.path if entry.path == b"/" else entry.path + b"/"
        keys, macs = [], []
        for k, v in self.vfs.scan_from(prefix):
            if k == b"/":
                continue
            if not k.startswith(prefix) or b"/" in k[len(prefix) :]:
                break
            keys.append(k)
            macs.append(bytes(v))
        return [(k[len(prefix) :], e) for k, e in self._resolve(list(zip(keys, macs, strict=True)))]

    def walk(self, root: bytes | str = b"/") -> Iterator[tuple[bytes, Entry]]:
        """(path, entry) of `root` and everything below it, in PathCmp order (by depth, then bytes)."""
        root = clean_path(root)
        prefix = b"/" if root == b"/" else root + b"/"
        batch: list[tuple[bytes, bytes]] = []
        for leaf in self.vfs.leaves():
            for k, v in zip(leaf.keys, leaf.values, strict=True):
                if k == root or k.startswith(prefix):
                    batch.append((k, bytes(v)))
            if len(batch) >= ENTRY_BATCH:
                yield from self._resolve(batch)
                batch = []
        yield from self._resolve(batch)

    def _resolve(self, batch: list[tuple[bytes, bytes]]) -> Iterator[tuple[bytes, Entry]]:
        """The entries of (path, mac) pairs, read in coalesced batches; one that cannot be read
        is a placeholder (damaged_entry), read again alone to tell it from its neighbours."""
        try:
            recs: list[Any] | None = self.store.read_records(c.RT_VFS_ENTRY, [m for _, m in batch])
        except KlosetError:
            recs = None
        for i, (k, m) in enumerate(batch):
            try:
                rec = recs[i] if recs is not None else self.store.read_record(c.RT_VFS_ENTRY, m)
                entry = Entry.decode(k, m, rec)
            except KlosetError as e:
                entry = self.damaged_entry(k, m, str(e))
            yield k, entry

    def damaged_entry(self, path: bytes, mac: bytes, why: str) -> Entry:
        """The placeholder of an entry that cannot be read (see the module comment)."""
        prefix = b"/" if path == b"/" else path + b"/"
        try:
            has_children = any(
                k.startswith(prefix) for k, _ in itertools.islice(self.vfs.scan_from(prefix), 1)
            )
        except KlosetError:
            has_children = False
        mode, size = (
            (stat.S_IFDIR | 0o700, 0)
            if has_children or path == b"/"
            else (stat.S_IFREG | 0o600, DAMAGED_SIZE)
        )
        return Entry(
            path=path,
            name=posixpath.basename(path) or b"/",
            mac=mac,
            go_mode=0,
            st_mode=mode,
            size=size,
            uid=0,
            gid=0,
            mtime_ns=0,
            nlink=1,
            username="",
            groupname="",
            symlink_target=None,
            object=None,
            content_type="",
            chunks=None,
            damage=why,
        )

    # ------------------------------------------------------------ files

    def chunk_list(self, entry: Entry) -> tuple[list[bytes], array]:
        """(chunk MACs, prefix sums with n+1 items) of a regular file, checked against its size."""
        offsets = array("Q", [0])
        macs: list[bytes] = []
        if entry.object is None:
            if entry.size:
                raise CorruptionError(
                    f"{entry.path.decode(errors='replace')}: {entry.size} bytes but no object"
                )
            return macs, offsets
        rec = self.store.read_record(c.RT_OBJECT, entry.object)
        try:
            total = 0
            for ch in rec.get("chunks") or ():
                macs.append(bytes(ch["contentMAC"]))
                total += int(ch.get("length") or 0)
                offsets.append(total)
        except (KeyError, AttributeError, TypeError, ValueError, OverflowError):
            raise CorruptionError(f"object {entry.object.hex()}: malformed chunk list") from None
        if total != entry.size:
            raise CorruptionError(
                f"{entry.path.decode(errors='replace')}: object {entry.object.hex()} holds {total} bytes,"
                f" entry says {entry.size}"
            )
        return macs, offsets

    def open_file(self, path: bytes | str) -> SnapshotFile:
        entry = self.lookup(path)
        if not entry.is_reg:
            raise NotFound(
                f"not a regular file in snapshot {self.info.short_id}: {entry.path.decode(errors='replace')}"
            )
        return SnapshotFile(self, entry)

    # ------------------------------------------------------------ planner view

    def node_of(self, entry: Entry) -> Node:
        node = Node(
            path=entry.path,
            mode=entry.st_mode,
            uid=entry.uid,
            gid=entry.gid,
            mtime_ns=entry.mtime_ns,
        )
        if entry.is_reg:
            node.size = entry.size
            node.data = (
                UnreadableFile(entry.path, entry.damage) if entry.damage else SnapshotFile(self, entry)
            )
        elif entry.is_symlink:
            node.symlink_target = entry.symlink_target or b""
            node.size = len(node.symlink_target)
        return node

    def hardlink_target(self, entry: Entry) -> Entry | None:
        """For a tar hard link (stored as a ModeSymlink relative to the archive root, §17.4): the
        entry of its target when that is a regular file of this snapshot, else None."""
        if not (self.is_tar and entry.go_mode & MODE_SYMLINK and entry.symlink_target):
            return None
        target = clean_path(entry.symlink_target)
        if target == entry.path:
            return None
        try:
            found = self.lookup(target)
        except KlosetError:
            return None
        return found if found.is_reg else None

    def nodes(self, root: bytes | str = b"/") -> Iterator[Node]:
        """Every path at or below `root` as a tree.Node (full snapshot paths), in PathCmp order,
        except tar hard links, which come last (their target may sort after them)."""
        root = clean_path(root)
        prefix = b"/" if root == b"/" else root + b"/"
        links: list[Entry] = []
        for _, entry in self.walk(root):
            if self.is_tar and entry.go_mode & MODE_SYMLINK:
                links.append(entry)
                continue
            yield self.node_of(entry)
        for entry in links:
            node = self.node_of(entry)
            target = self.hardlink_target(entry)
            if target is not None:
                node.symlink_target = None
                node.mode = stat.S_IFREG | stat.S_IMODE(entry.st_mode)
                if target.path.startswith(prefix):
                    node.hardlink_to = target.path
                    node.size = 0
                else:  # the link's target is outside the subtree: present a copy of its content
                    node.size = target.size
                    node.data = SnapshotFile(self, target)
            yield node
