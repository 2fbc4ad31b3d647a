"""Tar sources (plakar's tar importer semantics, format §10.3 and §17), the mkstore command, and
the record shapes of a written store against the golden fixture written by Kloset itself."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from kloset_blocks.store import codec as C
from kloset_blocks.store import open_store
from kloset_blocks.store.gomode import MODE_DIR, MODE_NAMED_PIPE, MODE_SYMLINK
from kloset_blocks.writer.source import clean, go_base
from kloset_blocks.writer.store import write_store
from tests.writer_helpers import TINY_CHUNKS, make_tree, rand_bytes, store_view

REPO = Path(__file__).resolve().parent.parent
GOLDEN_A = "bf6afbaef15411cad49bd0cb276075c35b157f0d9b2ac15c9fad05e346641a7c"
FILE = rand_bytes(5, 50_000)


def _member(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, **kw) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid, info.gid, info.uname, info.gname = 101, 104, "postgres", "postgres"
    info.mtime = 1_700_000_000
    for k, v in kw.items():
        setattr(info, k, v)
    return info


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as t:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


QUIRKY_TAR = [
    (_member("./", tarfile.DIRTYPE, 0o755), None),
    (_member("./a/b/", tarfile.DIRTYPE, 0o700), None),
    (_member("./a/b/file"), FILE),
    (_member("./a/sl", tarfile.SYMTYPE, 0o777, linkname="b/file"), None),
    (_member("./a/hl", tarfile.LNKTYPE, 0o644, linkname="a/b/file"), None),
    (_member("./suid", mode=0o4755), b"#!/bin/sh\n"),
    (_member("./fifo", tarfile.FIFOTYPE, 0o644), None),
    (_member("./tmp/", tarfile.DIRTYPE, 0o1777), None),
    (_member("x/y/z", mode=0o600), b"deep"),
    (_member("./\udcff\udcfename", mode=0o640), b"latin1"),
    (_member("./empty"), b""),
]

# path -> (go mode, symlink target, has object, file_info.name); §17.1-17.5
EXPECTED = {
    b"/": (MODE_DIR | 0o755, None, False, "."),
    b"/a": (MODE_DIR | 0o750, None, False, "a"),  # synthesized
    b"/a/b": (MODE_DIR | 0o700, None, False, "b"),
    b"/a/b/file": (0o644, None, True, "file"),
    b"/a/sl": (0o777, b"b/file", True, "sl"),  # a tar symlink stays a regular file
    b"/a/hl": (MODE_SYMLINK | 0o644, b"a/b/file", False, "hl"),  # a hard link becomes a symlink
    b"/suid": (0o4755, None, True, "suid"),  # setuid kept in the low bits
    b"/fifo": (MODE_NAMED_PIPE | 0o644, None, False, "fifo"),
    b"/tmp": (MODE_DIR | 0o1777, None, False, "tmp"),
    b"/x": (MODE_DIR | 0o750, None, False, "x"),
    b"/x/y": (MODE_DIR | 0o750, None, False, "y"),
    b"/x/y/z": (0o600, None, True, "z"),
    b"/\xff\xfename": (0o640, None, True, "\udcff\udcfename"),
    b"/empty": (0o644, None, True, "empty"),
}


@pytest.mark.parametrize(
    ("raw", "path", "base"),
    [
        (b"./", b"/", b"."),
        (b"./a/b/", b"/a/b", b"b"),
        (b"a//b/./c", b"/a/b/c", b"c"),
        (b"../../etc/x", b"/etc/x", b"x"),
        (b".", b"/", b"."),
        (b"/abs", b"/abs", b"abs"),
        (b"./pg_wal/archive_status/", b"/pg_wal/archive_status", b"archive_status"),
    ],
)
def test_go_path_join_and_base(raw: bytes, path: bytes, base: bytes) -> None:
    assert clean(raw) == path
    assert go_base(raw) == base


class _Pipe(io.RawIOBase):
    """A non-seekable stream, like stdin fed by pg_basebackup."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        chunk = self._data.read(min(len(b), 1000))
        b[: len(chunk)] = chunk
        return len(chunk)


