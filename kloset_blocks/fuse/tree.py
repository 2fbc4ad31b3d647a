# `browse`: a snapshot's files as a read-only directory tree (what `plakar mount` offers).
#
# Strategy: at start, one pass over Snapshot.nodes(root) (the same walk the ext4 planner consumes,
# with tar hard links already resolved to their target's path) numbers the inodes: root = 1, then
# in walk order; a hard link is one more name (and nlink) of its target's inode. Memory is one small
# record per path; file data stays in the store. Reads go through SnapshotFile.read, whose chunks
# come from the shared ChunkCache (snapshot.fetch_chunk = cache.get, as in nbdserver); a read that
# starts where the previous read of that open file ended prefetches the chunks of the next
# `readahead` bytes.
#
# Invariants: st_mode, st_uid, st_gid, st_size and st_mtime are the snapshot entry's (atime and
# ctime repeat the mtime: Kloset keeps no other time); a directory's nlink is 2 + its subdirectories;
# listings are in the snapshot's name order. Nothing changes while mounted, so the kernel may cache
# attributes, names and pages for long.
from __future__ import annotations

import errno
import itertools
import posixpath
import stat
from dataclasses import dataclass, field
from typing import Any

import pyfuse3

from kloset_blocks.errors import NotFound, UsageError
from kloset_blocks.fuse.mount import ReadOnlyOps, attributes, check_open_flags, in_thread
from kloset_blocks.serving.chunks import ChunkCache
from kloset_blocks.store import Snapshot, Store, cache_dir_for, clean_path, open_store, passphrase_source
from kloset_blocks.units import format_size

IMPLICIT_DIR = stat.S_IFDIR | 0o755  # a parent the snapshot does not list (never seen in practice)


@dataclass(slots=True)
class Inode:
    ino: int
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int = 0
    nlink: int = 1
    rdev: int = 0
    target: bytes | None = None  # symlink target
    data: Any = None  # SnapshotFile of a regular file
    parent: int = 0  # directories: the parent directory's inode
    names: list[bytes] | None = None  # directories: children in listing order
    children: dict[bytes, int] | None = None


@dataclass(slots=True)
class Handle:
    inode: Inode
    end: int = -1  # where the previous read ended: a read starting there is sequential


@dataclass
class Tree:
    inodes: list[Inode | None] = field(default_factory=lambda: [None])  # index = inode number

    def add(self, **kw: Any) -> Inode:
        inode = Inode(ino=len(self.inodes), **kw)
        self.inodes.append(inode)
        return inode

    def get(self, ino: int) -> Inode:
        if 0 < ino < len(self.inodes):
            inode = self.inodes[ino]
            if inode is not None:
                return inode
        raise pyfuse3.FUSEError(errno.ENOENT)


def build_tree(snapshot: Snapshot, root: bytes = b"/") -> Tree:
    root = clean_path(root)
    try:
        top = snapshot.lookup(root)
    except NotFound:
        raise NotFound(
            f"no directory {root.decode(errors='replace')} in snapshot {snapshot.info.short_id}"
        ) from None
    if not top.is_dir:
        raise UsageError(f"{root.decode(errors='replace')} is not a directory in the snapshot")
    tree = Tree()
    by_path: dict[bytes, int] = {}

    def add_dir(path: bytes, mode: int, uid: int, gid: int, mtime_ns: int) -> Inode:
        inode = tree.add(mode=mode, uid=uid, gid=gid, mtime_ns=mtime_ns, nlink=2, names=[], children={})
        by_path[path] = inode.ino
        return inode

    def parent_of(path: bytes) -> Inode:
        parent_path = posixpath.dirname(path)
        ino = by_path.get(parent_path)
        if ino is None:  # a path whose directory the snapshot does not list: make one up
            grand = parent_of(parent_path)
            inode = add_dir(parent_path, IMPLICIT_DIR, 0, 0, 0)
            link(grand, posixpath.basename(parent_path), inode)
            return inode
        return tree.get(ino)

    def link(parent: Inode, name: bytes, inode: Inode) -> None:
        assert parent.children is not None and parent.names is not None
        if name in parent.children:
            return
        parent.children[name] = inode.ino
        parent.names.append(name)
        if stat.S_ISDIR(inode.mode):
            inode.parent = parent.ino
            parent.nlink += 1

    rootdir = add_dir(root, top.st_mode, top.uid, top.gid, top.mtime_ns)
    rootdir.parent = rootdir.ino
    for node in snapshot.nodes(root):
        if node.path == root:
            continue
        parent = parent_of(node.path)
        name = posixpath.basename(node.path)
        if node.hardlink_to is not None and node.hardlink_to in by_path:
            inode = tree.get(by_path[node.hardlink_to])
            if name not in (parent.children or {}):
                inode.nlink += 1
            link(parent, name, inode)
            continue
        if stat.S_ISDIR(node.mode):
            inode = add_dir(node.path, node.mode, node.uid, node.gid, node.mtime_ns)
        else:
            inode = tree.add(
                mode=node.mode,
                uid=node.uid,
                gid=node.gid,
                mtime_ns=node.mtime_ns,
                size=node.size,
                rdev=node.rdev,
                target=node.symlink_target,
                data=node.data,
            )
            by_path[node.path] = inode.ino
        link(parent, name, inode)
    for inode in tree.inodes:
        if inode is not None and inode.names is not None:
            inode.names.sort()  # the snapshot's byte order; hard links were walked last
    return tree


