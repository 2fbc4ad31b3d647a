# Go's io/fs.FileMode, as Kloset stores it in every entry (format §10.7, §17.5), and its mapping to
# and from POSIX st_mode. One table for the reader and the fixture writer.
#
# Go keeps the file type and setuid/setgid/sticky in high flag bits; tar's importer leaves tar's own
# 04000/02000/01000 in the low bits, so both are honoured when reading.
from __future__ import annotations

import stat

MODE_DIR = 1 << 31
MODE_SYMLINK = 1 << 27
MODE_DEVICE = 1 << 26
MODE_NAMED_PIPE = 1 << 25
MODE_SOCKET = 1 << 24
MODE_SETUID = 1 << 23
MODE_SETGID = 1 << 22
MODE_CHAR_DEVICE = 1 << 21
MODE_STICKY = 1 << 20
MODE_TYPE = MODE_DIR | MODE_SYMLINK | MODE_DEVICE | MODE_NAMED_PIPE | MODE_SOCKET | MODE_CHAR_DEVICE

_SPECIAL_BITS = ((MODE_SETUID, stat.S_ISUID), (MODE_SETGID, stat.S_ISGID), (MODE_STICKY, stat.S_ISVTX))


def go_mode_to_st_mode(go_mode: int, symlink_target: bytes | None = None) -> int:
    perm = go_mode & 0o7777
    for go_bit, posix_bit in _SPECIAL_BITS:
        if go_mode & go_bit:
            perm |= posix_bit
    if go_mode & MODE_DIR:
        kind = stat.S_IFDIR
    elif go_mode & MODE_SYMLINK:
        kind = stat.S_IFLNK
    elif go_mode & MODE_NAMED_PIPE:
        kind = stat.S_IFIFO
    elif go_mode & MODE_SOCKET:
        kind = stat.S_IFSOCK
    elif go_mode & (MODE_DEVICE | MODE_CHAR_DEVICE):
        kind = stat.S_IFCHR if go_mode & MODE_CHAR_DEVICE else stat.S_IFBLK
    elif symlink_target:
        kind = stat.S_IFLNK  # tar symlinks: regular files carrying a target (§17.3)
    else:
        kind = stat.S_IFREG
    return kind | perm


def st_mode_to_go_mode(st_mode: int) -> int:
    """POSIX st_mode -> Go fs.FileMode, as os.Lstat builds it."""
    mode = st_mode & 0o777
    mode |= {
        stat.S_IFDIR: MODE_DIR,
        stat.S_IFLNK: MODE_SYMLINK,
        stat.S_IFIFO: MODE_NAMED_PIPE,
        stat.S_IFSOCK: MODE_SOCKET,
        stat.S_IFCHR: MODE_DEVICE | MODE_CHAR_DEVICE,
        stat.S_IFBLK: MODE_DEVICE,
    }.get(stat.S_IFMT(st_mode), 0)
    for go_bit, posix_bit in _SPECIAL_BITS:
        if st_mode & posix_bit:
            mode |= go_bit
    return mode
