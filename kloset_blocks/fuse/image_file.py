# `expose`: the synthesized ext4 image as one regular, read-only file.
#
# Strategy: a FUSE filesystem whose root inode IS a regular file (S_IFREG), mounted on the path the
# user gives, as qemu-storage-daemon's FUSE export does: after the mount, FILE itself is the image,
# so `e2fsck -fn FILE`, `debugfs FILE`, `losetup -r FILE` and `qemu-img create -b FILE -F raw` all
# take it like any image file. The bytes come from serving.server.Server, the same object the nbdkit
# plugin is a facade over: same options, same BlockImage, same chunk cache and sequential readahead.
#
# Invariants: one inode (ROOT_INODE); size = image size; mode 0444 owned by the user who mounted
# it; mtime = the snapshot's time. The page cache may keep what it read (keep_cache): the image
# never changes while mounted.
from __future__ import annotations

import errno
import os
import stat
from typing import Any

import pyfuse3

from kloset_blocks.fuse.mount import ReadOnlyOps, attributes, check_open_flags, in_thread
from kloset_blocks.serving.server import Export, PluginConfig, Server, describe
from kloset_blocks.units import format_size


class ImageFileOps(ReadOnlyOps):
    def __init__(self, server: Server, export: Export, mtime_ns: int) -> None:
        super().__init__()
        self.server = server
        self.export = export
        self.size = export.image.size
        self.attr = attributes(
            pyfuse3.ROOT_INODE, stat.S_IFREG | 0o444, self.size, os.geteuid(), os.getegid(), mtime_ns
        )

    def describe(self) -> str:
        return f"{self.export.description}, {format_size(self.size)} image file"

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.attr

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.ENOTDIR)

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOENT)
        check_open_flags(flags)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray:
        n = max(0, min(size, self.size - off))
        if n == 0:
            return b""
        buf = bytearray(n)
        if next(self.export.image.file_ranges(off, n), None) is None:
            # Metadata and free space only: memory copies, cheaper than a thread hop.
            self.server.pread(self.export, memoryview(buf), off)
        else:
            await in_thread(self.server.pread, self.export, memoryview(buf), off)
        return buf

    async def release(self, fh: int) -> None:
        return None

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = (self.size + 4095) // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files, s.f_ffree, s.f_favail = 1, 0, 0
        s.f_namemax = 255
        return s

    def close(self) -> None:
        self.server.cleanup()


def build(config: PluginConfig) -> ImageFileOps:
    """Open the store and plan the image, exactly as the nbdkit plugin's get_ready does."""
    server = Server()
    server.config = config
    server.config_complete()
    server.get_ready()
    export = server.open("")
    info = server.store.find_snapshot(export.name)
    ts = info.timestamp
    mtime_ns = int(ts.timestamp()) * 1_000_000_000 + ts.microsecond * 1000
    return ImageFileOps(server, export, mtime_ns)


__all__ = ["ImageFileOps", "build", "describe"]
