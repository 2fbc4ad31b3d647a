# Store commands: `snapshots`, `ls`, `cat`, `restore`. Thin shells over kloset_blocks.store.
#
# - Secrets: `--passphrase-file FILE`, else $PLAKAR_PASSPHRASE, else a prompt on a terminal;
#   never a passphrase in argv.
# - SNAP[:PATH]: an id prefix ("" or "latest" = newest) and an optional path; an argument that
#   starts with "/" is a path in the newest snapshot; a relative path is joined to the importer's
#   directory (plakar's locate rules, §8.1).
# - cat and restore stream chunk by chunk: memory never holds a whole file.
# - restore never follows a symlink it created: files are opened O_NOFOLLOW|O_EXCL, attributes
#   are set without following links, and directory modes/mtimes are applied last, deepest first.
# - restore goes on past damage: each file is written under a temporary name in its directory and
#   renamed to its own only when whole, so a file under its real name is always complete; a file
#   that cannot be read (or whose entry cannot: store/snapshot.py's placeholders) is left out, a
#   directory whose entry cannot be read is made 0700 with its readable contents, and every
#   damaged path is listed at the end with exit status 1.
from __future__ import annotations

import argparse
import contextlib
import errno
import os
import posixpath
import stat
import sys
import time
from concurrent.futures import Future

from kloset_blocks.app.check import open_checked_store
from kloset_blocks.errors import KlosetError, NotFound, UsageError
from kloset_blocks.names import escape_name
from kloset_blocks.pgmanifest import read_manifest
from kloset_blocks.store import Entry, Snapshot, Store
from kloset_blocks.store.snapshot import SnapshotFile, clean_path
from kloset_blocks.units import format_size


def register(subparsers: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--passphrase-file",
        metavar="FILE",
        help="read the store passphrase from FILE (else PLAKAR_PASSPHRASE)",
    )
    p = subparsers.add_parser("snapshots", parents=[common], help="list the snapshots of a store")
    p.add_argument("store", help="store location: fs:/path or /path")
    p.set_defaults(handler=cmd_snapshots)

    p = subparsers.add_parser("ls", parents=[common], help="list a directory of a snapshot")
    p.add_argument("store")
    p.add_argument("target", metavar="SNAP[:PATH]")
    p.add_argument("-l", dest="long", action="store_true", help="long listing (mode, owner, size, mtime)")
    p.set_defaults(handler=cmd_ls)

    p = subparsers.add_parser("cat", parents=[common], help="write a file of a snapshot to stdout")
    p.add_argument("store")
    p.add_argument("target", metavar="SNAP:PATH")
    p.set_defaults(handler=cmd_cat)

    p = subparsers.add_parser("restore", parents=[common], help="restore a snapshot (or a subtree) to DIR")
    p.add_argument("store")
    p.add_argument("target", metavar="SNAP[:PATH]")
    p.add_argument("dest", metavar="DIR")
    p.set_defaults(handler=cmd_restore)


# ---------------------------------------------------------------- helpers


def _open(args: argparse.Namespace) -> Store:
    return open_checked_store(args.store, args.passphrase_file)


def split_target(target: str) -> tuple[str, str | None]:
    """SNAP[:PATH] -> (prefix, path or None)."""
    if target.startswith("/"):
        return "", target
    prefix, sep, path = target.partition(":")
    return prefix, (path if sep else None)


def _resolve(store: Store, target: str) -> tuple[Snapshot, bytes]:
    prefix, path = split_target(target)
    snap = store.open_snapshot(prefix)
    if not path:
        return snap, b"/"
    raw = path.encode("utf-8", "surrogateescape")
    if not raw.startswith(b"/"):
        raw = posixpath.join(snap.info.importer_directory.encode("utf-8", "surrogateescape") or b"/", raw)
    return snap, clean_path(raw)


def _s(path: bytes | str) -> str:
    # Names from a snapshot are data: quoted as GNU ls quotes them on a terminal, so no control
    # character (newline, escape sequence) reaches the terminal raw.
    return escape_name(path)


def _out(line: str) -> None:
    sys.stdout.buffer.write(line.encode("utf-8", "surrogateescape") + b"\n")


def _err(line: str) -> None:
    sys.stdout.flush()
    sys.stderr.buffer.write(b"kloset-blocks: " + line.encode("utf-8", "surrogateescape") + b"\n")
    sys.stderr.flush()


# ---------------------------------------------------------------- snapshots