class TreeOps(ReadOnlyOps):
    supports_dot_lookup = True

    def __init__(self, tree: Tree, cache: ChunkCache, readahead: int, label: str = "") -> None:
        super().__init__()
        self.tree = tree
        self.cache = cache
        self.readahead = readahead
        self.label = label
        self.handles: dict[int, Handle] = {}
        self._fh = itertools.count(1)
        self.total_bytes = sum(i.size for i in tree.inodes if i is not None and i.data is not None)
        self.store: Store | None = None

    def describe(self) -> str:
        files = len(self.tree.inodes) - 1
        return f"{self.label}, {files} inodes, {format_size(self.total_bytes)} of files"

    def attr(self, inode: Inode) -> pyfuse3.EntryAttributes:
        return attributes(
            inode.ino, inode.mode, inode.size, inode.uid, inode.gid, inode.mtime_ns, inode.nlink, inode.rdev
        )

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self.attr(self.tree.get(inode))

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        parent = self.tree.get(parent_inode)
        if parent.children is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == b".":
            return self.attr(parent)
        if name == b"..":
            return self.attr(self.tree.get(parent.parent))
        ino = parent.children.get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.attr(self.tree.get(ino))

    async def readlink(self, inode: int, ctx: Any) -> bytes:
        target = self.tree.get(inode).target
        if target is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        return target

    async def opendir(self, inode: int, ctx: Any) -> int:
        if self.tree.get(inode).children is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        d = self.tree.get(fh)
        assert d.names is not None and d.children is not None
        for i in range(start_id, len(d.names)):
            name = d.names[i]
            if not pyfuse3.readdir_reply(token, name, self.attr(self.tree.get(d.children[name])), i + 1):
                break

    async def releasedir(self, fh: int) -> None:
        return None

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        node = self.tree.get(inode)
        check_open_flags(flags)
        if not stat.S_ISREG(node.mode):
            raise pyfuse3.FUSEError(errno.EISDIR if node.children is not None else errno.EACCES)
        fh = next(self._fh)
        self.handles[fh] = Handle(node)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self.handles.get(fh)
        if h is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        data = h.inode.data
        n = max(0, min(size, h.inode.size - off))
        if n == 0 or data is None:
            return b""
        out = await in_thread(data.read, off, n)
        sequential, h.end = off == h.end, off + n
        if sequential and self.readahead:
            self._prefetch(data, off + n)
        return out

    def _prefetch(self, data: Any, start: int) -> None:
        n = min(self.readahead, data.size - start)
        if n > 0:
            macs = data.macs
            self.cache.prefetch(macs[i] for i, _, _ in data.chunk_ranges(start, n))

    async def release(self, fh: int) -> None:
        self.handles.pop(fh, None)

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = (self.total_bytes + 4095) // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = len(self.tree.inodes) - 1
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    def close(self) -> None:
        self.cache.shutdown()
        if self.store is not None:
            self.store.close()


def build(
    store: str, snapshot: str, path: bytes, *, passphrase: str | None, cache: int, readahead: int
) -> TreeOps:
    st = open_store(store, passphrase_source(passphrase, store), cache_dir=cache_dir_for(store))
    snap = st.open_snapshot(snapshot)
    chunk_cache = ChunkCache(st.read_chunk, max_bytes=cache)
    snap.fetch_chunk = chunk_cache.get
    tree = build_tree(snap, path)
    label = f"snapshot {snap.info.short_id} {path.decode(errors='replace')}"
    ops = TreeOps(tree, chunk_cache, readahead, label)
    ops.store = st
    return ops
