# A filesystem tree as the ext4 planner sees it, whatever it was read from (a Kloset snapshot,
# a local directory, a generated test tree).
#
# Invariants every producer keeps:
# - `path` is absolute bytes (non-UTF-8 names kept as they are); the root is b"/".
# - `mode` is a POSIX st_mode: S_IFMT type bits | the 0o7777 permission bits (setuid, setgid,
#   sticky included). Producers translate their own encodings (Go fs.FileMode, tar) into it.
# - A regular file of size > 0 has `data`; reading it never needs the whole file in memory.
# - A hard link is a second name of another node's inode: `hardlink_to` holds that node's path,
#   and the node's own mode, owner and data are ignored.
# - Symlinks carry their target in `symlink_target`; `size` is len(symlink_target).
# - Device nodes carry `rdev` (Linux encoding, os.makedev); 0 when unknown.
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from kloset_blocks.errors import CorruptionError


class FileData(Protocol):
    """The bytes of one regular file, read by range."""

    size: int

    def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes at `offset`, for 0 <= offset <= offset + length <= size."""
        ...

    def readinto(self, offset: int, out: memoryview) -> None:
        """Fill `out` with the bytes at `offset` (the block image's hot path: no extra copy where
        the data allows; ReadIntoByCopy gives it to a FileData that only has read())."""
        ...


class ReadIntoByCopy:
    """readinto() for a FileData whose read() is all it has: one copy, the length checked."""

    __slots__ = ()

    def read(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def readinto(self, offset: int, out: memoryview) -> None:
        data = self.read(offset, len(out))
        if len(data) != len(out):
            raise CorruptionError(
                f"file data returned {len(data)} bytes instead of {len(out)} at offset {offset}"
            )
        out[:] = data


@dataclass(slots=True)
class Node:
    path: bytes
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int = 0
    symlink_target: bytes | None = None
    hardlink_to: bytes | None = None
    rdev: int = 0
    data: FileData | None = None


@dataclass(slots=True)
class BytesData(ReadIntoByCopy):
    """FileData over bytes in memory: for tests and tiny generated files."""

    content: bytes

    @property
    def size(self) -> int:
        return len(self.content)

    def read(self, offset: int, length: int) -> bytes:
        return self.content[offset : offset + length]
