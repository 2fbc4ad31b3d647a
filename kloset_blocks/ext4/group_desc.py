# Group descriptors (group_descr.rst): 64 bytes each (64bit feature), packed in the blocks that
# follow the superblock. EXT4_BG_INODE_ZEROED is set on every group so a read-write mount never
# starts the lazy inode-table initialisation thread (which would write into the overlay).
# No checksum (bg_checksum stays 0): neither gdt_csum nor metadata_csum is set.
from __future__ import annotations

from dataclasses import dataclass

from kloset_blocks.ext4._struct import CStruct

EXT4_BG_INODE_UNINIT = 0x1
EXT4_BG_BLOCK_UNINIT = 0x2
EXT4_BG_INODE_ZEROED = 0x4
EXT4_DESC_SIZE_64BIT = 64

GROUP_DESC = CStruct(
    "ext4_group_desc",
    [
        ("bg_block_bitmap_lo", "I"),
        ("bg_inode_bitmap_lo", "I"),
        ("bg_inode_table_lo", "I"),
        ("bg_free_blocks_count_lo", "H"),
        ("bg_free_inodes_count_lo", "H"),
        ("bg_used_dirs_count_lo", "H"),
        ("bg_flags", "H"),
        ("bg_exclude_bitmap_lo", "I"),
        ("bg_block_bitmap_csum_lo", "H"),
        ("bg_inode_bitmap_csum_lo", "H"),
        ("bg_itable_unused_lo", "H"),
        ("bg_checksum", "H"),
        ("bg_block_bitmap_hi", "I"),
        ("bg_inode_bitmap_hi", "I"),
        ("bg_inode_table_hi", "I"),
        ("bg_free_blocks_count_hi", "H"),
        ("bg_free_inodes_count_hi", "H"),
        ("bg_used_dirs_count_hi", "H"),
        ("bg_itable_unused_hi", "H"),
        ("bg_exclude_bitmap_hi", "I"),
        ("bg_block_bitmap_csum_hi", "H"),
        ("bg_inode_bitmap_csum_hi", "H"),
        ("bg_reserved", "I"),
    ],
)
assert GROUP_DESC.size == EXT4_DESC_SIZE_64BIT


@dataclass(frozen=True, slots=True)
class GroupDesc:
    block_bitmap: int
    inode_bitmap: int
    inode_table: int
    free_blocks_count: int
    free_inodes_count: int
    used_dirs_count: int
    itable_unused: int


def encode_group_desc(buf: bytearray, offset: int, g: GroupDesc) -> None:
    """Write one 64-byte descriptor at buf[offset:]."""
    lo, hi = 0xFFFFFFFF, 32
    GROUP_DESC.pack_into(
        buf,
        offset,
        bg_block_bitmap_lo=g.block_bitmap & lo,
        bg_block_bitmap_hi=g.block_bitmap >> hi,
        bg_inode_bitmap_lo=g.inode_bitmap & lo,
        bg_inode_bitmap_hi=g.inode_bitmap >> hi,
        bg_inode_table_lo=g.inode_table & lo,
        bg_inode_table_hi=g.inode_table >> hi,
        bg_free_blocks_count_lo=g.free_blocks_count & 0xFFFF,
        bg_free_blocks_count_hi=g.free_blocks_count >> 16,
        bg_free_inodes_count_lo=g.free_inodes_count & 0xFFFF,
        bg_free_inodes_count_hi=g.free_inodes_count >> 16,
        bg_used_dirs_count_lo=g.used_dirs_count & 0xFFFF,
        bg_used_dirs_count_hi=g.used_dirs_count >> 16,
        bg_itable_unused_lo=g.itable_unused & 0xFFFF,
        bg_itable_unused_hi=g.itable_unused >> 16,
        bg_flags=EXT4_BG_INODE_ZEROED,
    )
