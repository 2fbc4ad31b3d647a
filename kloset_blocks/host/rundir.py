# Run directories: every chain owns one, <root>/<id>/ (root: /run/kloset-blocks, or
# $KLOSET_BLOCKS_RUN_ROOT). Its state.json records every resource the moment it exists (pids with
# their /proc start times, loop device, mountpoint, socket, overlay, temporary flag, Postgres), so a
# later `kloset-blocks down` in another process can tear down exactly what was started, and nothing
# else.
#
# Invariants:
# - The run directory is 0711: other users may traverse it (the postgres user must reach its own
#   0700 subdirectory and the mount under it) but not list it; everything private inside it lives in
#   0700 subdirectories or 0600 files.
# - state.json is replaced atomically (write + rename), so a reader never sees half a record.
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kloset_blocks.host.procs import proc_starttime

RUN_ROOT_ENV = "KLOSET_BLOCKS_RUN_ROOT"


DEFAULT_RUN_ROOT = Path("/run/kloset-blocks")


STATE_FILE = "state.json"
LOCK_FILE = ".lock"  # held by a teardown (host.teardown) and by a FUSE view releasing its directory


def run_root(root: Path | str | None = None) -> Path:
    return Path(root or os.environ.get(RUN_ROOT_ENV) or DEFAULT_RUN_ROOT)


class RunDir:
    """One chain's private directory and its state record."""

    def __init__(self, path: Path, state: dict[str, Any]) -> None:
        self.path = path
        self.state = state

    @classmethod
    def create(cls, root: Path | str | None = None) -> RunDir:
        base = run_root(root)
        base.mkdir(parents=True, exist_ok=True)
        os.chmod(base, 0o711)
        ident = time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
        path = base / ident
        path.mkdir(mode=0o711)
        os.chmod(path, 0o711)  # mkdir's mode is filtered by the umask
        me = os.getpid()
        # The owner, with its start time (pids are reused): app/warden.py tears down a dead owner's.
        owner = {"owner_pid": me, "owner_starttime": proc_starttime(me) or 0}
        run = cls(path, {"id": ident, "created": time.time(), **owner})
        run.save()
        return run

    @classmethod
    def load(cls, path: Path) -> RunDir:
        try:
            state = json.loads((path / STATE_FILE).read_text())
        except (OSError, ValueError):
            state = {"id": path.name}
        return cls(path, state)

    @property
    def id(self) -> str:
        return str(self.state.get("id", self.path.name))

    def private_dir(self, name: str, uid: int = 0, gid: int = 0) -> Path:
        """A 0700 subdirectory owned by uid:gid (e.g. the postgres user's socket and log directory)."""
        d = self.path / name
        d.mkdir(mode=0o700, exist_ok=True)
        os.chown(d, uid, gid)
        os.chmod(d, 0o700)
        return d

    def record(self, **fields: Any) -> None:
        self.state.update(fields)
        self.save()

    def forget(self, *names: str) -> None:
        for name in names:
            self.state.pop(name, None)
        self.save()

    def save(self) -> None:
        if not self.path.is_dir():
            return
        tmp = self.path / (STATE_FILE + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self.state, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path / STATE_FILE)


def list_run_dirs(root: Path | str | None = None) -> list[Path]:
    base = run_root(root)
    if not base.is_dir():
        return []
    return sorted(p for p in base.iterdir() if p.is_dir() and not p.is_symlink())


@contextlib.contextmanager
def locked(lock_file: Path, *, wait: bool = True) -> Iterator[bool]:
    """An exclusive flock on lock_file (created 0600) while inside; yields whether it was taken
    (False: without `wait`, someone else holds it; or the file cannot be made: the directory is
    gone). One teardown at a time per run directory: its owner and a `down` may race."""
    try:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
