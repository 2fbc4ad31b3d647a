# Table-driven tests of each on-disk encoder. The independent reader is dissect.extfs's c_ext
# (fox-it's cstruct definitions of the kernel structs), plus known values from the kernel docs.
from __future__ import annotations

import os
import stat

import pytest
from dissect.extfs.c_ext import c_ext
from dissect.extfs.c_jdb2 import c_jdb2

from kloset_blocks.ext4 import extent
from kloset_blocks.ext4.bitmaps import prefix_bitmap
from kloset_blocks.ext4.dirent import dir_blocks, encode_dir, rec_len
from kloset_blocks.ext4.group_desc import EXT4_BG_INODE_ZEROED, GROUP_DESC, GroupDesc, encode_group_desc
from kloset_blocks.ext4.inode import INODE, encode_inode, encode_rdev, encode_time
from kloset_blocks.ext4.journal import JOURNAL_SUPERBLOCK, default_journal_blocks, encode_journal_superblock
from kloset_blocks.ext4.superblock import (
    FEATURE_COMPAT,
    FEATURE_INCOMPAT,
    FEATURE_RO_COMPAT,
    SUPER_BLOCK,
    SuperblockParams,
    encode_superblock,
)

# (field, offset) from super.rst / group_descr.rst / inodes.rst
SB_OFFSETS = [
    ("s_inodes_count", 0x0),
    ("s_blocks_count_lo", 0x4),
    ("s_log_block_size", 0x18),
    ("s_magic", 0x38),
    ("s_first_ino", 0x54),
    ("s_inode_size", 0x58),
    ("s_feature_compat", 0x5C),
    ("s_uuid", 0x68),
    ("s_volume_name", 0x78),
    ("s_hash_seed", 0xEC),
    ("s_def_hash_version", 0xFC),
    ("s_desc_size", 0xFE),
    ("s_blocks_count_hi", 0x150),
    ("s_min_extra_isize", 0x15C),
    ("s_flags", 0x160),
    ("s_log_groups_per_flex", 0x174),
    ("s_backup_bgs_0", 0x24C),
    ("s_checksum_seed", 0x270),
]
GD_OFFSETS = [
    ("bg_inode_table_lo", 0x8),
    ("bg_flags", 0x12),
    ("bg_checksum", 0x1E),
    ("bg_block_bitmap_hi", 0x20),
    ("bg_inode_table_hi", 0x28),
    ("bg_free_blocks_count_hi", 0x2C),
    ("bg_itable_unused_hi", 0x32),
]
INODE_OFFSETS = [
    ("i_links_count", 0x1A),
    ("i_flags", 0x20),
    ("i_block", 0x28),
    ("i_size_high", 0x6C),
    ("l_i_blocks_high", 0x74),
    ("l_i_uid_high", 0x78),
    ("i_extra_isize", 0x80),
    ("i_mtime_extra", 0x88),
    ("i_crtime", 0x90),
    ("i_projid", 0x9C),
]
# journal.rst, "Super Block"
JSB_OFFSETS = [
    ("s_blocksize", 0xC),
    ("s_sequence", 0x18),
    ("s_errno", 0x20),
    ("s_uuid", 0x30),
    ("s_nr_users", 0x40),
    ("s_checksum_type", 0x50),
    ("s_num_fc_blks", 0x54),
    ("s_checksum", 0xFC),
    ("s_users", 0x100),
]


@pytest.mark.parametrize(
    ("struct", "field", "offset"),
    [(SUPER_BLOCK, f, o) for f, o in SB_OFFSETS]
    + [(GROUP_DESC, f, o) for f, o in GD_OFFSETS]
    + [(INODE, f, o) for f, o in INODE_OFFSETS]
    + [(JOURNAL_SUPERBLOCK, f, o) for f, o in JSB_OFFSETS],
)
def test_field_offsets(struct, field, offset):
    assert struct.offsets[field] == offset


def _sb(**over) -> SuperblockParams:
    base = {
        "inodes_count": 65536,
        "blocks_count": (5 << 32) + 32768 * 3,
        "free_blocks_count": (1 << 32) + 7,
        "free_inodes_count": 65000,
        "blocks_per_group": 32768,
        "inodes_per_group": 8192,
        "log_block_size": 2,
        "inode_size": 256,
        "first_ino": 11,
        "desc_size": 64,
        "log_groups_per_flex": 4,
        "uuid": bytes(range(16)),
        "volume_name": b"pgdata",
        "hash_seed": bytes(range(16, 32)),
        "extra_isize": 32,
    }
    base.update(over)
    return SuperblockParams(**base)


