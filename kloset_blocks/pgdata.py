# Where a PostgreSQL data directory is, the one rule for a snapshot (the plugin's pgdata=true, the
# checks before a start) and for a mounted tree (the server start): the directory holding
# PG_VERSION, looked for at `/` (pg_basebackup -F tar backups imported with `plakar backup tar:`),
# then `/data` (plakar's postgres importer), then the shallowest anywhere. And what PG_VERSION may
# say: a major version ("15", or "9.6" before PostgreSQL 10), nothing else.
#
# Pure rules over two small interfaces (a snapshot's lookup/walk, a local directory): no store or
# host knowledge here, so every layer above can use it.
from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

from kloset_blocks.errors import NotFound, PgError

PG_VERSION = b"PG_VERSION"
CANDIDATES = (b"/", b"/data")  # checked first, with two cheap lookups


class _Entry(Protocol):
    @property
    def is_reg(self) -> bool: ...


class _Info(Protocol):
    @property
    def short_id(self) -> str: ...


class SnapshotTree(Protocol):
    """What the rules need of a snapshot (kloset_blocks.store.Snapshot)."""

    @property
    def info(self) -> _Info: ...

    def lookup(self, path: bytes) -> object: ...

    def walk(self, path: bytes) -> Iterator[tuple[bytes, _Entry]]: ...


def find_pgdata(snapshot: SnapshotTree) -> bytes:
    """The snapshot directory holding PG_VERSION: a candidate, else the shallowest anywhere (a walk)."""
    for candidate in CANDIDATES:
        if holds_pgdata(snapshot, candidate):
            return candidate
    found = find_pgdata_in(path for path, entry in snapshot.walk(b"/") if entry.is_reg)
    if found is None:
        short = snapshot.info.short_id
        raise NotFound(f"snapshot {short} is not a PostgreSQL data directory (no PG_VERSION)")
    return found


def find_pgdata_in(file_paths: Iterable[bytes]) -> bytes | None:
    """The shallowest directory (then the first by bytes) holding a file named PG_VERSION."""
    best: tuple[int, bytes] | None = None
    for path in file_paths:
        directory, _, name = path.rpartition(b"/")
        if name == PG_VERSION:
            key = (directory.count(b"/"), directory or b"/")
            best = key if best is None else min(best, key)
    return None if best is None else best[1]


def holds_pgdata(snapshot: SnapshotTree, root: bytes) -> bool:
    try:
        snapshot.lookup(root.rstrip(b"/") + b"/" + PG_VERSION)
    except NotFound:
        return False
    return True


def find_data_dir(root: Path) -> Path:
    """The same rule on a mounted tree: the candidates, else one level down."""
    for candidate in CANDIDATES:
        d = root / candidate.decode().lstrip("/")
        if (d / "PG_VERSION").is_file():
            return d
    with contextlib.suppress(OSError):
        for child in sorted(root.iterdir()):
            if child.is_dir() and not child.is_symlink() and (child / "PG_VERSION").is_file():
                return child
    raise NotFound(f"no PostgreSQL data directory (a PG_VERSION file) in the snapshot at {root}")


def read_major(datadir: Path) -> str:
    """PG_VERSION's first bytes, never through a symlink (it could name a host file, whose content
    would end up in an error message)."""
    try:
        fd = os.open(datadir / "PG_VERSION", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise PgError(f"cannot read PG_VERSION in {datadir}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise PgError(f"PG_VERSION in {datadir} is not a regular file")
        text = f.read(64).decode(errors="replace").strip()
    return check_major(text, str(datadir))


def check_major(text: str, where: str) -> str:
    """PG_VERSION's content: a major version ("15", or "9.6" before PostgreSQL 10)."""
    if not re.fullmatch(r"\d{1,4}(\.\d{1,2})?", text):  # a bounded number: it names a directory
        raise PgError(f"unexpected PG_VERSION {text!r} in {where}")
    return text
