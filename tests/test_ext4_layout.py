# Planner tests on generated trees: errors and options (table-driven), determinism, and the oracles
# e2fsck -fn (every image) and dissect.extfs (an independent reader of the structures).
from __future__ import annotations

import hashlib
import io
import random
import stat
from pathlib import Path

import pytest
from dissect.extfs import ExtFS

from kloset_blocks.errors import LayoutError
from kloset_blocks.ext4 import PlanOptions, plan
from kloset_blocks.ext4.layout import BYTES, FILE, ZERO
from kloset_blocks.image.block import BlockImage
from kloset_blocks.tree import BytesData, Node
from tests.ext4util import PatternData, assert_fsck_clean, write_image

T = 1_700_000_000_123_456_789
MiB = 1 << 20


def d(path: bytes, mode: int = 0o755, **kw) -> Node:
    return Node(
        path=path,
        mode=stat.S_IFDIR | mode,
        uid=kw.pop("uid", 1000),
        gid=kw.pop("gid", 1000),
        mtime_ns=T,
        **kw,
    )


def f(path: bytes, content: bytes = b"", mode: int = 0o644, **kw) -> Node:
    return Node(
        path=path,
        mode=stat.S_IFREG | mode,
        uid=kw.pop("uid", 1000),
        gid=kw.pop("gid", 1000),
        mtime_ns=T,
        size=len(content),
        data=BytesData(content) if content else None,
        **kw,
    )


def ln(path: bytes, target: bytes) -> Node:
    return Node(
        path=path,
        mode=stat.S_IFLNK | 0o777,
        uid=0,
        gid=0,
        mtime_ns=T,
        symlink_target=target,
        size=len(target),
    )


def hl(path: bytes, to: bytes) -> Node:
    return Node(path=path, mode=stat.S_IFREG, uid=0, gid=0, mtime_ns=T, hardlink_to=to)


class ImageFile(io.RawIOBase):
    """A BlockImage as a read-only seekable file, for dissect.extfs."""

    def __init__(self, img: BlockImage) -> None:
        self.img, self.pos = img, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, off: int, whence: int = 0) -> int:
        self.pos = off if whence == 0 else (self.pos + off if whence == 1 else self.img.size + off)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self.img.size - self.pos))
        self.img.readinto(memoryview(b)[:n], self.pos)
        self.pos += n
        return n


def extfs(layout) -> ExtFS:
    return ExtFS(io.BufferedReader(ImageFile(BlockImage(layout)), 1 << 16))


SMALL = [
    d(b"/"),
    d(b"/etc"),
    f(b"/etc/passwd", b"root:x:0:0\n"),
    f(b"/empty"),
    f(b"/block", b"B" * 4096),
    f(b"/block1", b"C" * 4097),
    ln(b"/fast", b"etc/passwd"),
    ln(b"/slow", b"x/" * 40),
    hl(b"/hard", b"/etc/passwd"),
    Node(b"/fifo", stat.S_IFIFO | 0o600, 0, 0, T),
    Node(b"/sock", stat.S_IFSOCK | 0o755, 0, 0, T),
    Node(b"/null", stat.S_IFCHR | 0o666, 0, 0, T, rdev=(1 << 8) | 3),
]


def test_small_tree_fsck_and_dissect(tmp_path: Path):
    layout = plan(SMALL, PlanOptions(free_bytes=8 * MiB))
    assert_fsck_clean(write_image(layout, tmp_path / "a.img"))
    fs = extfs(layout)
    assert set(fs.get("/").listdir()) == {
        ".",
        "..",
        "etc",
        "empty",
        "block",
        "block1",
        "fast",
        "slow",
        "hard",
    } | {
        "fifo",
        "sock",
        "null",
    }
    assert fs.get("/etc/passwd").open().read() == b"root:x:0:0\n"
    assert fs.get("/block1").open().read() == b"C" * 4097
    assert fs.get("/hard").inum == fs.get("/etc/passwd").inum
    assert fs.get("/etc/passwd").inode.i_links_count == 2
    assert fs.get("/fast").link == "etc/passwd" and fs.get("/slow").link == "x/" * 40
    assert fs.get("/").inode.i_links_count == 3  # ".", "..", etc/..
    assert fs.get("/").inum == 2
    assert layout.used_inodes == 10 + 10  # reserved 1..10 (root is 2), then one per non-root inode


