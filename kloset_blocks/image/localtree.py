# Walk a local directory into tree Nodes (tests, `kloset-blocks image --from-dir`). os.lstat only:
# symlinks are never followed, and file contents are never read here: each regular file gets a
# LocalFile that preads on demand (open/pread/close per call, as nbdkit's floppy plugin does, so no
# descriptors are held for trees of any size). Hard links are found by (st_dev, st_ino): the first
# path seen carries the inode, later ones get hardlink_to that path. Paths are bytes, rooted at b"/".
from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from kloset_blocks.errors import CorruptionError, NotFound
from kloset_blocks.tree import Node, ReadIntoByCopy


@dataclass(slots=True)
class LocalFile(ReadIntoByCopy):
    path: bytes
    size: int

    def read(self, offset: int, length: int) -> bytes:
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.pread(fd, length, offset)
        finally:
            os.close(fd)
        if len(data) != length:
            raise CorruptionError(f"{os.fsdecode(self.path)}: short read ({len(data)} of {length} bytes)")
        return data


def walk(top: str | bytes | os.PathLike[str]) -> Iterator[Node]:
    """Nodes for `top` (as b"/") and everything below it, parents before children."""
    top_b = os.fsencode(top)
    try:
        st = os.lstat(top_b)
    except FileNotFoundError as e:
        raise NotFound(f"no such directory: {os.fsdecode(top_b)}") from e
    if not stat.S_ISDIR(st.st_mode):
        raise NotFound(f"not a directory: {os.fsdecode(top_b)}")
    seen: dict[tuple[int, int], bytes] = {}
    yield _node(b"/", top_b, st, seen)
    stack = [(top_b, b"")]
    while stack:
        host, rel = stack.pop()
        with os.scandir(host) as it:
            names = sorted(e.name for e in it)
        for name in names:
            h = host + b"/" + name
            r = rel + b"/" + name
            st = os.lstat(h)
            yield _node(r, h, st, seen)
            if stat.S_ISDIR(st.st_mode):
                stack.append((h, r))


def _node(path: bytes, host: bytes, st: os.stat_result, seen: dict[tuple[int, int], bytes]) -> Node:
    mode = st.st_mode
    node = Node(path=path, mode=mode, uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns)
    if not stat.S_ISDIR(mode) and st.st_nlink > 1:
        key = (st.st_dev, st.st_ino)
        first = seen.get(key)
        if first is not None:
            node.hardlink_to = first
            return node
        seen[key] = path
    if stat.S_ISREG(mode):
        node.size = st.st_size
        node.data = LocalFile(host, st.st_size)
    elif stat.S_ISLNK(mode):
        node.symlink_target = os.readlink(host)
        node.size = len(node.symlink_target)
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        node.rdev = st.st_rdev
    return node
