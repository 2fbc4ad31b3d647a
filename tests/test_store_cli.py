# The store commands end to end (subprocess, like a user), and the planner view of every file
# type, on the golden stores and on a small tar store made by the fixture writer.
from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

from kloset_blocks.store import open_store
from kloset_blocks.writer.store import add_snapshot, write_store
from tests.store_helpers import (
    PLAIN,
    SNAP_A_PLAIN,
    SNAP_B_PLAIN,
    assert_one_line_error,
    manifest,
    run_cli,
)
from tests.writer_helpers import add_member

BIG = "/base/16384/16397"
UID, GID = 1234, 5678
MTIME = 1_700_000_000


def _sha_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------- golden stores


def test_snapshots_lines() -> None:
    proc = run_cli("snapshots", f"fs:{PLAIN}")
    assert proc.returncode == 0 and proc.stderr == b""
    lines = proc.stdout.decode().splitlines()
    assert [line.split()[0] for line in lines] == [SNAP_A_PLAIN[:8], SNAP_B_PLAIN[:8]]
    assert lines[0].split()[1].startswith("2026-11-25T")
    assert lines[0].endswith("76 MiB  tar:golden-host:/")


def test_ls_root_and_long() -> None:
    proc = run_cli("ls", str(PLAIN), "bf6a")
    names = proc.stdout.decode().split()
    assert proc.returncode == 0 and "PG_VERSION" in names and "base" in names and len(names) == 25
    proc = run_cli("ls", str(PLAIN), "bf6a:/global", "-l")
    line = next(x for x in proc.stdout.decode().splitlines() if x.endswith(" pg_control"))
    assert line.startswith("-rw------- postgres postgres         8192 ")
    proc = run_cli("ls", str(PLAIN), "bf6a:base/1/../1/PG_VERSION")
    assert proc.stdout == b"PG_VERSION\n"


@pytest.mark.parametrize(("snap", "name"), [(SNAP_A_PLAIN[:6], "A"), (SNAP_B_PLAIN[:6], "B")])
def test_cat_streams_exact_bytes(snap: str, name: str) -> None:
    proc = run_cli("cat", str(PLAIN), f"{snap}:{BIG}")
    assert proc.returncode == 0, proc.stderr
    assert hashlib.sha256(proc.stdout).hexdigest() == manifest(name)[BIG]["sha256"]


def test_cat_path_only_means_latest() -> None:
    proc = run_cli("cat", str(PLAIN), "/PG_VERSION")
    assert (proc.returncode, proc.stdout) == (0, b"15\n")


