# Extent trees (ifork.rst). Every file is one contiguous run of physical blocks, cut into extents
# of at most EXT_INIT_MAX_LEN = 32768 blocks (a longer ee_len would mean "uninitialized").
# Up to 4 extents fit in i_block's root node; beyond that the tree grows levels: leaf blocks of
# 340 extents, then index blocks of 340 entries, until the root's 4 slots suffice. The planner
# asks for the number of tree blocks first (tree_blocks), allocates them, then encodes.
from __future__ import annotations

import struct

from kloset_blocks.ext4._struct import CStruct

EXT4_EXT_MAGIC = 0xF30A
EXT_INIT_MAX_LEN = 32768
ROOT_SLOTS = 4

EXTENT_HEADER = CStruct(
    "ext4_extent_header",
    [("eh_magic", "H"), ("eh_entries", "H"), ("eh_max", "H"), ("eh_depth", "H"), ("eh_generation", "I")],
)
EXTENT = CStruct(
    "ext4_extent", [("ee_block", "I"), ("ee_len", "H"), ("ee_start_hi", "H"), ("ee_start_lo", "I")]
)
EXTENT_IDX = CStruct(
    "ext4_extent_idx", [("ei_block", "I"), ("ei_leaf_lo", "I"), ("ei_leaf_hi", "H"), ("ei_unused", "H")]
)
_EXTENT = struct.Struct("<IHHI")  # ee_block, ee_len, ee_start_hi, ee_start_lo
_INDEX = struct.Struct("<IIHH")  # ei_block, ei_leaf_lo, ei_leaf_hi, ei_unused


def block_slots(block_size: int) -> int:
    return (block_size - EXTENT_HEADER.size) // EXTENT.size


def extent_count(nblocks: int) -> int:
    return -(-nblocks // EXT_INIT_MAX_LEN)


def tree_blocks(nblocks: int, block_size: int) -> int:
    """Number of extent tree blocks (leaf and index) outside the inode for a contiguous file."""
    n = extent_count(nblocks)
    total = 0
    slots = block_slots(block_size)
    while n > ROOT_SLOTS:
        n = -(-n // slots)
        total += n
    return total


def _extents(start: int, nblocks: int) -> list[tuple[int, int, int]]:
    """(logical block, length, physical block) for one contiguous run."""
    out = []
    lblk = 0
    while lblk < nblocks:
        n = min(EXT_INIT_MAX_LEN, nblocks - lblk)
        out.append((lblk, n, start + lblk))
        lblk += n
    return out


def _node(entries: list[bytes], max_entries: int, depth: int, size: int) -> bytes:
    head = EXTENT_HEADER.pack(
        eh_magic=EXT4_EXT_MAGIC, eh_entries=len(entries), eh_max=max_entries, eh_depth=depth
    )
    raw = head + b"".join(entries)
    return raw + bytes(size - len(raw))


def encode_extent_tree(start: int, nblocks: int, tree_start: int, block_size: int) -> tuple[bytes, bytes]:
    """(60-byte i_block, tree blocks) for `nblocks` data blocks at physical `start`; the tree blocks
    (tree_blocks(nblocks) of them) are placed contiguously at physical `tree_start`, leaves first."""
    level = [
        (lblk, _EXTENT.pack(lblk, n, phys >> 32, phys & 0xFFFFFFFF))
        for lblk, n, phys in _extents(start, nblocks)
    ]
    slots = block_slots(block_size)
    depth = 0
    blocks: list[bytes] = []
    next_blk = tree_start
    while len(level) > ROOT_SLOTS:
        upper = []
        for i in range(0, len(level), slots):
            chunk = level[i : i + slots]
            blocks.append(_node([e for _, e in chunk], slots, depth, block_size))
            first = chunk[0][0]
            upper.append((first, _INDEX.pack(first, next_blk & 0xFFFFFFFF, next_blk >> 32, 0)))
            next_blk += 1
        level = upper
        depth += 1
    root = _node([e for _, e in level], ROOT_SLOTS, depth, 60)
    return root, b"".join(blocks)
