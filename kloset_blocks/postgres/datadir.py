# A snapshot's data directory on the mounted overlay, made ready for a server start: who owns it
# (Postgres refuses a data directory it does not own), that its ancestors can be traversed, and the
# stale files a start must not see. Every change lands in the overlay, never in the store.
#
# A backup is untrusted input (confine): the server must not reach outside the snapshot through
# it. A symlink whose target leaves the data directory (an absolute target always does: it names a
# host path; pg_tblspc/OID -> /etc, pg_wal -> /var/lib/...) is replaced: in pg_tblspc by a link to
# an empty directory of ours inside the data directory (Postgres 15 refuses anything but a link
# there), for a directory the server expects by an empty directory, else removed; tablespace_map
# (from which Postgres would make such links itself) is emptied, each tablespace it named getting
# such a link; device nodes, FIFOs and
# sockets are removed (a FIFO named like a WAL segment would hang the start); a file or directory
# its owner cannot read (mode 0000) gets the owner's bits back.
from __future__ import annotations

import os
import posixpath
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from kloset_blocks.errors import PgError
from kloset_blocks.host.progress import Progress
from kloset_blocks.names import escape_name
from kloset_blocks.pgdata import find_data_dir, read_major
from kloset_blocks.postgres.binaries import server_bindir

PG_USER = "postgres"


@dataclass(frozen=True)
class Cluster:
    datadir: Path
    major: str
    bindir: Path


def locate(root: Path) -> Cluster:
    datadir = find_data_dir(root)
    major = read_major(datadir)
    return Cluster(datadir, major, server_bindir(major))


def pg_ids() -> tuple[int, int]:
    try:
        pw = pwd.getpwnam(PG_USER)
    except KeyError as e:
        raise PgError(f"no local user {PG_USER!r}: apt-get install postgresql") from e
    return pw.pw_uid, pw.pw_gid


def fix_ownership(datadir: Path, uid: int, gid: int) -> int:
    """Make every inode under datadir owned by uid:gid and the root 0700 (or keep 0750), as the
    server insists. A metadata walk only; changes land in the overlay. Returns how many changed.
    Ideally the image already has this owner (the plugin's owner= remap) and nothing changes."""
    changed = 0
    st = datadir.lstat()
    if (st.st_uid, st.st_gid) != (uid, gid):
        os.lchown(datadir, uid, gid)
        changed += 1
    if st.st_mode & 0o7777 not in (0o700, 0o750):
        os.chmod(datadir, 0o700)
        changed += 1
    for dirpath, dirnames, filenames in os.walk(datadir):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            s = os.lstat(p)
            if (s.st_uid, s.st_gid) != (uid, gid):
                os.lchown(p, uid, gid)
                changed += 1
    return changed


def ensure_traversable(mount_root: Path, datadir: Path, uid: int) -> None:
    """The server must be able to reach its data directory: give o+x to the ancestors that lack it."""
    p = datadir.parent
    while True:
        st = p.stat()
        if st.st_uid != uid and not st.st_mode & 0o001:
            os.chmod(p, (st.st_mode & 0o7777) | 0o001)
        if p == mount_root or p == p.parent:
            break
        p = p.parent


def prepare_datadir(datadir: Path, progress: Progress) -> None:
    """Stale files a server start must not see. pg_basebackup omits postmaster.pid; a file-level
    backup of a live data directory has one. The snapshot's recovery.signal/standby.signal are not
    ours to obey (Server writes the one it needs)."""
    for name in ("postmaster.pid", "recovery.signal", "standby.signal"):
        f = datadir / name
        if f.is_symlink() or f.exists():
            f.unlink()
            progress.say(f"removed {name} from the overlay")
    for line in confine(datadir):
        progress.say(line)


