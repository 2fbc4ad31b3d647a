# An empty jbd2 journal (journal.rst; include/linux/jbd2.h), for images whose overlay is kept: after
# a crash the kernel or `e2fsck -p` replays it instead of meeting a half-written filesystem.
#
# The journal lives in inode 8 (EXT4_JOURNAL_INO), one contiguous run of blocks like every file here.
# Empty means: block 0 of the run is the journal superblock (v2, s_start = 0: nothing to replay,
# s_sequence = 1, s_first = 1) and every other block is zero, so it costs nothing until the kernel
# writes it. All journal fields are big-endian. The size follows mke2fs's table for the filesystem's
# block count (e2fsprogs lib/ext2fs/mkjournal.c, ext2fs_default_journal_size), so a check against
# mke2fs can compare like with like. No journal features are set: the kernel adds the ones it wants
# (64bit for a 64bit filesystem) when it first mounts the filesystem read-write.
from __future__ import annotations

from kloset_blocks.ext4._struct import CStruct

EXT4_JOURNAL_INO = 8
JBD2_MAGIC_NUMBER = 0xC03B3998
JBD2_SUPERBLOCK_V2 = 4
JBD2_MIN_JOURNAL_BLOCKS = 1024


JOURNAL_SUPERBLOCK = CStruct(
    "journal_superblock_t",
    [
        # journal_header_t s_header
        ("h_magic", "I"),
        ("h_blocktype", "I"),
        ("h_sequence", "I"),
        ("s_blocksize", "I"),
        ("s_maxlen", "I"),
        ("s_first", "I"),
        ("s_sequence", "I"),
        ("s_start", "I"),
        ("s_errno", "i"),
        ("s_feature_compat", "I"),
        ("s_feature_incompat", "I"),
        ("s_feature_ro_compat", "I"),
        ("s_uuid", "16s"),
        ("s_nr_users", "I"),
        ("s_dynsuper", "I"),
        ("s_max_transaction", "I"),
        ("s_max_trans_data", "I"),
        ("s_checksum_type", "B"),
        ("s_padding2", "3s"),
        ("s_num_fc_blks", "I"),
        ("s_head", "I"),
        ("s_padding", "160s"),
        ("s_checksum", "I"),
        ("s_users", "768s"),
    ],
    size=1024,
    endian=">",
)
assert JOURNAL_SUPERBLOCK.offsets["s_users"] == 0x100


def default_journal_blocks(blocks_count: int) -> int:
    """mke2fs's journal size in blocks for a filesystem of `blocks_count` 4 KiB blocks (4 MiB to
    1 GiB). Below 2048 blocks mke2fs makes no journal; the planner never makes one that small."""
    for limit, size in (
        (32768, 1024),  # < 128 MiB: 4 MiB
        (256 * 1024, 4096),  # < 1 GiB: 16 MiB
        (512 * 1024, 8192),  # < 2 GiB: 32 MiB
        (4096 * 1024, 16384),  # < 16 GiB: 64 MiB
        (8192 * 1024, 32768),  # < 32 GiB: 128 MiB
        (16384 * 1024, 65536),  # < 64 GiB: 256 MiB
        (32768 * 1024, 131072),  # < 128 GiB: 512 MiB
    ):
        if blocks_count < limit:
            return size
    return 262144  # 1 GiB


def encode_journal_superblock(block_size: int, maxlen: int, uuid: bytes) -> bytes:
    """The first block of an empty internal journal of `maxlen` blocks (as mke2fs writes it:
    ext2fs_create_journal_superblock2), padded to a whole block."""
    if maxlen < JBD2_MIN_JOURNAL_BLOCKS:
        raise ValueError(f"a journal needs at least {JBD2_MIN_JOURNAL_BLOCKS} blocks, not {maxlen}")
    raw = JOURNAL_SUPERBLOCK.pack(
        h_magic=JBD2_MAGIC_NUMBER,
        h_blocktype=JBD2_SUPERBLOCK_V2,
        s_blocksize=block_size,
        s_maxlen=maxlen,
        s_first=1,
        s_sequence=1,
        s_start=0,  # 0: the journal is empty, nothing to recover
        s_uuid=uuid,
        s_nr_users=1,
    )
    return raw + bytes(block_size - len(raw))
