# Linear directories (directory.rst): blocks of ext4_dir_entry_2 records {inode u32, rec_len u16,
# name_len u8, file_type u8, name}, each record 4-byte aligned; the last record of a block
# stretches its rec_len to the block's end, so every block is fully covered. "." and ".." come
# first. No htree (dir_index is not enabled), no checksum tail (no metadata_csum).
from __future__ import annotations

import struct

from kloset_blocks.ext4._struct import CStruct

DIR_ENTRY_2 = CStruct(
    "ext4_dir_entry_2", [("inode", "I"), ("rec_len", "H"), ("name_len", "B"), ("file_type", "B")]
)
_HEAD = struct.Struct("<IHBB")
EXT4_NAME_LEN = 255


def rec_len(name_len: int) -> int:
    return (8 + name_len + 3) & ~3


def dir_blocks(entries: list[tuple[bytes, int, int]], block_size: int) -> int:
    """Number of blocks the linear directory takes (same packing as encode_dir)."""
    n = 1
    used = 0
    for name, _, _ in entries:
        r = rec_len(len(name))
        if used + r > block_size:
            n += 1
            used = 0
        used += r
    return n


def encode_dir(entries: list[tuple[bytes, int, int]], block_size: int) -> bytes:
    """Blocks of a linear directory holding (name, inode, file_type) in order."""
    out = bytearray()
    block_start = 0
    last = -1  # offset in `out` of the previous record's header, to stretch its rec_len
    for name, ino, ftype in entries:
        r = rec_len(len(name))
        if len(out) - block_start + r > block_size:
            _stretch(out, last, block_start + block_size)
            out += bytes(block_start + block_size - len(out))
            block_start += block_size
        last = len(out)
        out += _HEAD.pack(ino, r, len(name), ftype) + name + bytes(r - 8 - len(name))
    _stretch(out, last, block_start + block_size)
    out += bytes(block_start + block_size - len(out))
    return bytes(out)


def _stretch(out: bytearray, last: int, block_end: int) -> None:
    struct.pack_into("<H", out, last + 4, block_end - last)
