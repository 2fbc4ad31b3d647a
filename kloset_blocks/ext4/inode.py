# Inodes (inodes.rst): 256 bytes each, i_extra_isize = 32 so nanosecond times and crtime fit.
# Times use the kernel's extra scheme, the low 32 bits of seconds in the base field (read back as
# signed), and in *_extra (nsec << 2) | epoch, epoch = (seconds - (int32)low) >> 32 & 3, valid for
# 1901..2446. uid/gid above 65535 go to the osd2 high halves; i_blocks counts 512-byte sectors
# (huge_file without EXT4_HUGE_FILE_FL), its high 16 bits in l_i_blocks_high.
from __future__ import annotations

import stat

from kloset_blocks.ext4._struct import CStruct

EXT4_INODE_SIZE = 256
EXT4_GOOD_OLD_INODE_SIZE = 128
EXT4_EXTRA_ISIZE = 32
EXT4_N_BLOCKS_BYTES = 60

EXT4_EXTENTS_FL = 0x80000
EXT4_INDEX_FL = 0x1000

# Reserved inode numbers (special_inodes.rst).
EXT4_BAD_INO = 1
EXT4_ROOT_INO = 2
EXT4_GOOD_OLD_FIRST_INO = 11

INODE = CStruct(
    "ext4_inode",
    [
        ("i_mode", "H"),
        ("i_uid", "H"),
        ("i_size_lo", "I"),
        ("i_atime", "I"),
        ("i_ctime", "I"),
        ("i_mtime", "I"),
        ("i_dtime", "I"),
        ("i_gid", "H"),
        ("i_links_count", "H"),
        ("i_blocks_lo", "I"),
        ("i_flags", "I"),
        ("l_i_version", "I"),
        ("i_block", "60s"),
        ("i_generation", "I"),
        ("i_file_acl_lo", "I"),
        ("i_size_high", "I"),
        ("i_obso_faddr", "I"),
        ("l_i_blocks_high", "H"),
        ("l_i_file_acl_high", "H"),
        ("l_i_uid_high", "H"),
        ("l_i_gid_high", "H"),
        ("l_i_checksum_lo", "H"),
        ("l_i_reserved", "H"),
        ("i_extra_isize", "H"),
        ("i_checksum_hi", "H"),
        ("i_ctime_extra", "I"),
        ("i_mtime_extra", "I"),
        ("i_atime_extra", "I"),
        ("i_crtime", "I"),
        ("i_crtime_extra", "I"),
        ("i_version_hi", "I"),
        ("i_projid", "I"),
    ],
    size=EXT4_INODE_SIZE,
)
assert INODE.offsets["i_extra_isize"] == EXT4_GOOD_OLD_INODE_SIZE
assert INODE.offsets["i_projid"] + 4 == EXT4_GOOD_OLD_INODE_SIZE + EXT4_EXTRA_ISIZE

# Time range representable with 2 epoch bits: [-2**31, 2**34 - 2**31).
_TIME_MIN = -(2**31)
_TIME_MAX = 2**34 - 2**31 - 1


def encode_time(mtime_ns: int) -> tuple[int, int]:
    """(base 32-bit field, *_extra field) for a time in ns since the epoch, clamped to ext4's range."""
    sec, nsec = divmod(mtime_ns, 1_000_000_000)
    if sec < _TIME_MIN:
        sec, nsec = _TIME_MIN, 0
    elif sec > _TIME_MAX:
        sec, nsec = _TIME_MAX, 999_999_999
    lo = sec & 0xFFFFFFFF
    signed_lo = lo - (1 << 32) if lo & 0x80000000 else lo
    epoch = ((sec - signed_lo) >> 32) & 3
    return lo, (nsec << 2) | epoch


def encode_rdev(rdev: int) -> bytes:
    """i_block for a device node: old 16-bit encoding in i_block[0] when major and minor fit in a byte,
    else the new 32-bit encoding in i_block[1] (fs/ext4/inode.c, ext4_write_inode / old_valid_dev)."""
    major = ((rdev >> 8) & 0xFFF) | ((rdev >> 32) & ~0xFFF)
    minor = (rdev & 0xFF) | ((rdev >> 12) & ~0xFF)
    if major < 256 and minor < 256:
        words = ((major << 8) | minor, 0)
    else:
        words = (0, (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12))
    return words[0].to_bytes(4, "little") + words[1].to_bytes(4, "little")


def encode_inode(
    buf: bytearray,
    offset: int,
    *,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime_ns: int,
    links_count: int,
    blocks_512: int,
    flags: int,
    i_block: bytes,
) -> None:
    """Write one 256-byte inode at buf[offset:]. atime, ctime and crtime all take mtime (deterministic)."""
    t, t_extra = encode_time(mtime_ns)
    INODE.pack_into(
        buf,
        offset,
        i_mode=mode & 0xFFFF,
        i_uid=uid & 0xFFFF,
        l_i_uid_high=(uid >> 16) & 0xFFFF,
        i_gid=gid & 0xFFFF,
        l_i_gid_high=(gid >> 16) & 0xFFFF,
        i_size_lo=size & 0xFFFFFFFF,
        i_size_high=size >> 32,
        i_atime=t,
        i_ctime=t,
        i_mtime=t,
        i_crtime=t,
        i_atime_extra=t_extra,
        i_ctime_extra=t_extra,
        i_mtime_extra=t_extra,
        i_crtime_extra=t_extra,
        i_links_count=links_count,
        i_blocks_lo=blocks_512 & 0xFFFFFFFF,
        l_i_blocks_high=blocks_512 >> 32,
        i_flags=flags,
        i_block=i_block,
        i_extra_isize=EXT4_EXTRA_ISIZE,
    )


# Directory entry file types (dirent file_type), by S_IFMT.
FT_UNKNOWN = 0
FILE_TYPE = {
    stat.S_IFREG: 1,
    stat.S_IFDIR: 2,
    stat.S_IFCHR: 3,
    stat.S_IFBLK: 4,
    stat.S_IFIFO: 5,
    stat.S_IFSOCK: 6,
    stat.S_IFLNK: 7,
}
