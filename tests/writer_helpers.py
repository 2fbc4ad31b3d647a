"""Shared oracles for the writer tests: an independent view of a source directory (os.lstat and
plain file reads) and of a written store (the project's reader), to compare."""

from __future__ import annotations

import io
import os
import random
import stat
import tarfile
from pathlib import Path

from kloset_blocks.store import open_store

CHEAP_KDF = {"kdf_time": 1, "kdf_memory_kib": 8192}
TINY_CHUNKS = {"chunk_min": 64, "chunk_avg": 512, "chunk_max": 2048}


def source_view(root: Path) -> dict[bytes, tuple]:
    """path -> (st_mode, size or target, content) for every path under root (root is b"/")."""
    base = os.fsencode(root)
    out: dict[bytes, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        names = [*dirnames, *filenames] + ([b""] if dirpath == base else [])
        for name in names:
            full = os.path.join(dirpath, name) if name else dirpath
            rel = os.path.relpath(full, base)
            rel = b"/" if rel == b"." else b"/" + rel
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = (st.st_mode, os.readlink(full), None)
            elif stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    out[rel] = (st.st_mode, st.st_size, f.read())
            else:
                out[rel] = (st.st_mode, None, None)
    return out


def store_view(store_dir: Path, snapshot: str = "", passphrase: bytes | None = None) -> dict[bytes, tuple]:
    """The same shape, read back through the reader (walk + open_file)."""
    out: dict[bytes, tuple] = {}
    with open_store(str(store_dir), None if passphrase is None else passphrase.decode()) as store:
        snap = store.open_snapshot(snapshot)
        for path, entry in snap.walk():
            if entry.is_symlink:
                out[path] = (entry.st_mode, entry.symlink_target, None)
            elif entry.is_reg:
                out[path] = (entry.st_mode, entry.size, snap.open_file(path).read(0, entry.size))
            else:
                out[path] = (entry.st_mode, None, None)
    return out


def make_tree(root: Path, files: dict[bytes, bytes]) -> None:
    """Create files (and their parent directories) under root from relative byte paths."""
    base = os.fsencode(root)
    for rel, content in files.items():
        full = os.path.join(base, rel)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(content)


def rand_bytes(seed: int, size: int) -> bytes:
    """Compressible-ish content: random runs and repeated pages, so chunks differ and dedup a bit."""
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        if rng.random() < 0.3:
            out += bytes([rng.randrange(256)]) * rng.randrange(1, 3000)
        else:
            out += rng.randbytes(rng.randrange(1, 5000))
    return bytes(out[:size])


def add_member(
    tar: tarfile.TarFile, name: str, kind: bytes, mode: int, data: bytes = b"", **attrs: object
) -> None:
    """Add one tar member of any type: `data` is a regular file's content; `attrs` set any other
    TarInfo field (uid, gid, mtime, uname, linkname, devmajor, ...)."""
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode = kind, mode
    for k, v in attrs.items():
        setattr(ti, k, v)
    ti.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(ti, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