def test_superblock_read_by_dissect():
    raw = encode_superblock(_sb())
    assert len(raw) == 1024
    sb = c_ext.ext4_super_block(raw)
    table = [
        (sb.s_magic, 0xEF53),
        (sb.s_inodes_count, 65536),
        (sb.s_blocks_count_lo | sb.s_blocks_count_hi << 32, (5 << 32) + 32768 * 3),
        (sb.s_free_blocks_count_lo | sb.s_free_blocks_count_hi << 32, (1 << 32) + 7),
        (sb.s_r_blocks_count_lo, 0),
        (sb.s_first_data_block, 0),
        (1024 << sb.s_log_block_size, 4096),
        (sb.s_blocks_per_group, 32768),
        (sb.s_clusters_per_group, 32768),
        (sb.s_inodes_per_group, 8192),
        (sb.s_rev_level, 1),
        (sb.s_first_ino, 11),
        (sb.s_inode_size, 256),
        (sb.s_feature_compat, 0x200),  # sparse_super2 only: no journal, no resize_inode, no dir_index
        (sb.s_feature_incompat, 0x2 | 0x40 | 0x80 | 0x200),
        (sb.s_feature_ro_compat, 0x1 | 0x2 | 0x8 | 0x20 | 0x40),  # no metadata_csum (0x400), no gdt_csum
        (sb.s_uuid, bytes(range(16))),
        (sb.s_volume_name, b"pgdata".ljust(16, b"\0")),
        (sb.s_desc_size, 64),
        (sb.s_min_extra_isize, 32),
        (sb.s_want_extra_isize, 32),
        (sb.s_log_groups_per_flex, 4),
        (list(sb.s_backup_bgs), [0, 0]),
        (sb.s_state, 1),
        (sb.s_checksum_type, 0),
    ]
    for got, want in table:
        assert got == want
    assert (FEATURE_COMPAT, FEATURE_INCOMPAT, FEATURE_RO_COMPAT) == (0x200, 0x2C2, 0x6B)


def test_group_desc_read_by_dissect():
    buf = bytearray(128)
    g = GroupDesc(
        block_bitmap=(1 << 32) + 5,
        inode_bitmap=6,
        inode_table=(2 << 32) + 7,
        free_blocks_count=70000,
        free_inodes_count=8000,
        used_dirs_count=3,
        itable_unused=0,
    )
    encode_group_desc(buf, 64, g)
    assert buf[:64] == bytes(64)
    d = c_ext.ext4_group_desc(bytes(buf[64:]))
    assert d.bg_block_bitmap_lo | d.bg_block_bitmap_hi << 32 == (1 << 32) + 5
    assert d.bg_inode_bitmap_lo == 6
    assert d.bg_inode_table_lo | d.bg_inode_table_hi << 32 == (2 << 32) + 7
    assert d.bg_free_blocks_count_lo | d.bg_free_blocks_count_hi << 16 == 70000
    assert d.bg_free_inodes_count_lo == 8000
    assert d.bg_used_dirs_count_lo == 3
    assert d.bg_flags == EXT4_BG_INODE_ZEROED
    assert d.bg_checksum == 0


@pytest.mark.parametrize(
    ("ns", "base", "extra"),
    [
        (0, 0, 0),
        (1_500_000_000_123_456_789, 1_500_000_000, 123_456_789 << 2),
        (-1, 0xFFFFFFFF, 999_999_999 << 2),  # 1969-12-31T23:59:59.999999999
        ((2**31) * 10**9, 0x80000000, 1),  # 2038-01-19: epoch bit 1
        ((2**32 + 5) * 10**9 + 7, 5, (7 << 2) | 1),
        (-(2**40) * 10**9, 0x80000000, 0),  # clamped to the earliest representable second
    ],
)
def test_encode_time(ns, base, extra):
    assert encode_time(ns) == (base, extra)