def cmd_snapshots(args: argparse.Namespace) -> int:
    with _open(args) as store:
        for info in store.snapshots():
            when = info.timestamp.strftime("%Y-%m-%dT%H:%M:%SZ")
            source = _s(f"{info.importer_type}:{info.importer_origin}:{info.importer_directory}")
            line = f"{info.short_id}  {when}  {_s(info.name)}  {format_size(info.size)}  {source}"
            try:
                manifest = read_manifest(store.open_snapshot(info.hex_id))  # plakar's postgres+bin
            except KlosetError:
                manifest = None  # a damaged snapshot is still listed; reading it will say what is wrong
            if manifest is not None:
                line += "  " + manifest.summary(quote=_s)  # its names are data too
            _out(line)
        problems = store.problems()
    for line in problems:
        _err(line)
    return 1 if problems else 0


# ---------------------------------------------------------------- ls


def _long(name: bytes, e: Entry) -> str:
    owner = _s(e.username) if e.username else str(e.uid)
    group = _s(e.groupname) if e.groupname else str(e.gid)
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(e.mtime_ns // 1_000_000_000))
    line = f"{stat.filemode(e.st_mode)} {owner:>8} {group:>8} {e.size:>12} {when} {_s(name)}"
    if e.is_symlink and e.symlink_target is not None:
        line += f" -> {_s(e.symlink_target)}"
    return line


def cmd_ls(args: argparse.Namespace) -> int:
    with _open(args) as store:
        snap, path = _resolve(store, args.target)
        entry = snap.lookup(path)
        listing = snap.listdir(path) if entry.is_dir else [(entry.name, entry)]
        for name, e in listing:
            _out(_long(name, e) if args.long else _s(name))
    damaged = [e for _, e in listing if e.damage]
    for e in damaged:
        _err(f"{_s(e.path)}: entry cannot be read: {e.damage}")
    return 1 if damaged else 0


# ---------------------------------------------------------------- cat


def cmd_cat(args: argparse.Namespace) -> int:
    with _open(args) as store:
        snap, path = _resolve(store, args.target)
        f = snap.open_file(path)
        out = sys.stdout.buffer
        for piece in f.iter_read(readahead=2):
            out.write(piece)
        out.flush()
    return 0


# ---------------------------------------------------------------- restore


SMALL_FILE = 2 << 20


class _Ahead:
    """Small files read ahead of the restore, whole, `window` at a time on the store's workers (for
    a remote store: otherwise each file would wait its own round trips, one after another). Files
    are taken in the order given; memory is bounded by window x SMALL_FILE."""

    def __init__(self, snap: Snapshot, files: list[Entry]) -> None:
        self.snap = snap
        self.window = snap.store.backend.parallelism if snap.store.remote else 2
        self.files = files if snap.store.remote else []
        self.next = 0
        self.pending: dict[int, Future[list[bytes]]] = {}
        self._fill()

    def _read(self, entry: Entry) -> list[bytes]:
        return list(SnapshotFile(self.snap, entry).iter_read())

    def _fill(self) -> None:
        while self.next < len(self.files) and len(self.pending) < self.window:
            entry = self.files[self.next]
            self.pending[id(entry)] = self.snap.store.executor.submit(self._read, entry)
            self.next += 1

    def take(self, entry: Entry) -> list[bytes] | None:
        future = self.pending.pop(id(entry), None)
        if future is None:
            return None
        self._fill()
        return future.result()

    def close(self) -> None:
        for future in self.pending.values():
            future.cancel()


class Restorer:
    def __init__(self, snap: Snapshot, root: bytes, dest: str) -> None:
        self.snap = snap
        self.root = root
        self.base = root
        self.dest = os.fsencode(os.path.abspath(dest))
        self.is_root = os.geteuid() == 0
        self.dirs: list[tuple[bytes, Entry]] = []
        self.made: set[bytes] = set()  # snapshot paths of directories this run created
        self.files: dict[bytes, bytes] = {}  # snapshot path -> restored path of regular files
        self.damaged: list[tuple[bytes, str]] = []  # (snapshot path, why) left out or incomplete
        self._tmp = 0
        self.ahead = _Ahead(snap, [])

    def local(self, path: bytes) -> bytes:
        if path == self.base:
            return self.dest
        prefix = b"/" if self.base == b"/" else self.base + b"/"
        return os.path.join(self.dest, path[len(prefix) :])

    def run(self) -> int:
        """Restore; returns the number of paths written."""
        top = self.snap.lookup(self.root)
        if not top.is_dir:  # a single file goes into DIR under its own name
            self.base = posixpath.dirname(top.path)
            os.makedirs(self.dest, exist_ok=True)
            self.made.add(self.base)
            self._one(top.path, top)
            return 0 if self.damaged else 1
        self.base = top.path
        count = 0
        links: list[tuple[bytes, Entry]] = []
        entries = list(self.snap.walk(self.root))
        small = [e for _, e in entries if e.is_reg and e.size <= SMALL_FILE]
        self.ahead = _Ahead(self.snap, [e for e in small if self.snap.hardlink_target(e) is None])
        try:
            for path, entry in entries:
                if self.snap.hardlink_target(entry) is not None:
                    links.append((path, entry))  # after every file: the target may come later
                    continue
                self._one(path, entry)
                count += 1
        finally:
            self.ahead.close()
        for path, entry in links:
            self._one(path, entry)
            count += 1
        for path, entry in sorted(self.dirs, key=lambda d: d[0].count(b"/"), reverse=True):
            self._attrs(self.local(path), entry)
        return count - sum(1 for path, _ in self.damaged if path not in self.made)

    def _one(self, path: bytes, e: Entry) -> None:
        if b"\0" in path or (e.symlink_target is not None and b"\0" in e.symlink_target):
            raise KlosetError(f"restore: {_s(path)} holds a NUL byte: no file system can hold that name")
        parent = posixpath.dirname(path)
        if path != self.base and parent not in self.made:
            raise KlosetError(f"restore: parent of {_s(path)} was not restored as a directory")
        dst = self.local(path)
        if e.is_dir:
            try:
                os.mkdir(dst, 0o700)
            except FileExistsError:
                if path != self.base or os.path.islink(dst) or not os.path.isdir(dst):
                    raise KlosetError(f"restore: {_s(dst)} already exists") from None
            self.made.add(path)
            if e.damage:  # its contents are restored; its own mode, owner and times are lost
                self.damaged.append((path, f"directory entry cannot be read: {e.damage}"))
            else:
                self.dirs.append((path, e))
            return
        if e.damage:
            self.damaged.append((path, f"entry cannot be read: {e.damage}"))
            return
        target = self.snap.hardlink_target(e)
        if target is not None and target.path in self.files:
            os.link(self.files[target.path], dst, follow_symlinks=False)
            return
        if target is not None:  # link to a file outside the restored subtree: copy its content
            if not self._file(dst, target, e):
                return
        elif e.is_reg:
            if not self._file(dst, e, e):
                return
            self.files[path] = dst
        elif e.is_symlink:
            os.symlink(e.symlink_target or b"", dst)
        elif stat.S_ISFIFO(e.st_mode):
            os.mkfifo(dst, 0o600)
        else:  # devices and sockets: the store does not record rdev (§10.2), so 0
            try:
                os.mknod(dst, stat.S_IFMT(e.st_mode) | 0o600, 0)
            except PermissionError:
                print(
                    f"kloset-blocks: restore: skipped {_s(path)}: cannot create device node", file=sys.stderr
                )
                return
        self._attrs(dst, e)

    def _file(self, dst: bytes, content: Entry, meta: Entry) -> bool:
        """Write `content` to `dst` through a temporary name; False (and the path listed as
        damaged) when the store cannot give all of its bytes."""
        if os.path.lexists(dst):  # as O_EXCL on the real name would say
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
        self._tmp += 1
        tmp = os.path.join(os.path.dirname(dst), b".kloset-restore-%d-%d.tmp" % (os.getpid(), self._tmp))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        whole = False
        try:
            f = SnapshotFile(self.snap, content)
            pieces = self.ahead.take(content) if content is meta else None
            for piece in pieces if pieces is not None else f.iter_read(readahead=self.ahead.window):
                view = memoryview(piece)
                while view:
                    view = view[os.write(fd, view) :]
            whole = True
        except KlosetError as err:
            self.damaged.append((meta.path, str(err)))
        finally:
            os.close(fd)
            if not whole:
                os.unlink(tmp)
        if whole:
            os.rename(tmp, dst)
        return whole

    def _attrs(self, dst: bytes, e: Entry) -> None:
        if self.is_root:
            os.chown(dst, e.uid, e.gid, follow_symlinks=False)
        if not e.is_symlink:
            # After chown, which clears setuid/setgid.
            os.chmod(dst, stat.S_IMODE(e.st_mode))
        with contextlib.suppress(NotImplementedError):
            os.utime(dst, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)


def cmd_restore(args: argparse.Namespace) -> int:
    with _open(args) as store:
        snap, path = _resolve(store, args.target)
        try:
            restorer = Restorer(snap, path, args.dest)
            count = restorer.run()
        except NotFound:
            raise
        except OSError as e:
            where = f" {os.fsdecode(e.filename)}" if e.filename else ""
            raise KlosetError(
                f"restore failed:{where}: {e.strerror or errno.errorcode.get(e.errno, e)}"
            ) from None
        restorer_damaged = restorer.damaged
    print(f"restored {count} paths from snapshot {snap.info.short_id} to {args.dest}", file=sys.stderr)
    if restorer_damaged:
        n = len(restorer_damaged)
        _err(f"restore: {n} damaged paths (files left out, directories without their attributes):")
        for path, why in restorer_damaged:
            _err(f"damaged: {_s(path)}: {why}")
    return 1 if restorer_damaged else 0


__all__ = ["Restorer", "UsageError", "register", "split_target"]
