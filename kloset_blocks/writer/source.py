# Importers for the test-fixture writer: a local directory ("fs") or a tar stream ("tar"),
# yielding one Item per path with Kloset's FileInfo fields.
#
# Strategy: both importers are generators that yield an Item whose `content` stream is valid
# only until the next item is requested, so a tar read from a pipe is consumed member by member
# and no file is ever held in memory (the writer chunks `content` before advancing).
#
# Semantics copied from the Go importers the fixtures were made with (format §10.3, §17):
# - tar (integrations tar v1.1.0): path = path.Join("/", name); file_info.name =
#   path.Base(name) (so a "./" member is the root entry named "."); mode = hdr.Mode cast to
#   fs.FileMode (setuid/setgid/sticky stay in the low bits, §17.5) | a type flag:
#   dir -> ModeDir, fifo -> ModeNamedPipe, char -> ModeCharDevice, block -> ModeDevice.
#   A symlink member stays a *regular* file with symlink_target and empty content (§17.3); a
#   hard link becomes ModeSymlink with the archive-relative link name as target and no content
#   (§17.4). uid/gid/uname/gname from the header, nlink 1, dev 0, ino 0.
# - fs: lstat of every path under the source directory, which becomes "/"; Go fs.FileMode
#   (type flags and ModeSetuid/ModeSetgid/ModeSticky, perm & 0o777); symlinks carry their
#   target; owner names from the passwd and group databases when known.
from __future__ import annotations

import grp
import os
import pwd
import stat
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import BinaryIO

from kloset_blocks.errors import KlosetError, UsageError
from kloset_blocks.store.gomode import (
    MODE_CHAR_DEVICE,
    MODE_DEVICE,
    MODE_DIR,
    MODE_NAMED_PIPE,
    MODE_SYMLINK,
    st_mode_to_go_mode,
)


@dataclass(slots=True)
class Item:
    path: bytes  # absolute, cleaned like Go's path.Join
    name: bytes  # file_info.name
    mode: int  # Go fs.FileMode
    size: int
    mtime_ns: int
    uid: int = 0
    gid: int = 0
    username: bytes = b""
    groupname: bytes = b""
    nlink: int = 1
    dev: int = 0
    ino: int = 0
    symlink_target: bytes | None = None
    content: BinaryIO | None = None  # chunked into an object when not None

    @property
    def is_dir(self) -> bool:
        return bool(self.mode & MODE_DIR)


def clean(path: bytes) -> bytes:
    """Go's path.Join("/", path): absolute, no "", "." or ".." components, no trailing "/"."""
    parts: list[bytes] = []
    for part in path.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    return b"/" + b"/".join(parts)


def go_base(name: bytes) -> bytes:
    """Go's path.Base."""
    stripped = name.rstrip(b"/")
    if not stripped:
        return b"/" if name else b"."
    return stripped.rsplit(b"/", 1)[-1]


def _ns(mtime: float | int) -> int:
    if isinstance(mtime, int):
        return mtime * 1_000_000_000
    return round(mtime * 1_000_000_000)


def _b(text: str | None) -> bytes:
    return (text or "").encode("utf-8", "surrogateescape")


# ---------------------------------------------------------------- tar


def _tar_mode(member: tarfile.TarInfo) -> int:
    mode = member.mode & 0o7777
    if member.isdir():
        mode |= MODE_DIR
    elif member.islnk():
        mode |= MODE_SYMLINK
    elif member.isfifo():
        mode |= MODE_NAMED_PIPE
    elif member.ischr():
        mode |= MODE_CHAR_DEVICE
    elif member.isblk():
        mode |= MODE_DEVICE
    return mode


class _Empty:
    def read(self, n: int = -1) -> bytes:
        return b""


