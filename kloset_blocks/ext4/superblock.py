# The ext4 superblock (super.rst), 1024 bytes at byte 1024 of the image. With 4 KiB blocks
# s_first_data_block is 0, so the superblock lives inside block 0. No checksums: neither
# metadata_csum nor gdt_csum is set. sparse_super2 with s_backup_bgs = {0, 0} means there is no
# backup superblock anywhere, so file data may run across group boundaries. A journal (has_journal,
# inode 8, its block map backed up in s_jnl_blocks) only when the planner is asked for one.
from __future__ import annotations

from dataclasses import dataclass

from kloset_blocks.ext4._struct import CStruct

EXT4_SUPER_MAGIC = 0xEF53
SUPERBLOCK_OFFSET = 1024

# compat
EXT4_FEATURE_COMPAT_HAS_JOURNAL = 0x4
EXT4_FEATURE_COMPAT_DIR_INDEX = 0x20
EXT4_FEATURE_COMPAT_SPARSE_SUPER2 = 0x200
# incompat
EXT4_FEATURE_INCOMPAT_FILETYPE = 0x2
EXT4_FEATURE_INCOMPAT_EXTENTS = 0x40
EXT4_FEATURE_INCOMPAT_64BIT = 0x80
EXT4_FEATURE_INCOMPAT_FLEX_BG = 0x200
# ro_compat
EXT4_FEATURE_RO_COMPAT_SPARSE_SUPER = 0x1
EXT4_FEATURE_RO_COMPAT_LARGE_FILE = 0x2
EXT4_FEATURE_RO_COMPAT_HUGE_FILE = 0x8
EXT4_FEATURE_RO_COMPAT_DIR_NLINK = 0x20
EXT4_FEATURE_RO_COMPAT_EXTRA_ISIZE = 0x40

FEATURE_COMPAT = EXT4_FEATURE_COMPAT_SPARSE_SUPER2
FEATURE_INCOMPAT = (
    EXT4_FEATURE_INCOMPAT_FILETYPE
    | EXT4_FEATURE_INCOMPAT_EXTENTS
    | EXT4_FEATURE_INCOMPAT_64BIT
    | EXT4_FEATURE_INCOMPAT_FLEX_BG
)
FEATURE_RO_COMPAT = (
    EXT4_FEATURE_RO_COMPAT_SPARSE_SUPER
    | EXT4_FEATURE_RO_COMPAT_LARGE_FILE
    | EXT4_FEATURE_RO_COMPAT_HUGE_FILE
    | EXT4_FEATURE_RO_COMPAT_DIR_NLINK
    | EXT4_FEATURE_RO_COMPAT_EXTRA_ISIZE
)

EXT2_FLAGS_SIGNED_HASH = 0x1
DX_HASH_HALF_MD4 = 1
EXT4_VALID_FS = 1
EXT4_ERRORS_CONTINUE = 1
EXT4_OS_LINUX = 0
EXT4_DYNAMIC_REV = 1
EXT3_JNL_BACKUP_BLOCKS = 1  # s_jnl_backup_type: s_jnl_blocks copies the journal inode's i_block

SUPER_BLOCK = CStruct(
    "ext4_super_block",
    [
        ("s_inodes_count", "I"),
        ("s_blocks_count_lo", "I"),
        ("s_r_blocks_count_lo", "I"),
        ("s_free_blocks_count_lo", "I"),
        ("s_free_inodes_count", "I"),
        ("s_first_data_block", "I"),
        ("s_log_block_size", "I"),
        ("s_log_cluster_size", "I"),
        ("s_blocks_per_group", "I"),
        ("s_clusters_per_group", "I"),
        ("s_inodes_per_group", "I"),
        ("s_mtime", "I"),
        ("s_wtime", "I"),
        ("s_mnt_count", "H"),
        ("s_max_mnt_count", "H"),
        ("s_magic", "H"),
        ("s_state", "H"),
        ("s_errors", "H"),
        ("s_minor_rev_level", "H"),
        ("s_lastcheck", "I"),
        ("s_checkinterval", "I"),
        ("s_creator_os", "I"),
        ("s_rev_level", "I"),
        ("s_def_resuid", "H"),
        ("s_def_resgid", "H"),
        ("s_first_ino", "I"),
        ("s_inode_size", "H"),
        ("s_block_group_nr", "H"),
        ("s_feature_compat", "I"),
        ("s_feature_incompat", "I"),
        ("s_feature_ro_compat", "I"),
        ("s_uuid", "16s"),
        ("s_volume_name", "16s"),
        ("s_last_mounted", "64s"),
        ("s_algorithm_usage_bitmap", "I"),
        ("s_prealloc_blocks", "B"),
        ("s_prealloc_dir_blocks", "B"),
        ("s_reserved_gdt_blocks", "H"),
        ("s_journal_uuid", "16s"),
        ("s_journal_inum", "I"),
        ("s_journal_dev", "I"),
        ("s_last_orphan", "I"),
        ("s_hash_seed", "16s"),
        ("s_def_hash_version", "B"),
        ("s_jnl_backup_type", "B"),
        ("s_desc_size", "H"),
        ("s_default_mount_opts", "I"),
        ("s_first_meta_bg", "I"),
        ("s_mkfs_time", "I"),
        ("s_jnl_blocks", "68s"),
        ("s_blocks_count_hi", "I"),
        ("s_r_blocks_count_hi", "I"),
        ("s_free_blocks_count_hi", "I"),
        ("s_min_extra_isize", "H"),
        ("s_want_extra_isize", "H"),
        ("s_flags", "I"),
        ("s_raid_stride", "H"),
        ("s_mmp_update_interval", "H"),
        ("s_mmp_block", "Q"),
        ("s_raid_stripe_width", "I"),
        ("s_log_groups_per_flex", "B"),
        ("s_checksum_type", "B"),
        ("s_encryption_level", "B"),
        ("s_reserved_pad", "B"),
        ("s_kbytes_written", "Q"),
        ("s_snapshot_inum", "I"),
        ("s_snapshot_id", "I"),
        ("s_snapshot_r_blocks_count", "Q"),
        ("s_snapshot_list", "I"),
        ("s_error_count", "I"),
        ("s_first_error_time", "I"),
        ("s_first_error_ino", "I"),
        ("s_first_error_block", "Q"),
        ("s_first_error_func", "32s"),
        ("s_first_error_line", "I"),
        ("s_last_error_time", "I"),
        ("s_last_error_ino", "I"),
        ("s_last_error_line", "I"),
        ("s_last_error_block", "Q"),
        ("s_last_error_func", "32s"),
        ("s_mount_opts", "64s"),
        ("s_usr_quota_inum", "I"),
        ("s_grp_quota_inum", "I"),
        ("s_overhead_clusters", "I"),
        ("s_backup_bgs_0", "I"),
        ("s_backup_bgs_1", "I"),
        ("s_encrypt_algos", "4s"),
        ("s_encrypt_pw_salt", "16s"),
        ("s_lpf_ino", "I"),
        ("s_prj_quota_inum", "I"),
        ("s_checksum_seed", "I"),
    ],
    size=1024,
)