def test_region_kinds_cover_image():
    layout = plan(SMALL, PlanOptions(free_bytes=8 * MiB))
    pos = 0
    for r in layout.regions:
        assert r.start == pos and r.length > 0 and r.kind in (BYTES, ZERO, FILE)
        pos += r.length
    assert pos == layout.size == layout.blocks_count * 4096
    files = [r for r in layout.regions if r.kind == FILE]
    assert [r.src_len for r in files] == [4096, 4097, 11]  # inode order: block, block1, etc/passwd
    assert all(r.start >= layout.data_start_block * 4096 for r in files)


@pytest.mark.parametrize(
    ("nodes", "options", "message"),
    [
        ([d(b"/"), f(b"/" + b"n" * 256)], {}, "longer than 255"),
        ([d(b"/"), f(b"/a\0b")], {}, "NUL"),
        ([d(b"/"), f(b"/a"), f(b"/a")], {}, "duplicate"),
        ([d(b"/"), d(b"/d"), hl(b"/x", b"/d")], {}, "hard link to a directory"),
        ([d(b"/"), Node(b"/r", stat.S_IFREG | 0o644, 0, 0, 0, size=5)], {}, "without data"),
        ([d(b"/"), ln(b"/l", b"")], {}, "symlink without target"),
        ([d(b"/"), ln(b"/l", b"t" * 4096)], {}, "longer than 4095"),
        ([d(b"/"), Node(b"/w", 0o644, 0, 0, 0)], {}, "unsupported file type"),
        ([d(b"/"), f(b"/a", b"x"), f(b"/a/b", b"y")], {}, "not a directory"),
        ([d(b"/"), f(b"/a", b"x")], {"root": b"/a"}, "is not a directory"),
        ([d(b"/")], {"on_bad_name": "maybe"}, "on_bad_name"),
    ],
)
def test_plan_errors(nodes, options, message):
    with pytest.raises(LayoutError, match=message):
        plan(nodes, PlanOptions(free_bytes=0, **options))


def test_bad_name_error_names_the_path():
    with pytest.raises(LayoutError) as e:
        plan([d(b"/"), d(b"/dir"), f(b"/dir/" + b"\xff" * 300)])
    assert str(e.value).startswith("cannot represent b'/dir/\\xff")
    assert "--" not in str(e.value)  # the planner names its own option, not a CLI flag


def test_skip_bad_names_and_descendants(tmp_path: Path):
    bad = b"/" + b"z" * 300
    nodes = [d(b"/"), f(b"/ok", b"1"), d(bad), f(bad + b"/child", b"2"), f(b"/nul\0", b"3")]
    layout = plan(nodes, PlanOptions(free_bytes=0, on_bad_name="skip"))
    assert len(layout.warnings) == 2 and all("skipped" in w for w in layout.warnings)
    assert_fsck_clean(write_image(layout, tmp_path / "s.img"))
    assert set(extfs(layout).get("/").listdir()) == {".", "..", "ok"}


def test_reroot_owner_remap_and_implicit_parents(tmp_path: Path):
    nodes = [
        d(b"/"),
        f(b"/outside", b"no"),
        d(b"/srv/pg", mode=0o700, uid=26),
        f(b"/srv/pg/PG_VERSION", b"15\n", uid=26),
        f(b"/srv/pg/base/1/1259", b"x" * 9000, uid=26),  # base and base/1 are not in the tree
        hl(b"/srv/pg/link", b"/outside"),  # hard link whose target is outside the subtree
        hl(b"/srv/pg/link2", b"/outside"),
    ]
    nodes[5].mode, nodes[5].size, nodes[5].data = stat.S_IFREG | 0o600, 2, BytesData(b"no")
    layout = plan(nodes, PlanOptions(root=b"/srv/pg/", uid=999, gid=998, free_bytes=MiB))
    assert_fsck_clean(write_image(layout, tmp_path / "r.img"))
    fs = extfs(layout)
    assert set(fs.get("/").listdir()) == {".", "..", "PG_VERSION", "base", "link", "link2"}
    assert fs.get("/base/1/1259").open().read() == b"x" * 9000
    assert fs.get("/link").open().read() == b"no" and fs.get("/link").inum == fs.get("/link2").inum
    assert fs.get("/link").inode.i_links_count == 2
    for p in ("/", "/PG_VERSION", "/base", "/base/1", "/link"):
        i = fs.get(p).inode
        assert (i.i_uid | i.i_uid_high << 16, i.i_gid | i.i_gid_high << 16) == (999, 998), p
    assert fs.get("/").inode.i_mode == stat.S_IFDIR | 0o700