@pytest.mark.parametrize(
    ("major", "minor", "words"),
    [
        (1, 3, (0x0103, 0)),
        (8, 255, (0x08FF, 0)),
        (300, 70000, (0, (70000 & 0xFF) | (300 << 8) | ((70000 & ~0xFF) << 12))),
        (259, 0, (0, 259 << 8)),
    ],
)
def test_encode_rdev(major, minor, words):
    raw = encode_rdev(os.makedev(major, minor))
    assert (int.from_bytes(raw[:4], "little"), int.from_bytes(raw[4:8], "little")) == words


def test_inode_read_by_dissect():
    buf = bytearray(256)
    encode_inode(
        buf,
        0,
        mode=stat.S_IFREG | 0o4755,
        uid=70000,
        gid=65536 + 2,
        size=(3 << 32) + 9,
        mtime_ns=1_700_000_000_000_000_001,
        links_count=3,
        blocks_512=(1 << 33) + 8,
        flags=0x80000,
        i_block=b"x" * 60,
    )
    i = c_ext.ext4_inode(bytes(buf))
    assert i.i_mode == stat.S_IFREG | 0o4755
    assert i.i_uid | i.i_uid_high << 16 == 70000
    assert i.i_gid | i.i_gid_high << 16 == 65538
    assert i.i_size_lo | i.i_size_high << 32 == (3 << 32) + 9
    assert i.i_links_count == 3
    assert i.i_blocks_lo | i.i_blocks_high << 32 == (1 << 33) + 8
    assert i.i_flags == 0x80000
    assert i.i_block == b"x" * 60
    assert i.i_extra_isize == 32
    assert i.i_mtime == 1_700_000_000 and i.i_mtime_extra == 1 << 2
    assert i.i_crtime == i.i_ctime == i.i_atime == i.i_mtime


def test_superblock_with_journal():
    i_block = bytes(range(60))
    jnl = i_block + (0).to_bytes(4, "little") + (16 << 20).to_bytes(4, "little")
    sb = c_ext.ext4_super_block(encode_superblock(_sb(journal_inum=8, jnl_blocks=jnl)))
    assert sb.s_feature_compat == 0x200 | 0x4  # sparse_super2 | has_journal
    assert sb.s_journal_inum == 8
    assert sb.s_jnl_backup_type == 1  # EXT3_JNL_BACKUP_BLOCKS
    assert b"".join(x.to_bytes(4, "little") for x in sb.s_jnl_blocks) == jnl
    assert sb.s_journal_dev == 0 and sb.s_journal_uuid == bytes(16)  # internal journal


def test_journal_superblock_read_by_dissect():
    raw = encode_journal_superblock(4096, 16384, bytes(range(16)))
    assert len(raw) == 4096 and raw[1024:] == bytes(3072)
    j = c_jdb2.journal_superblock(raw)
    table = [
        (j.s_header.h_magic, 0xC03B3998),
        (j.s_header.h_blocktype, 4),  # JBD2_SUPERBLOCK_V2
        (j.s_header.h_sequence, 0),
        (j.s_blocksize, 4096),
        (j.s_maxlen, 16384),
        (j.s_first, 1),
        (j.s_sequence, 1),
        (j.s_start, 0),  # empty: nothing to replay
        (j.s_errno, 0),
        (j.s_feature_compat, 0),
        (j.s_feature_incompat, 0),
        (j.s_feature_ro_compat, 0),
        (j.s_uuid, bytes(range(16))),
        (j.s_nr_users, 1),
        (j.s_checksum_type, 0),
        (j.s_checksum, 0),
    ]
    for got, want in table:
        assert got == want
    with pytest.raises(ValueError):
        encode_journal_superblock(4096, 1023, bytes(16))


@pytest.mark.parametrize(
    ("blocks", "journal"),
    [
        (32767, 1024),
        (32768, 4096),  # one 4 KiB group: 16 MiB
        (256 * 1024 - 1, 4096),
        (256 * 1024, 8192),
        (4096 * 1024 - 1, 16384),
        (4096 * 1024, 32768),
        (32768 * 1024 - 1, 131072),
        (32768 * 1024, 262144),  # >= 128 GiB: 1 GiB, the largest
        (1 << 40, 262144),
    ],
)
def test_default_journal_blocks(blocks, journal):
    assert default_journal_blocks(blocks) == journal


