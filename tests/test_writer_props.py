"""Property tests: random trees (non-UTF-8 names, sizes 0 .. a few hundred KiB, tiny chunks so
hundreds of chunk boundaries per file) written from a directory and from a tar of the same
tree read back byte-identical, and random byte ranges read back equal the slice."""

from __future__ import annotations

import io
import os
import random
import tarfile
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kloset_blocks.store import open_store
from kloset_blocks.writer.store import write_store
from tests.writer_helpers import TINY_CHUNKS, make_tree, rand_bytes, source_view, store_view

NAME = st.binary(min_size=1, max_size=12).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..")
)
SIZE = st.one_of(st.integers(0, 100), st.integers(0, 300_000), st.integers(50_000, 300_000))
TREE = st.dictionaries(
    st.lists(NAME, min_size=1, max_size=3).map(tuple), st.tuples(SIZE, st.integers(0, 2**32)), max_size=8
)


def _consistent(tree: dict[tuple[bytes, ...], tuple[int, int]]) -> dict[bytes, bytes]:
    """Relative path -> content, dropping files that would sit below another file."""
    files: dict[tuple[bytes, ...], bytes] = {}
    for parts in sorted(tree, key=len):
        if any(parts[:i] in files for i in range(1, len(parts))):
            continue
        if any(other[: len(parts)] == parts for other in files):
            continue
        size, seed = tree[parts]
        files[parts] = rand_bytes(seed, size)
    return {b"/".join(p): c for p, c in files.items()}


def _ranges(data: st.DataObject, size: int) -> list[tuple[int, int]]:
    out = []
    for _ in range(3):
        off = data.draw(st.integers(0, size))
        out.append((off, data.draw(st.integers(0, size - off))))
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tree=TREE,
    order=st.sampled_from([3, 4, 50]),
    compression=st.sampled_from(["LZ4", "ZSTD", None]),
    data=st.data(),
)
def test_random_directory_trees_read_back(
    tree, order: int, compression: str | None, data: st.DataObject
) -> None:
    files = _consistent(tree)
    with tempfile.TemporaryDirectory() as tmp:
        src, dest = Path(tmp) / "src", Path(tmp) / "store"
        src.mkdir()
        make_tree(src, files)
        write_store(dest, src, btree_order=order, compression=compression, **TINY_CHUNKS)
        want = source_view(src)
        assert store_view(dest) == want  # the VFS listing equals the source's walk, bytes included
        with open_store(str(dest)) as store:
            snap = store.open_snapshot()
            for rel, content in files.items():
                f = snap.open_file(b"/" + rel)
                for off, n in _ranges(data, len(content)):
                    assert f.read(off, n) == content[off : off + n]
                if len(content) > 50_000:
                    assert len(snap.chunk_list(f.entry)[0]) > 50  # hundreds of boundaries


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=TREE, seed=st.integers(0, 2**16))
def test_random_tar_trees_read_back(tree, seed: int) -> None:
    files = _consistent(tree)
    rng = random.Random(seed)
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as t:
        for rel, content in sorted(files.items(), key=lambda kv: rng.random()):  # any member order
            info = tarfile.TarInfo(("./" if rng.random() < 0.5 else "") + os.fsdecode(rel))
            info.size, info.mode, info.mtime = len(content), 0o640, 1_600_000_000
            t.addfile(info, io.BytesIO(content))
    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(tmp) / "store"
        write_store(dest, io.BytesIO(buf.getvalue()), **TINY_CHUNKS)
        got = store_view(dest)
    assert {p: v[2] for p, v in got.items() if v[2] is not None} == {b"/" + r: c for r, c in files.items()}
    ancestors = {b"/"} | {
        b"/" + b"/".join(r.split(b"/")[:i]) for r in files for i in range(1, r.count(b"/") + 1)
    }
    assert {p for p, v in got.items() if v[2] is None} == ancestors  # every ancestor synthesized