def test_tar_importer_quirks(tmp_path: Path) -> None:
    dest = tmp_path / "store"
    write_store(dest, _Pipe(_tar(QUIRKY_TAR)), **TINY_CHUNKS)
    with open_store(str(dest)) as store:
        (info,) = store.snapshots()
        assert (info.importer_type, info.importer_directory) == ("tar", "/")
        snap = store.open_snapshot()
        entries = dict(snap.walk())
        assert set(entries) == set(EXPECTED)
        assert list(entries) == sorted(EXPECTED, key=lambda p: (p.count(b"/"), p))  # PathCmp order
        for path, (mode, target, has_object, name) in EXPECTED.items():
            entry = entries[path]
            rec = store.read_record(C.RT_VFS_ENTRY, entry.mac)
            assert (entry.go_mode, entry.symlink_target, entry.object is not None) == (
                mode,
                target,
                has_object,
            )
            assert rec["file_info"]["name"] == name
            assert rec["parent_path"] == ("/" if path.count(b"/") == 1 else path.rsplit(b"/", 1)[0].decode())
        for path in (b"/a", b"/x", b"/x/y"):  # synthesized (§17.2)
            fi = store.read_record(C.RT_VFS_ENTRY, entries[path].mac)["file_info"]
            assert (fi["uid"], fi["gid"], fi["nlink"], fi["username"], C.timestamp_ns(fi["mod_time"])) == (
                0,
                0,
                0,
                "",
                0,
            )
        fi = store.read_record(C.RT_VFS_ENTRY, entries[b"/a/b/file"].mac)["file_info"]
        assert (fi["uid"], fi["gid"], fi["username"], fi["nlink"], fi["dev"]) == (101, 104, "postgres", 1, 0)
        assert C.timestamp_ns(fi["mod_time"]) == 1_700_000_000 * 10**9
        link = store.read_record(C.RT_OBJECT, entries[b"/a/sl"].object)
        assert [c["length"] for c in link["chunks"]] == [0]  # one zero-length chunk (§17.3)
        assert link["content_type"] == "text/plain"
        assert entries[b"/a/sl"].st_mode == stat.S_IFLNK | 0o777  # the reader presents it as a symlink
        assert entries[b"/suid"].st_mode == stat.S_IFREG | 0o4755
        assert snap.open_file("/a/b/file").read(0, len(FILE)) == FILE
        assert snap.open_file("/a/b/file").read(12_345, 20_000) == FILE[12_345:32_345]
        assert snap.open_file(b"/\xff\xfename").read(0, 6) == b"latin1"
        assert snap.open_file("/empty").read(0, 0) == b""
        assert len(snap.chunk_list(entries[b"/a/b/file"])[0]) > 20


def test_later_tar_member_wins(tmp_path: Path) -> None:
    tar = _tar([(_member("f"), b"first"), (_member("f"), b"second!")])
    dest = tmp_path / "store"
    write_store(dest, io.BytesIO(tar))
    assert store_view(dest)[b"/f"][2] == b"second!"


def test_tar_file_conflicting_with_a_directory_is_refused(tmp_path: Path) -> None:
    from kloset_blocks.errors import KlosetError

    tar = _tar([(_member("f"), b"x"), (_member("f/g"), b"y")])
    with pytest.raises(KlosetError, match="not a directory"):
        write_store(tmp_path / "store", io.BytesIO(tar))
    assert not (tmp_path / "store").exists()


# ---------------------------------------------------------------- the mkstore command


def _cli(*args: str, stdin: bytes = b"", env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "PLAKAR_PASSPHRASE"} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "kloset_blocks", *args],
        input=stdin,
        capture_output=True,
        cwd=REPO,
        env=full_env,
        check=False,
    )


