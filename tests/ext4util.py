# Helpers shared by the ext4 / image tests: synthetic file data, image writing, e2fsck, loop mounts.
from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from kloset_blocks.ext4 import Layout
from kloset_blocks.ext4.layout import FILE, ZERO
from kloset_blocks.image.block import BlockImage
from kloset_blocks.tree import ReadIntoByCopy


class PatternData(ReadIntoByCopy):
    """Deterministic pseudo-random-looking bytes of any size without holding them: block b (4 KiB) is
    a fixed 4 KiB base (from the seed) with its first 8 bytes replaced by b, little-endian."""

    BLOCK = 4096

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = size
        self.seed = seed
        base = b"".join(hashlib.sha256(f"{seed}:{i}".encode()).digest() for i in range(self.BLOCK // 32))
        self._tail = base[8:]

    def _block(self, b: int) -> bytes:
        return b.to_bytes(8, "little") + self._tail

    def read(self, offset: int, length: int) -> bytes:
        assert offset >= 0 and offset + length <= self.size, (offset, length, self.size)
        first, last = offset // self.BLOCK, (offset + length - 1) // self.BLOCK
        if length == 0:
            return b""
        raw = b"".join(self._block(b) for b in range(first, last + 1))
        s = offset - first * self.BLOCK
        return raw[s : s + length]

    def sha256(self, chunk: int = 1 << 22) -> str:
        h = hashlib.sha256()
        for off in range(0, self.size, chunk):
            h.update(self.read(off, min(chunk, self.size - off)))
        return h.hexdigest()


def write_image(layout: Layout, path: Path, data: bool = True) -> Path:
    """The image as a sparse file; data=False leaves file data as holes (metadata-only checks:
    e2fsck never reads file contents)."""
    img = BlockImage(layout)
    if data:
        img.write_sparse(path)
        return path
    with open(path, "wb") as f:
        f.truncate(img.size)
        for r in layout.regions:
            if r.kind not in (ZERO, FILE):
                f.seek(r.start)
                f.write(img.pread(r.start, r.length))
    return path


def e2fsck(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["e2fsck", "-fn", str(path)], capture_output=True, text=True)


def assert_fsck_clean(path: Path) -> None:
    r = e2fsck(path)
    assert r.returncode == 0, r.stdout + r.stderr


@contextlib.contextmanager
def loop_mount(path: Path, mnt: Path, readonly: bool = True) -> Iterator[Path]:
    """losetup + mount; always detaches and unmounts."""
    args = ["losetup", "-f", "--show"] + (["-r"] if readonly else []) + [str(path)]
    dev = subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()
    mounted = False
    try:
        mnt.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "ext4", "-o", "ro" if readonly else "rw", dev, str(mnt)],
            check=True,
            capture_output=True,
        )
        mounted = True
        yield mnt
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=False)
        subprocess.run(["losetup", "-d", dev], check=False)


def file_sha256(path: str | bytes, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def dumpe2fs(path: Path, header_only: bool = False) -> str:
    args = ["dumpe2fs"] + (["-h"] if header_only else []) + [str(path)]
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def debugfs(path: Path, cmd: str) -> str:
    return subprocess.run(
        ["debugfs", "-R", cmd, str(path)], check=True, capture_output=True, text=True
    ).stdout


def flags_of(dumpe2fs_header: str, key: str) -> str:
    for line in dumpe2fs_header.splitlines():
        if line.startswith(key + ":"):
            return line.split(":", 1)[1].strip()
    raise KeyError(key)


def os_path(b: bytes) -> bytes:
    return os.fsencode(b)


def owner_of(nodes: list, path: bytes) -> bytes:
    """The path whose node carries the inode of `path` (follows hardlink_to)."""
    by_path = {n.path: n for n in nodes}
    seen = 0
    while by_path[path].hardlink_to is not None and by_path[path].hardlink_to in by_path and seen < 64:
        path = by_path[path].hardlink_to
        seen += 1
    return path


def compare_tree(nodes: list, mnt: Path, uid: int | None = None, gid: int | None = None) -> int:
    """Every node against the mounted filesystem (os.lstat, readlink, file bytes); every mounted
    path must be a node. Returns the number of paths checked."""
    import stat as st_

    by_path = {n.path: n for n in nodes}
    base = os.fsencode(mnt)
    found = set()
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            rel = os.path.join(dirpath, name)[len(base) :]
            found.add(rel)
    assert found == set(by_path) - {b"/"}, (sorted(found ^ (set(by_path) - {b"/"}))[:10],)
    inode_of: dict[bytes, int] = {}
    for path in by_path:
        host = base + path if path != b"/" else base
        s = os.lstat(host)
        owner = by_path[owner_of(nodes, path)]
        inode_of.setdefault(owner.path, s.st_ino)
        assert inode_of[owner.path] == s.st_ino, path
        assert s.st_mode == owner.mode, (path, oct(s.st_mode), oct(owner.mode))
        assert s.st_uid == (uid if uid is not None else owner.uid), path
        assert s.st_gid == (gid if gid is not None else owner.gid), path
        assert s.st_mtime_ns == owner.mtime_ns, (path, s.st_mtime_ns, owner.mtime_ns)
        kind = st_.S_IFMT(owner.mode)
        if kind == st_.S_IFREG:
            assert s.st_size == owner.size, path
            if owner.size:
                want = hashlib.sha256()
                for off in range(0, owner.size, 1 << 22):
                    want.update(owner.data.read(off, min(1 << 22, owner.size - off)))
                assert file_sha256(host) == want.hexdigest(), path
        elif kind == st_.S_IFLNK:
            assert os.readlink(host) == owner.symlink_target, path
        elif kind in (st_.S_IFCHR, st_.S_IFBLK):
            assert s.st_rdev == owner.rdev, path
    assert len(set(inode_of.values())) == len(inode_of)
    return len(by_path)
