# BlockImage (region stitching) against a naive reference, and the `kloset-blocks image` command on
# local trees and on the golden fixture stores (ground truth: the tar manifests).
from __future__ import annotations

import itertools
import json
import os
import pwd
import stat
import subprocess
from pathlib import Path

import pytest

from kloset_blocks.cli import main
from kloset_blocks.errors import CorruptionError, UsageError
from kloset_blocks.ext4 import PlanOptions, plan
from kloset_blocks.ext4.layout import BYTES, FILE, ZERO
from kloset_blocks.image.block import BlockImage
from kloset_blocks.tree import BytesData, Node
from tests.ext4util import PatternData, assert_fsck_clean, file_sha256, loop_mount

MiB = 1 << 20


def _layout():
    nodes = [Node(b"/", stat.S_IFDIR | 0o755, 0, 0, 0)]
    for i, size in enumerate([1, 4095, 4096, 4097, 3 * MiB + 3]):
        nodes.append(Node(b"/f%d" % i, stat.S_IFREG | 0o644, 0, 0, 0, size=size, data=PatternData(size, i)))
    return plan(nodes, PlanOptions(free_bytes=MiB))


def _reference(layout) -> bytes:
    out = bytearray()
    for r in layout.regions:
        if r.kind == BYTES:
            out += r.source[r.src_offset : r.src_offset + r.length]
        elif r.kind == ZERO:
            out += bytes(r.length)
        else:
            out += r.source.read(r.src_offset, r.src_len) + bytes(r.length - r.src_len)
    return bytes(out)


@pytest.fixture(scope="module")
def small():
    layout = _layout()
    return layout, BlockImage(layout), _reference(layout)


def test_pread_across_every_boundary(small):
    layout, img, ref = small
    assert img.size == len(ref) == layout.size
    for r in layout.regions:
        for off in (r.start - 5, r.start, r.start + 1, r.start + r.length - 3):
            for n in (0, 1, 7, 4096, 70000):
                if off >= 0 and off + n <= img.size:
                    assert img.pread(off, n) == ref[off : off + n], (off, n)


def test_readinto_overwrites_dirty_buffers(small):
    layout, img, ref = small
    buf = bytearray(b"\xaa" * (2 * MiB))
    start = layout.data_start_block * 4096 - MiB
    assert img.readinto(buf, start) == len(buf)
    assert bytes(buf) == ref[start : start + len(buf)]


@pytest.mark.parametrize(("offset", "length"), [(-1, 1), (0, -1), ("end", 1)])
def test_out_of_range(small, offset, length):
    _, img, _ = small
    with pytest.raises(UsageError):
        img.pread(img.size if offset == "end" else offset, length)


def test_extents(small):
    layout, img, _ = small
    ex = img.extents(0, img.size)
    assert ex[0][0] == 0 and sum(n for _, n, _ in ex) == img.size
    assert all(a[0] + a[1] == b[0] and a[2] != b[2] for a, b in itertools.pairwise(ex))
    assert ex[-1][2] is True  # free space is a hole
    zero_bytes = sum(r.length for r in layout.regions if r.kind == ZERO)
    assert sum(n for _, n, z in ex if z) == zero_bytes
    files = [r for r in layout.regions if r.kind == FILE]
    mid = files[-1].start + 10
    assert img.extents(mid, 100) == [(mid, 100, False)]


def test_short_file_data_is_an_error():
    node = Node(b"/x", stat.S_IFREG | 0o644, 0, 0, 0, size=10, data=BytesData(b"short"))
    img = BlockImage(plan([Node(b"/", stat.S_IFDIR | 0o755, 0, 0, 0), node], PlanOptions(free_bytes=0)))
    r = next(r for r in img.regions if r.kind == FILE)
    with pytest.raises(CorruptionError):
        img.pread(r.start, 10)


def test_write_sparse(small, tmp_path: Path):
    layout, img, ref = small
    out = tmp_path / "s.img"
    img.write_sparse(out)
    assert out.read_bytes() == ref
    allocated = os.stat(out).st_blocks * 512
    assert allocated < layout.size // 4  # the free space and empty inode tables stay holes


def test_cli_from_dir(tmp_path: Path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "PG_VERSION").write_bytes(b"15\n")
    (src / "sub" / "data").write_bytes(os.urandom(100000))
    out = tmp_path / "o.img"
    args = ["image", "--from-dir", str(src), str(out), "--pgdata", "--uid", "7", "--gid", "8"]
    assert main([*args, "--free", "16M", "--label", "pg"]) == 0
    assert_fsck_clean(out)
    label = subprocess.run(["e2label", str(out)], capture_output=True, text=True, check=True).stdout.strip()
    assert label == "pg"
    with loop_mount(out, tmp_path / "mnt") as mnt:
        assert sorted(os.listdir(mnt)) == ["PG_VERSION", "data"]
        assert (mnt / "data").read_bytes() == (src / "sub" / "data").read_bytes()
        assert (os.stat(mnt).st_uid, os.stat(mnt / "data").st_gid) == (7, 8)


def test_cli_bad_name_is_one_line(tmp_path: Path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    long = b"n" * 255
    # A 255-byte name is fine; the planner rejects a name it cannot store only through the planner API,
    # so re-root onto a path that is not a directory to get a LayoutError from the command.
    (src / os.fsdecode(long)).write_bytes(b"x")
    rc = main(["image", "--from-dir", str(src), str(tmp_path / "o.img"), "--path", "/" + long.decode()])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kloset-blocks: ") and "is not a directory" in err[0]


FIXTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures"
GOLDEN = [
    ("golden-plain", "bf6afbaef154", "pg-A.manifest.json", None),
    ("golden-plain", "3b116f400535", "pg-B.manifest.json", None),
    ("golden-enc", "0b3eff1dd4ad", "pg-A.manifest.json", "correct horse battery staple"),
]


@pytest.mark.parametrize(("store", "snap", "manifest", "passphrase"), GOLDEN)
def test_golden_store_image(store, snap, manifest, passphrase, tmp_path: Path, monkeypatch):
    if passphrase:
        monkeypatch.setenv("PLAKAR_PASSPHRASE", passphrase)
    out = tmp_path / "g.img"
    assert main(["image", str(FIXTURES / store), snap, str(out), "--owner", "postgres", "--free", "64M"]) == 0
    assert_fsck_clean(out)
    entries = json.loads((FIXTURES / manifest).read_text())["entries"]
    pg = pwd.getpwnam("postgres")
    with loop_mount(out, tmp_path / "mnt") as mnt:
        seen = 0
        for e in entries:
            host = str(mnt) + e["path"]
            s = os.lstat(host)
            assert (s.st_uid, s.st_gid) == (pg.pw_uid, pg.pw_gid)
            assert stat.S_IMODE(s.st_mode) == int(e["mode"], 8), e["path"]
            assert int(s.st_mtime) == e["mtime"], e["path"]
            if e["type"] == "file":
                assert stat.S_ISREG(s.st_mode) and s.st_size == e["size"], e["path"]
                assert file_sha256(host) == e["sha256"], e["path"]
                seen += 1
            elif e["type"] == "dir":
                assert stat.S_ISDIR(s.st_mode), e["path"]
        assert seen == 1284
