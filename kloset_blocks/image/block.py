# The synthesized block image: reads stitched from a Layout's regions (like nbdkit's
# common/regions): bisect over region starts, then copy from in-memory bytes, fill zeros, or read
# the file range through its FileData, padding a file's last block with zeros. Nothing is cached
# here: caching belongs to the FileData (the chunk cache). This sits on the nbdkit hot path, so
# each call does one bisect and touches only the regions it overlaps.
from __future__ import annotations

import os
from bisect import bisect_right
from collections.abc import Iterator
from typing import Any

from kloset_blocks.errors import UsageError
from kloset_blocks.ext4.layout import BYTES, FILE, ZERO, Layout, Region


class BlockImage:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.size = layout.size
        self.regions: list[Region] = layout.regions
        self._starts = [r.start for r in self.regions]
        assert self._check_cover()

    def _check_cover(self) -> bool:
        end = 0
        for r in self.regions:
            if r.start != end or r.length <= 0:
                return False
            end += r.length
        return end == self.size

    def _range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise UsageError(f"read of {length} bytes at {offset} is outside the image of {self.size} bytes")

    def pread(self, offset: int, length: int) -> bytes:
        self._range(offset, length)
        buf = bytearray(length)
        self.readinto(buf, offset)
        return bytes(buf)

    def readinto(self, buf: bytearray | memoryview, offset: int) -> int:
        """Fill `buf` with the image bytes at `offset`; returns len(buf). The buffer may be dirty:
        zero regions are written explicitly."""
        mv = memoryview(buf).cast("B") if not isinstance(buf, memoryview) else buf
        length = len(mv)
        self._range(offset, length)
        regions = self.regions
        i = bisect_right(self._starts, offset) - 1
        pos = 0
        while pos < length:
            r = regions[i]
            rel = offset + pos - r.start
            n = min(r.length - rel, length - pos)
            kind = r.kind
            if kind == BYTES:
                s = r.src_offset + rel
                mv[pos : pos + n] = r.source[s : s + n]
            elif kind == ZERO:
                mv[pos : pos + n] = bytes(n)
            else:
                self._read_file(r, rel, mv[pos : pos + n])
            pos += n
            i += 1
        return length

    @staticmethod
    def _read_file(r: Region, rel: int, out: memoryview) -> None:
        n = len(out)
        have = min(max(r.src_len - rel, 0), n)
        if have:
            r.source.readinto(r.src_offset + rel, out[:have])
        if have < n:
            out[have:] = bytes(n - have)

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """(offset, length, is_zero) covering [offset, offset+length), adjacent runs of one kind merged.
        Zero regions are holes; file ranges (even their padding) and metadata are data."""
        self._range(offset, length)
        out: list[tuple[int, int, bool]] = []
        end = offset + length
        i = bisect_right(self._starts, offset) - 1
        pos = offset
        while pos < end:
            r = self.regions[i]
            n = min(r.start + r.length, end) - pos
            zero = r.kind == ZERO
            if out and out[-1][2] == zero:
                o, ln, _ = out[-1]
                out[-1] = (o, ln + n, zero)
            else:
                out.append((pos, n, zero))
            pos += n
            i += 1
        return out

    def file_ranges(self, offset: int, length: int) -> Iterator[tuple[Any, int, int]]:
        """(FileData, file offset, byte count) for the file bytes within [offset, offset+length):
        what a prefetch of that range of the image has to fetch."""
        self._range(offset, length)
        end = offset + length
        i = bisect_right(self._starts, offset) - 1
        pos = offset
        while pos < end:
            r = self.regions[i]
            rel = pos - r.start
            n = min(r.start + r.length, end) - pos
            have = min(max(r.src_len - rel, 0), n)
            if r.kind == FILE and have:
                yield r.source, r.src_offset + rel, have
            pos += n
            i += 1

    def file_end(self, offset: int) -> int:
        """Where the file bytes of the region holding image byte `offset` end: how far a readahead
        that reads on from `offset` may go (a file's data is one contiguous region). At or before
        `offset` when that byte is metadata, zeros, or the zero padding of a file's last block."""
        r = self.regions[bisect_right(self._starts, offset) - 1]
        return r.start + min(r.src_len, r.length) if r.kind == FILE else r.start

    def write_sparse(self, path: str | os.PathLike[str], chunk: int = 1 << 20) -> None:
        """Write the image to `path` as a sparse file: zero regions become holes."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, self.size)
            buf = bytearray(chunk)
            for r in self.regions:
                if r.kind == ZERO:
                    continue
                # Only a file's own bytes: the padding of its last block stays a hole.
                end = r.start + (min(r.length, r.src_len) if r.kind == FILE else r.length)
                pos = r.start
                while pos < end:
                    n = min(chunk, end - pos)
                    view = memoryview(buf)[:n]
                    self.readinto(view, pos)
                    os.pwrite(fd, view, pos)
                    pos += n
        finally:
            os.close(fd)