@pytest.mark.parametrize(
    ("nblocks", "n_extents", "tree_blocks", "depth"),
    [
        (0, 0, 0, 0),
        (1, 1, 0, 0),
        (32768, 1, 0, 0),
        (32769, 2, 0, 0),
        (4 * 32768, 4, 0, 0),
        (4 * 32768 + 1, 5, 1, 1),  # > 4 extents: one leaf block
        (262144, 8, 1, 1),  # 1 GiB: 8 extents
        (340 * 32768, 340, 1, 1),
        (341 * 32768, 341, 2, 1),
        (4 * 340 * 32768, 1360, 4, 1),
        (4 * 340 * 32768 + 1, 1361, 5 + 1, 2),  # 5 leaves + 1 index block
    ],
)
def test_extent_tree(nblocks, n_extents, tree_blocks, depth):
    assert extent.extent_count(nblocks) == n_extents
    assert extent.tree_blocks(nblocks, 4096) == tree_blocks
    start, tree_start = 1000, 50
    root, blocks = extent.encode_extent_tree(start, nblocks, tree_start, 4096)
    assert len(root) == 60 and len(blocks) == tree_blocks * 4096
    # Walk the tree as a reader would, with dissect's structs, collecting (lblk, len, pblk).
    found = []

    def walk(node: bytes, expect_depth: int) -> None:
        h = c_ext.ext4_extent_header(node[:12])
        assert h.eh_magic == 0xF30A and h.eh_depth == expect_depth
        assert h.eh_max == (4 if len(node) == 60 else 340)
        for k in range(h.eh_entries):
            e = node[12 + 12 * k : 24 + 12 * k]
            if expect_depth == 0:
                x = c_ext.ext4_extent(e)
                found.append((x.ee_block, x.ee_len, x.ee_start_lo | x.ee_start_hi << 32))
            else:
                x = c_ext.ext4_extent_idx(e)
                leaf = x.ei_leaf_lo | x.ei_leaf_hi << 32
                off = (leaf - tree_start) * 4096
                walk(blocks[off : off + 4096], expect_depth - 1)

    walk(root, depth)
    assert len(found) == n_extents
    pos = 0
    for lblk, ln, pblk in found:
        assert lblk == pos and 0 < ln <= 32768 and pblk == start + pos
        pos += ln
    assert pos == nblocks


@pytest.mark.parametrize(
    ("names", "nblocks"),
    [
        ([b"a"], 1),
        ([b"x" * 255] * 15, 1),  # 12 + 12 + 15 * 264 = 3984 <= 4096
        ([b"x" * 255] * 16, 2),
        ([b"f%05d" % i for i in range(20000)], 20000 * 16 // 4096 + 1),
    ],
)
def test_dir_blocks(names, nblocks):
    entries = [(b".", 2, 2), (b"..", 2, 2)] + [(n, 11 + i, 1) for i, n in enumerate(names)]
    raw = encode_dir(entries, 4096)
    assert len(raw) == nblocks * 4096 == dir_blocks(entries, 4096) * 4096
    # Re-read with dissect's ext2_dir_entry_2: every block fully covered, names in order.
    got = []
    for b in range(nblocks):
        off = b * 4096
        while off < (b + 1) * 4096:
            d = c_ext.ext2_dir_entry_2(raw[off : off + 8])
            assert d.rec_len >= rec_len(d.name_len) and d.rec_len % 4 == 0
            got.append((raw[off + 8 : off + 8 + d.name_len], d.inode, d.file_type))
            off += d.rec_len
        assert off == (b + 1) * 4096
    assert got == entries


@pytest.mark.parametrize(
    ("used", "valid", "ones"),
    [
        (0, 32768, 0),
        (32768, 32768, 32768),
        (10, 32768, 10),
        (10, 8192, 10 + 32768 - 8192),
        (0, 16, 32768 - 16),
    ],
)
def test_prefix_bitmap(used, valid, ones):
    raw = prefix_bitmap(used, valid, 4096)
    value = int.from_bytes(raw, "little")
    assert bin(value).count("1") == ones
    for bit in (0, used - 1, used, valid - 1, valid, 32767):
        if 0 <= bit < 32768:
            assert (value >> bit) & 1 == (bit < used or bit >= valid)