def test_mkstore_command(tmp_path: Path) -> None:
    dest = tmp_path / "store"
    small = ["--chunk-min", "64", "--chunk-avg", "512", "--chunk-max", "2k"]
    r = _cli("mkstore", str(dest), "--from-tar", "-", "--plaintext", *small, stdin=_tar(QUIRKY_TAR))
    assert r.returncode == 0, r.stderr
    first = r.stdout.decode().strip()
    assert len(first) == 64 and int(first, 16) >= 0
    src = tmp_path / "src"
    make_tree(src, {b"a/b/file": FILE, b"more": b"more"})
    r = _cli("mkstore", str(dest), "--from-dir", str(src))  # DEST is a store: add a snapshot
    assert r.returncode == 0, r.stderr
    second = r.stdout.decode().strip()
    with open_store(str(dest)) as store:
        assert sorted(s.hex_id for s in store.snapshots()) == sorted([first, second])
    assert store_view(dest, second)[b"/a/b/file"][2] == FILE

    enc = tmp_path / "enc"
    kdf = ["--kdf-memory", "8M", "--kdf-time", "1", "--compression", "gzip", "--hashing", "sha256"]
    r = _cli("mkstore", str(enc), "--from-dir", str(src), *kdf)
    assert r.returncode == 1
    assert r.stderr.decode().count("\n") == 1 and "PLAKAR_PASSPHRASE" in r.stderr.decode()
    assert not enc.exists()
    pw = tmp_path / "pw"
    pw.write_bytes(b"s3cret\n")
    r = _cli("mkstore", str(enc), "--from-dir", str(src), "--passphrase-file", str(pw), *kdf)
    assert r.returncode == 0, r.stderr
    r = _cli("mkstore", str(enc), "--from-dir", str(src), env={"PLAKAR_PASSPHRASE": "wrong"})
    assert r.returncode == 1 and b"wrong passphrase" in r.stderr
    r = _cli("mkstore", str(enc), "--from-dir", str(src), env={"PLAKAR_PASSPHRASE": "s3cret"})
    assert r.returncode == 0, r.stderr
    with open_store(str(enc), "s3cret") as store:
        assert len(store.snapshots()) == 2
        assert store.config["Compression"]["Algorithm"] == "GZIP"


# ---------------------------------------------------------------- shapes against the golden fixture


def _pg_like_tar() -> bytes:
    page = bytes(24) + rand_bytes(9, 8192 - 24)
    return _tar(
        [
            (_member("backup_label", mode=0o600), b"START WAL LOCATION: 0/2000028\n"),
            (_member("PG_VERSION", mode=0o600), b"15\n"),
            (_member("global", tarfile.DIRTYPE, 0o700), None),
            (_member("global/pg_control", mode=0o600), rand_bytes(8, 8192)),
            (_member("global/4185", mode=0o600), b""),
            (_member("base", tarfile.DIRTYPE, 0o700), None),
            (_member("base/1", tarfile.DIRTYPE, 0o700), None),
            (_member("base/1/1259", mode=0o600), page * 12),
            (_member("pg_wal", tarfile.DIRTYPE, 0o700), None),
            (_member("./pg_wal/archive_status/", tarfile.DIRTYPE, 0o700), None),
            (
                _member("backup_manifest", mode=0o600, uid=2048, gid=1024),
                b'{"PostgreSQL-Backup-Manifest-Version": 1}\n',
            ),
        ]
    )


def _keys(rec: dict) -> list[str]:
    return list(rec)