def confine(datadir: Path) -> list[str]:
    """Make the data directory self-contained (see the top of this module); returns the notices."""
    base = os.fsencode(datadir)
    uid, gid = os.lstat(base).st_uid, os.lstat(base).st_gid
    links: list[bytes] = []
    special: list[bytes] = []
    modes = 0
    for dirpath, dirnames, filenames in os.walk(base):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, base)
            if stat.S_ISLNK(st.st_mode):
                if not _inside(base, dirpath, os.readlink(p)):
                    _replace_link(p, rel, uid, gid)
                    links.append(rel)
            elif stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
                need = 0o700 if stat.S_ISDIR(st.st_mode) else 0o600
                if st.st_mode & need != need:
                    os.chmod(p, (st.st_mode & 0o7777) | need)
                    modes += 1
            else:
                os.unlink(p)
                special.append(rel)
    out = []
    tablespaces = _empty_tablespace_map(base, uid, gid)
    if tablespaces:
        out.append(
            "tablespace_map emptied (its tablespaces are empty directories): " + ", ".join(tablespaces)
        )
    if links:
        out.append("links out of the data directory replaced: " + ", ".join(map(escape_name, links)))
    if special:
        out.append("device, FIFO or socket files removed: " + ", ".join(map(escape_name, special)))
    if modes:
        out.append(f"gave the owner read/write on {modes} file(s) and director(ies) it could not use")
    return out


def _inside(base: bytes, dirpath: bytes, target: bytes) -> bool:
    """A symlink's target stays under base: relative, and never climbing above it."""
    if target.startswith(b"/"):
        return False
    resolved = posixpath.normpath(posixpath.join(dirpath, target))
    return resolved == base or resolved.startswith(base.rstrip(b"/") + b"/")


# Directories the server expects (a link out of the data directory there becomes an empty one).
SERVER_DIRS = {
    b"base", b"global", b"pg_wal", b"pg_wal/archive_status", b"pg_xact", b"pg_stat", b"pg_stat_tmp",
    b"pg_subtrans", b"pg_multixact", b"pg_commit_ts", b"pg_logical", b"pg_replslot", b"pg_snapshots",
    b"pg_serial", b"pg_notify", b"pg_twophase", b"pg_dynshmem",
}  # fmt: skip
EMPTY_TABLESPACES = b"kloset_tablespaces"  # ours, in the data directory, in the overlay


def _replace_link(path: bytes, rel: bytes, uid: int, gid: int) -> None:
    os.unlink(path)
    if rel.startswith(b"pg_tblspc/"):
        _empty_tablespace(path, uid, gid)
    elif rel in SERVER_DIRS:
        os.mkdir(path, 0o700)
        os.lchown(path, uid, gid)


def _empty_tablespace(link: bytes, uid: int, gid: int) -> None:
    """pg_tblspc/OID -> ../kloset_tablespaces/OID, an empty directory: a tablespace whose files are
    not in the snapshot (its tables fail to open; nothing outside is reached)."""
    pg_tblspc, oid = os.path.split(link)
    ours = os.path.join(os.path.dirname(pg_tblspc), EMPTY_TABLESPACES)
    for d in (ours, os.path.join(ours, oid)):
        if not os.path.isdir(d):
            os.mkdir(d, 0o700)
            os.lchown(d, uid, gid)
    os.symlink(b"../" + EMPTY_TABLESPACES + b"/" + oid, link)
    os.lchown(link, uid, gid)


def _empty_tablespace_map(base: bytes, uid: int, gid: int) -> list[str]:
    """Postgres recreates pg_tblspc/OID -> PATH from tablespace_map at a backup's first start: PATH
    is the origin's, a host path here. Each OID becomes an empty directory; the map is emptied."""
    path = os.path.join(base, b"tablespace_map")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return []
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return []
        text = f.read(1 << 20)
    oids = [line.split(b" ", 1)[0] for line in text.splitlines() if line.strip()]
    oids = [o for o in oids if o.isdigit() and len(o) <= 10]
    if not text.strip():
        return []
    for oid in oids:
        link = os.path.join(base, b"pg_tblspc", oid)
        if not os.path.lexists(link):
            _empty_tablespace(link, uid, gid)
    os.truncate(path, 0)
    return [o.decode() for o in oids] or ["(no valid entry)"]
