# Block and inode bitmaps (bitmaps.rst): one block each per group, bit i = item i of the group,
# least significant bit first. The planner allocates every used block and inode as one prefix
# from the start of the filesystem, so each group's bitmap is "the first n bits set". Bits past
# the end of the group (inodes_per_group < 8 * block_size, or a short last group) are padding and
# must be set to 1, as e2fsck checks.
from __future__ import annotations


def prefix_bitmap(used: int, valid: int, block_size: int) -> bytes:
    """Bitmap block with bits [0, used) set, bits [used, valid) clear and padding bits [valid, end) set."""
    nbits = block_size * 8
    assert 0 <= used <= valid <= nbits
    value = (1 << used) - 1
    value |= ((1 << nbits) - 1) ^ ((1 << valid) - 1)
    return value.to_bytes(block_size, "little")