def test_shapes_match_the_golden_fixture(tmp_path: Path, fixtures_dir: Path) -> None:
    dest = tmp_path / "store"
    write_store(dest, io.BytesIO(_pg_like_tar()))
    with open_store(str(fixtures_dir / "golden-plain")) as gold, open_store(str(dest)) as ours:
        g_snap, o_snap = gold.open_snapshot(GOLDEN_A), ours.open_snapshot()
        g_hdr, o_hdr = g_snap.info.header, o_snap.info.header
        assert _keys(o_hdr) == _keys(g_hdr)
        g_src, o_src = g_hdr["sources"][0], o_hdr["sources"][0]
        assert _keys(o_src) == _keys(g_src)
        for key in ("importer", "root", "summary"):
            assert set(o_src[key]) == set(g_src[key]), key
        assert _keys(o_hdr["identity"]) == _keys(g_hdr["identity"])
        assert {c["key"] for c in o_hdr["context"]} == {c["key"] for c in g_hdr["context"]}
        assert o_src["importer"]["type"] == g_src["importer"]["type"] == "tar"
        size = sum(len(d) for i, d in _tar_files(_pg_like_tar()))
        assert o_snap.info.size == size

        for path in (
            "/",
            "/PG_VERSION",
            "/global/4185",
            "/global/pg_control",
            "/base",
            "/pg_wal/archive_status",
        ):
            g_ent, o_ent = g_snap.lookup(path), o_snap.lookup(path)
            g_rec = gold.read_record(C.RT_VFS_ENTRY, g_ent.mac)
            o_rec = ours.read_record(C.RT_VFS_ENTRY, o_ent.mac)
            assert _keys(o_rec) == _keys(g_rec), path
            assert _keys(o_rec["file_info"]) == _keys(g_rec["file_info"]), path
            assert (o_ent.go_mode, o_ent.uid, o_ent.gid) == (g_ent.go_mode, g_ent.uid, g_ent.gid), path
            if g_ent.object is not None:
                g_obj = gold.read_record(C.RT_OBJECT, g_ent.object)
                o_obj = ours.read_record(C.RT_OBJECT, o_ent.object)
                assert _keys(o_obj) == _keys(g_obj), path
                assert _keys(o_obj["chunks"][0]) == _keys(g_obj["chunks"][0]), path
                assert o_rec["content_type"] == g_rec["content_type"], path

        g_root = gold.read_record(C.RT_VFS_BTREE, g_snap.info.vfs_root)
        o_root = ours.read_record(C.RT_VFS_BTREE, o_snap.info.vfs_root)
        assert _keys(o_root) == _keys(g_root)
        # few paths at order 50: our root is a single last leaf, shaped like Kloset's last leaf
        assert _keys(ours.read_record(C.RT_VFS_NODE, o_root["Root"])) == _keys(
            _edge(gold, g_root["Root"], -1)
        )
        fi = ours.read_record(C.RT_VFS_ENTRY, o_snap.lookup("/backup_manifest").mac)["file_info"]
        assert (fi["uid"], fi["gid"]) == (2048, 1024)


def _edge(store, mac: bytes, side: int) -> dict:
    """The leftmost (side=0) or rightmost (side=-1) leaf below VFS node `mac`."""
    node = store.read_record(C.RT_VFS_NODE, mac)
    while node["pointers"]:
        node = store.read_record(C.RT_VFS_NODE, node["pointers"][side])
    return node


def test_btree_node_shapes_match_the_golden_fixture(tmp_path: Path, fixtures_dir: Path) -> None:
    dest = tmp_path / "store"
    write_store(dest, io.BytesIO(_pg_like_tar()), btree_order=3)
    with open_store(str(fixtures_dir / "golden-plain")) as gold, open_store(str(dest)) as ours:
        g_root = gold.read_record(C.RT_VFS_BTREE, gold.open_snapshot(GOLDEN_A).info.vfs_root)["Root"]
        o_root = ours.read_record(C.RT_VFS_BTREE, ours.snapshots()[0].vfs_root)["Root"]
        assert _keys(ours.read_record(C.RT_VFS_NODE, o_root)) == _keys(
            gold.read_record(C.RT_VFS_NODE, g_root)
        )
        for side in (0, -1):  # a leaf with `next`, the last leaf without
            assert _keys(_edge(ours, o_root, side)) == _keys(_edge(gold, g_root, side))


def _tar_files(data: bytes):
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        for info in t:
            if info.isreg():
                yield info, t.extractfile(info).read()


@pytest.mark.parametrize("suffix", ["tar", "tar.gz", "tar.xz"])
def test_tar_file_path_and_compressed_tars(tmp_path: Path, suffix: str) -> None:
    import gzip
    import lzma

    data = _tar([(_member("./d/f"), FILE), (_member("./d/e"), b"")])
    packed = {"tar": data, "tar.gz": gzip.compress(data), "tar.xz": lzma.compress(data)}[suffix]
    archive = tmp_path / f"in.{suffix}"
    archive.write_bytes(packed)
    dest = tmp_path / "store"
    write_store(dest, archive, **TINY_CHUNKS)
    view = store_view(dest)
    assert (view[b"/d/f"][2], view[b"/d/e"][2]) == (FILE, b"")
    assert set(view) == {b"/", b"/d", b"/d/f", b"/d/e"}


def test_missing_source_is_a_usage_error(tmp_path: Path) -> None:
    from kloset_blocks.errors import UsageError

    with pytest.raises(UsageError, match="does not exist"):
        write_store(tmp_path / "store", tmp_path / "nope.tar")
    assert not (tmp_path / "store").exists()