@dataclass(frozen=True, slots=True)
class SuperblockParams:
    inodes_count: int
    blocks_count: int
    free_blocks_count: int
    free_inodes_count: int
    blocks_per_group: int
    inodes_per_group: int
    log_block_size: int  # block size = 1024 << log_block_size
    inode_size: int
    first_ino: int
    desc_size: int
    log_groups_per_flex: int
    uuid: bytes
    volume_name: bytes
    hash_seed: bytes
    extra_isize: int
    journal_inum: int = 0  # EXT4_JOURNAL_INO with a journal (has_journal), else 0
    jnl_blocks: bytes = b""  # s_jnl_blocks: the journal inode's i_block, i_size_high, i_size_lo


def encode_superblock(p: SuperblockParams) -> bytes:
    """The 1024-byte superblock; no reserved blocks (free space is for the unprivileged postgres user)."""
    return SUPER_BLOCK.pack(
        s_inodes_count=p.inodes_count,
        s_blocks_count_lo=p.blocks_count & 0xFFFFFFFF,
        s_blocks_count_hi=p.blocks_count >> 32,
        s_free_blocks_count_lo=p.free_blocks_count & 0xFFFFFFFF,
        s_free_blocks_count_hi=p.free_blocks_count >> 32,
        s_free_inodes_count=p.free_inodes_count,
        s_first_data_block=1 if p.log_block_size == 0 else 0,
        s_log_block_size=p.log_block_size,
        s_log_cluster_size=p.log_block_size,
        s_blocks_per_group=p.blocks_per_group,
        s_clusters_per_group=p.blocks_per_group,
        s_inodes_per_group=p.inodes_per_group,
        s_max_mnt_count=0xFFFF,  # -1: no mount-count-triggered checks
        s_magic=EXT4_SUPER_MAGIC,
        s_state=EXT4_VALID_FS,
        s_errors=EXT4_ERRORS_CONTINUE,
        s_creator_os=EXT4_OS_LINUX,
        s_rev_level=EXT4_DYNAMIC_REV,
        s_first_ino=p.first_ino,
        s_inode_size=p.inode_size,
        s_feature_compat=FEATURE_COMPAT | (EXT4_FEATURE_COMPAT_HAS_JOURNAL if p.journal_inum else 0),
        s_feature_incompat=FEATURE_INCOMPAT,
        s_feature_ro_compat=FEATURE_RO_COMPAT,
        s_uuid=p.uuid,
        s_volume_name=p.volume_name,
        s_hash_seed=p.hash_seed,
        s_def_hash_version=DX_HASH_HALF_MD4,
        s_desc_size=p.desc_size,
        s_min_extra_isize=p.extra_isize,
        s_want_extra_isize=p.extra_isize,
        s_flags=EXT2_FLAGS_SIGNED_HASH,
        s_log_groups_per_flex=p.log_groups_per_flex,
        s_journal_inum=p.journal_inum,
        s_jnl_blocks=p.jnl_blocks,
        s_jnl_backup_type=EXT3_JNL_BACKUP_BLOCKS if p.journal_inum else 0,
        # s_backup_bgs = {0, 0}: sparse_super2 with no backup superblock at all.
    )