def test_restore_snapshot_matches_manifest(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    proc = run_cli("restore", str(PLAIN), SNAP_A_PLAIN[:8], str(dest))
    assert proc.returncode == 0, proc.stderr
    man = manifest("A")
    found = {"/" + str(p.relative_to(dest)) for p in dest.rglob("*")}
    assert found == set(man)
    for path, m in man.items():
        st = os.lstat(dest / path.lstrip("/"))
        kind = stat.S_IFREG if m["type"] == "file" else stat.S_IFDIR
        assert stat.S_IFMT(st.st_mode) == kind, path
        assert oct(stat.S_IMODE(st.st_mode)) == m["mode"], path
        assert st.st_mtime_ns == m["mtime"] * 1_000_000_000, path
        if os.geteuid() == 0:
            assert (st.st_uid, st.st_gid) == (m["uid"], m["gid"]), path
        if kind == stat.S_IFREG:
            assert st.st_size == m["size"] and _sha_file(dest / path.lstrip("/")) == m["sha256"], path
    root = os.stat(dest)
    assert stat.S_IMODE(root.st_mode) == 0o750 and root.st_mtime_ns == 0


def test_restore_subtree_and_single_file(tmp_path: Path) -> None:
    proc = run_cli("restore", str(PLAIN), "bf6a:/global", str(tmp_path / "g"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "g" / "pg_control").stat().st_size == 8192
    proc = run_cli("restore", str(PLAIN), f"bf6a:{BIG}", str(tmp_path / "f"))
    assert proc.returncode == 0, proc.stderr
    assert _sha_file(tmp_path / "f" / "16397") == manifest("A")[BIG]["sha256"]
    # Restoring over existing files refuses instead of overwriting.
    proc = run_cli("restore", str(PLAIN), f"bf6a:{BIG}", str(tmp_path / "f"))
    assert_one_line_error(proc, "restore failed")


# ---------------------------------------------------------------- every file type


def _tar_bytes() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(name: str, kind: bytes, mode: int, data: bytes = b"", **kw: object) -> None:
            attrs = {"uid": UID, "gid": GID, "mtime": MTIME, "uname": "u", "gname": "g", **kw}
            add_member(tar, name, kind, mode, data, **attrs)

        add("d", tarfile.DIRTYPE, 0o755)
        add("d/f", tarfile.REGTYPE, 0o4755, b"hello")
        add("d/g", tarfile.REGTYPE, 0o2750, bytes(range(256)) * 4000)
        add("d/empty", tarfile.REGTYPE, 0o644)
        add("t", tarfile.DIRTYPE, 0o1777)
        add("d/link", tarfile.SYMTYPE, 0o777, linkname="f")
        add("d/hard", tarfile.LNKTYPE, 0o4755, linkname="d/f")
        add("d/hard-to-link", tarfile.LNKTYPE, 0o777, linkname="d/link")
        add("d/hard-dangling", tarfile.LNKTYPE, 0o644, linkname="nowhere")
        add("d/fifo", tarfile.FIFOTYPE, 0o640)
        add("d/null", tarfile.CHRTYPE, 0o666, devmajor=1, devminor=3)
        add("d/blk", tarfile.BLKTYPE, 0o660, devmajor=7, devminor=0)
        add("d/\udcffname", tarfile.REGTYPE, 0o600, b"non-utf8")
    return buf.getvalue()


@pytest.fixture(scope="module")
def typed_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("typed") / "store"
    tar = tmp_path_factory.mktemp("tar") / "t.tar"
    tar.write_bytes(_tar_bytes())
    write_store(
        dest, tar, chunk_min=64 << 10, chunk_avg=128 << 10, chunk_max=256 << 10, btree_order=3, seed=1
    )
    return dest


EXPECTED = {
    b"/d": (stat.S_IFDIR | 0o755, None, None),
    b"/d/f": (stat.S_IFREG | 0o4755, None, None),
    b"/d/g": (stat.S_IFREG | 0o2750, None, None),
    b"/d/empty": (stat.S_IFREG | 0o644, None, None),
    b"/t": (stat.S_IFDIR | 0o1777, None, None),
    b"/d/link": (stat.S_IFLNK | 0o777, b"f", None),
    b"/d/hard": (stat.S_IFREG | 0o4755, None, b"/d/f"),
    b"/d/hard-to-link": (stat.S_IFLNK | 0o777, b"d/link", None),
    b"/d/hard-dangling": (stat.S_IFLNK | 0o644, b"nowhere", None),
    b"/d/fifo": (stat.S_IFIFO | 0o640, None, None),
    b"/d/null": (stat.S_IFCHR | 0o666, None, None),
    b"/d/blk": (stat.S_IFBLK | 0o660, None, None),
    b"/d/\xffname": (stat.S_IFREG | 0o600, None, None),
}


def test_nodes_of_every_type(typed_store: Path) -> None:
    snap = open_store(str(typed_store)).open_snapshot("")
    nodes = {n.path: n for n in snap.nodes()}
    assert set(nodes) == {b"/", *EXPECTED}
    for path, (mode, target, hardlink) in EXPECTED.items():
        n = nodes[path]
        assert (n.mode, n.symlink_target, n.hardlink_to) == (mode, target, hardlink), path
        assert (n.uid, n.gid, n.mtime_ns) == (UID, GID, MTIME * 1_000_000_000), path
        if target is not None:
            assert n.size == len(target)
    assert nodes[b"/d/g"].data.read(0, nodes[b"/d/g"].size) == bytes(range(256)) * 4000
    assert len(nodes[b"/d/g"].data.macs) > 3  # several chunks
    assert nodes[b"/d/f"].data.read(1, 3) == b"ell"
    assert nodes[b"/d/empty"].size == 0 and nodes[b"/d/empty"].data.read(0, 0) == b""
    # A subtree: a link whose target lies outside it becomes a copy of the target's content.
    sub = {n.path: n for n in snap.nodes(b"/d/hard")}
    assert sub[b"/d/hard"].hardlink_to is None and sub[b"/d/hard"].data.read(0, 5) == b"hello"


def test_restore_every_type(typed_store: Path, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    proc = run_cli("restore", str(typed_store), "", str(dest))
    assert proc.returncode == 0, proc.stderr
    for path, (mode, target, hardlink) in EXPECTED.items():
        local = os.path.join(os.fsencode(dest), path.lstrip(b"/"))
        st = os.lstat(local)
        if (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)) and os.geteuid() != 0:
            continue
        if stat.S_ISLNK(mode):  # Linux symlinks are always 0777
            assert stat.S_ISLNK(st.st_mode), path
        else:
            assert st.st_mode == mode, (path, oct(st.st_mode))
        assert (st.st_uid, st.st_gid) == (UID, GID) or os.geteuid() != 0
        assert st.st_mtime_ns == MTIME * 1_000_000_000, path
        if target is not None:
            assert os.readlink(local) == target
        if hardlink is not None:
            other = os.lstat(os.path.join(os.fsencode(dest), hardlink.lstrip(b"/")))
            assert (st.st_ino, st.st_nlink) == (other.st_ino, 2)
    assert (dest / "d" / "g").read_bytes() == bytes(range(256)) * 4000


def test_ls_long_shows_links(typed_store: Path) -> None:
    out = run_cli("ls", str(typed_store), ":/d", "-l").stdout.decode("utf-8", "surrogateescape")
    assert "-rwsr-xr-x" in out and "link -> f" in out and "prw-r-----" in out
    assert "''$'\\377''name'" in out  # a byte that is not UTF-8, quoted as GNU ls does (test_names.py)


def test_ambiguous_prefix_cli(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"x")
    store = tmp_path / "store"
    ids = [write_store(store, src, seed=0)]
    seed = 1
    while len({i[0] for i in ids}) == len(ids):
        ids.append(add_snapshot(store, src, seed=seed))
        seed += 1
    dup = next(i[0] for i in ids if sum(j[0] == i[0] for j in ids) > 1)
    proc = run_cli("ls", str(store), dup)
    err = assert_one_line_error(proc, f"snapshot prefix '{dup}' is ambiguous: matches ")
    assert err.count(dup) >= 3
    assert run_cli("ls", str(store), ids[-1][:12]).returncode == 0
