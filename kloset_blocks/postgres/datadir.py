# A snapshot's data directory on the mounted overlay, made ready for a server start: who owns it
# (Postgres refuses a data directory it does not own), that its ancestors can be traversed, and the
# stale files a start must not see. Every change lands in the overlay, never in the store.
from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from kloset_blocks.errors import PgError
from kloset_blocks.host.progress import Progress
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
    backup of a live data directory has one. standby.signal (pg_basebackup -R) would keep the server
    in recovery forever, waiting for a primary."""
    for name in ("postmaster.pid", "standby.signal"):
        f = datadir / name
        if f.exists():
            f.unlink()
            progress.say(f"removed {name} from the overlay")
