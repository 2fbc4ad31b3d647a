# The seam between the store reader and where the store's objects live. A Backend reads objects by
# key, keys being the fs layout relative to the store root ("CONFIG", "states/ab/ab...",
# "packfiles/cd/cd..."): the fs, S3 and SFTP layouts are the same (plakar's integrations).
#
# Invariants every backend keeps:
# - Read-only: nothing in it creates, changes or deletes an object (mkstore writes through
#   kloset_blocks/store/upload.py instead).
# - Thread-safe: any number of threads may call read/read_range/list at once (nbdkit PARALLEL,
#   readahead workers); remote backends keep a pool of connections so the requests really overlap.
# - A missing object raises FileNotFoundError (its `filename` is describe(key)); a missing store
#   root (directory, bucket) and every other failure raise StoreError with one line. Remote requests
#   have a deadline and bounded retries with backoff: no call hangs.
# - read_range returns exactly `length` bytes unless the object ends first (then fewer).
#
# The fs backend is today's reader: one O_RDONLY fd per object kept open, os.pread (no shared file
# position, the GIL released during the read).
from __future__ import annotations

import errno
import os
import sys
import threading
from collections.abc import Sequence
from typing import Protocol

from kloset_blocks.errors import StoreError
from kloset_blocks.store.location import StoreLocation


class Backend(Protocol):
    location: StoreLocation
    # How many requests are worth having in flight at once (1-2 for a local disk, dozens remote).
    parallelism: int

    def read(self, key: str) -> bytes:
        """A whole (small) object: CONFIG, a state."""
        ...

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        """`length` bytes at `offset` of an object (fewer only at its end)."""
        ...

    def list(self, prefix: str) -> list[str]:
        """Every key under `prefix` ("states/"), recursively, sorted."""
        ...

    def describe(self, key: str) -> str:
        """The object's name for messages (a path, an s3:// or sftp:// URL)."""
        ...

    def connect_in_background(self, soon: Sequence[str] = ()) -> None:
        """Start what the first request would wait for (SFTP: the SSH handshake, then the opening
        of the files `soon` names, keys likely read soon), in a thread; nothing for the others.
        Never before a C fork(): nbdkit's plugin calls it after the fork, or at get_ready in an
        nbdkit that never forks."""
        ...

    def close(self) -> None: ...


def open_backend(loc: StoreLocation) -> Backend:
    """The backend for a parsed location; remote ones read their options (store/options.py) here.
    S3 checks its credentials' presence here; SFTP connects on the first request (or in the
    background, connect_in_background): a bad credential or an unreachable host fails that request,
    in one line."""
    if loc.scheme == "s3":
        from kloset_blocks.store.backend_s3 import S3Backend

        return S3Backend(loc)
    if loc.scheme == "sftp":
        # paramiko imports invoke (a task runner: 40 ms of each process's start, the plugin's too)
        # only to run ssh_config's `Match exec`, and works without it; no ssh_config is read here.
        sys.modules.setdefault("invoke", None)  # type: ignore[arg-type]
        from kloset_blocks.store.backend_sftp import SftpBackend

        return SftpBackend(loc)
    return FsBackend(loc)


def as_backend(backend: Backend | str) -> Backend:
    """A backend, or the fs backend of a directory (for callers that hold only a path)."""
    if isinstance(backend, str):
        return FsBackend(StoreLocation("fs", backend, backend))
    return backend


class FsBackend:
    parallelism = 2

    def __init__(self, loc: StoreLocation) -> None:
        self.location = loc
        self.root = loc.path
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._closed = False

    def _check_root(self) -> None:
        if not os.path.isdir(self.root):
            raise StoreError(f"store not found: {self.location.display} (no such directory)")

    def describe(self, key: str) -> str:
        return os.path.join(self.root, key)

    def connect_in_background(self, soon: Sequence[str] = ()) -> None:
        pass

    def read(self, key: str) -> bytes:
        path = self.describe(key)
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            self._check_root()
            raise
        except OSError as e:
            raise StoreError(f"cannot read {path}: {e.strerror}") from None

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        return os.pread(self._fd(key), length, offset)

    def _fd(self, key: str) -> int:
        fd = self._fds.get(key)
        if fd is not None:
            return fd
        with self._lock:
            if self._closed:
                raise StoreError("store is closed")
            fd = self._fds.get(key)
            if fd is None:
                fd = os.open(self.describe(key), os.O_RDONLY | os.O_CLOEXEC)
                self._fds[key] = fd
            return fd

    def forget(self, key: str) -> None:
        """Close the fd of `key` (its object failed a check and will not be read again)."""
        with self._lock:
            fd = self._fds.pop(key, None)
        if fd is not None:
            os.close(fd)

    def list(self, prefix: str) -> list[str]:
        top = self.describe(prefix.rstrip("/"))
        out: list[str] = []
        try:
            for dirpath, dirnames, filenames in os.walk(top, onerror=_raise):
                dirnames.sort()
                rel = os.path.relpath(dirpath, self.root)
                out.extend(f"{rel}/{name}" for name in filenames if _regular(os.path.join(dirpath, name)))
        except FileNotFoundError:
            self._check_root()
        except OSError as e:
            raise StoreError(f"cannot list {top}: {e.strerror or errno.errorcode.get(e.errno, e)}") from None
        return sorted(out)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)


def _regular(path: str) -> bool:
    return not os.path.islink(path) and os.path.isfile(path)


def _raise(e: OSError) -> None:
    raise e