def _metadata_digest(layout) -> str:
    h = hashlib.sha256()
    img = BlockImage(layout)
    for r in layout.regions:
        h.update(repr((r.start, r.length, r.kind, r.src_offset, r.src_len)).encode())
        if r.kind == BYTES:
            h.update(img.pread(r.start, r.length))
    return h.hexdigest()


def test_deterministic_whatever_the_input_order():
    nodes = [d(b"/")] + [d(b"/d%d" % i) for i in range(20)]
    nodes += [f(b"/d%d/f%d" % (i % 20, i), b"%d" % i * 100) for i in range(300)]
    a = plan(list(nodes), PlanOptions(label=b"x"))
    shuffled = list(nodes)
    random.Random(1).shuffle(shuffled)
    b = plan(shuffled, PlanOptions(label=b"x"))
    assert _metadata_digest(a) == _metadata_digest(b) and a.uuid == b.uuid
    c = plan(list(nodes), PlanOptions(label=b"y"))
    assert c.uuid != a.uuid


def test_large_directory(tmp_path: Path):
    names = [b"file-%06d" % i for i in range(20000)]
    nodes = [d(b"/"), d(b"/big")] + [f(b"/big/" + n, b"%d" % i) for i, n in enumerate(names)]
    layout = plan(nodes, PlanOptions(free_bytes=0))
    assert_fsck_clean(write_image(layout, tmp_path / "big.img", data=False))
    fs = extfs(layout)
    listing = fs.get("/big").listdir()
    assert len(listing) == 20002
    assert fs.get("/big/file-019999").open().read() == b"19999"
    assert fs.get("/big").inode.i_size_lo == 99 * 4096  # 20 bytes a record: 204 records a block


def test_many_extents_metadata(tmp_path: Path):
    """A 640 MiB + 1 file (6 extents: depth-1 tree) and a 300 GiB one (depth 2): e2fsck checks every
    extent tree; the data itself is left as holes (e2fsck does not read it)."""
    sizes = [640 * MiB + 1, 300 << 30, 128 * MiB + 5]
    nodes = [d(b"/")] + [
        Node(b"/f%d" % i, stat.S_IFREG | 0o644, 0, 0, T, size=s, data=PatternData(s, i))
        for i, s in enumerate(sizes)
    ]
    layout = plan(nodes, PlanOptions(free_bytes=0))
    assert_fsck_clean(write_image(layout, tmp_path / "x.img", data=False))
    fs = extfs(layout)
    for i, s in enumerate(sizes):
        ino = fs.get(f"/f{i}")
        assert ino.size == s
        runs = ino.dataruns()
        assert sum(n for _, n in runs) == -(-s // 4096)
        # contiguous: each run starts where the previous ended
        assert all(runs[k][0] + runs[k][1] == runs[k + 1][0] for k in range(len(runs) - 1))
    big = fs.get("/f0").open()
    big.seek(640 * MiB - 10)
    assert big.read(11) == PatternData(sizes[0], 0).read(640 * MiB - 10, 11)


def test_inode_room_and_free_space():
    layout = plan([d(b"/"), f(b"/a", b"a" * 10000)], PlanOptions(free_bytes=3 << 30))
    assert layout.size >= 3 << 30
    assert layout.inodes_count - layout.used_inodes >= 65536
    assert layout.blocks_count - layout.used_blocks >= (3 << 30) // 4096