def iter_tar(fileobj: BinaryIO) -> Iterator[Item]:
    """Members of a (possibly compressed) tar stream, read sequentially."""
    try:
        # closed by the `with tar` below, which must come after the error translation
        tar = tarfile.open(fileobj=fileobj, mode="r|*", encoding="utf-8", errors="surrogateescape")  # noqa: SIM115
    except (tarfile.TarError, OSError) as e:
        raise KlosetError(f"cannot read the tar stream: {e}") from None
    with tar:
        try:
            for member in tar:
                raw = _b(member.name)
                item = Item(
                    path=clean(raw),
                    name=go_base(raw),
                    mode=_tar_mode(member),
                    size=member.size if member.isreg() else 0,
                    mtime_ns=_ns(member.mtime),
                    uid=member.uid,
                    gid=member.gid,
                    username=_b(member.uname),
                    groupname=_b(member.gname),
                )
                if member.issym():
                    item.symlink_target = _b(member.linkname)
                    item.content = _Empty()  # type: ignore[assignment]
                elif member.islnk():
                    item.symlink_target = _b(member.linkname)
                elif member.isreg():
                    item.content = tar.extractfile(member)
                yield item
        except (tarfile.TarError, EOFError, OSError) as e:
            raise KlosetError(f"tar stream is damaged or truncated: {e}") from None


# ---------------------------------------------------------------- local directory


@cache
def _username(uid: int) -> bytes:
    try:
        return _b(pwd.getpwuid(uid).pw_name)
    except KeyError:
        return b""


@cache
def _groupname(gid: int) -> bytes:
    try:
        return _b(grp.getgrgid(gid).gr_name)
    except KeyError:
        return b""


def _dir_item(path: bytes, name: bytes, st: os.stat_result) -> Item:
    return Item(
        path=path,
        name=name,
        mode=st_mode_to_go_mode(st.st_mode),
        size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        uid=st.st_uid,
        gid=st.st_gid,
        username=_username(st.st_uid),
        groupname=_groupname(st.st_gid),
        nlink=st.st_nlink,
        dev=st.st_dev,
        ino=st.st_ino,
    )


def iter_directory(root: Path | str) -> Iterator[Item]:
    """Every path under `root` (root itself as "/"), depth first, names sorted."""
    base = os.fsencode(os.fspath(root))
    try:
        st = os.lstat(base)
    except OSError as e:
        raise UsageError(f"cannot read source directory {os.fsdecode(base)}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"source {os.fsdecode(base)} is not a directory")
    yield _dir_item(b"/", b"/", st)
    stack = [(base, b"")]
    while stack:
        full_dir, rel_dir = stack.pop()
        try:
            names = sorted(os.listdir(full_dir))
        except OSError as e:
            raise KlosetError(f"cannot list {os.fsdecode(full_dir)}: {e.strerror}") from None
        subdirs = []
        for name in names:
            full = full_dir + b"/" + name
            rel = rel_dir + b"/" + name
            st = os.lstat(full)
            item = _dir_item(rel, name, st)
            if stat.S_ISLNK(st.st_mode):
                item.symlink_target = os.readlink(full)
                yield item
            elif stat.S_ISREG(st.st_mode):
                try:
                    with open(full, "rb") as f:
                        item.content = f
                        yield item
                except OSError as e:
                    raise KlosetError(f"cannot read {os.fsdecode(full)}: {e.strerror}") from None
            else:
                yield item
                if stat.S_ISDIR(st.st_mode):
                    subdirs.append((full, rel))
        stack.extend(reversed(subdirs))


def open_source(source: object) -> tuple[str, Iterator[Item]]:
    """(importer type, items) for a directory path, a tar file path, "-" (stdin) or a binary
    file object holding a tar stream."""
    if hasattr(source, "read"):
        return "tar", iter_tar(source)  # type: ignore[arg-type]
    if source == "-":
        return "tar", iter_tar(sys.stdin.buffer)
    path = Path(os.fsdecode(os.fspath(source)))  # type: ignore[arg-type]
    if path.is_dir():
        return "fs", iter_directory(path)
    if not path.exists():
        raise UsageError(f"source {path} does not exist")
    return "tar", _iter_tar_file(path)


def _iter_tar_file(path: Path) -> Iterator[Item]:
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the with below, inside the generator
    except OSError as e:
        raise UsageError(f"cannot open tar file {path}: {e.strerror}") from None
    with f:
        yield from iter_tar(f)
