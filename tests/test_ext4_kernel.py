# The kernel as the oracle: images mounted on loop devices (read-only, and a copy read-write),
# compared file by file with the source tree; e2fsck -fn after writes; mke2fs -d on the same tree
# as a reference for features and counts. Every loop device and mount is released in finally.
from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
from pathlib import Path

import pytest
from dissect.extfs.c_ext import c_ext
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kloset_blocks.ext4 import PlanOptions, plan
from kloset_blocks.image.localtree import walk
from kloset_blocks.tree import BytesData, Node
from tests.ext4util import (
    PatternData,
    assert_fsck_clean,
    compare_tree,
    debugfs,
    dumpe2fs,
    flags_of,
    loop_mount,
    write_image,
)

pytestmark = pytest.mark.root
MiB = 1 << 20


def make_source(root: Path) -> Path:
    """A local tree with every kind of node the planner handles."""
    r = os.fsencode(root)
    os.makedirs(r + b"/deep/" + b"/".join(b"d%d" % i for i in range(30)))
    os.makedirs(r + b"/pg/base/1")
    with open(r + b"/pg/PG_VERSION", "wb") as f:
        f.write(b"15\n")
    for name, size in [
        (b"empty", 0),
        (b"one", 1),
        (b"block", 4096),
        (b"block+1", 4097),
        (b"mid", 3 * MiB + 7),
    ]:
        with open(r + b"/pg/base/1/" + name, "wb") as f:
            f.write(os.urandom(size))
    os.makedirs(r + b"/names")
    for name in (b"\xff\xfe-latin1-\xe9", b"n" * 255, b"sp ace", b"new\nline", "ünï".encode()):
        with open(r + b"/names/" + name, "wb") as f:
            f.write(name)
    os.symlink(b"pg/PG_VERSION", r + b"/fast")
    os.symlink(b"t" * 59, r + b"/fast59")
    os.symlink(b"t" * 60, r + b"/slow60")
    os.symlink(b"/" + b"x" * 3000, r + b"/slow3000")
    os.link(r + b"/pg/PG_VERSION", r + b"/hard1")
    os.link(r + b"/pg/PG_VERSION", r + b"/names/hard2")
    os.mkfifo(r + b"/fifo", 0o640)
    os.mknod(r + b"/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(r + b"/bigdev", 0o600 | stat.S_IFBLK, os.makedev(259, 300000))
    s = socket.socket(socket.AF_UNIX)
    s.bind(os.fsdecode(r + b"/sock"))
    s.close()
    for name, mode in [(b"suid", 0o4755), (b"sgid", 0o2711), (b"none", 0o000)]:
        with open(r + b"/" + name, "wb") as f:
            f.write(b"m")
        os.chmod(r + b"/" + name, mode)
    os.makedirs(r + b"/sticky")
    os.chmod(r + b"/sticky", 0o1777)
    os.chown(r + b"/pg/PG_VERSION", 70000, 1234567)
    os.utime(r + b"/pg/base/1/one", ns=(0, -1_234_567_891))  # before 1970
    os.utime(r + b"/pg/base/1/mid", ns=(0, (2**32 + 17) * 10**9 + 5))  # after 2106
    return root


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return make_source(tmp_path_factory.mktemp("src") / "tree")


def test_local_tree_mounted_read_only(source: Path, tmp_path: Path):
    nodes = list(walk(source))
    layout = plan(nodes, PlanOptions(free_bytes=64 * MiB))
    img = write_image(layout, tmp_path / "ro.img")
    assert_fsck_clean(img)
    with loop_mount(img, tmp_path / "mnt") as mnt:
        assert compare_tree(nodes, mnt) == len(nodes)
    header = dumpe2fs(img, header_only=True)
    assert "needs_recovery" not in header and flags_of(header, "Filesystem state") == "clean"


def test_owner_remap_and_pgdata_root(source: Path, tmp_path: Path):
    nodes = list(walk(source))
    layout = plan(nodes, PlanOptions(root=b"/pg", uid=123, gid=456, free_bytes=8 * MiB))
    img = write_image(layout, tmp_path / "pg.img")
    assert_fsck_clean(img)
    sub = [
        Node(**{**{k: getattr(n, k) for k in Node.__slots__}, "path": n.path[3:] or b"/"})
        for n in nodes
        if n.path == b"/pg" or n.path.startswith(b"/pg/")
    ]
    with loop_mount(img, tmp_path / "mnt") as mnt:
        compare_tree(sub, mnt, uid=123, gid=456)
        assert os.stat(mnt).st_uid == 123


def test_read_write_mount_then_fsck(source: Path, tmp_path: Path):
    layout = plan(list(walk(source)), PlanOptions())  # default free space: 1 GiB
    img = write_image(layout, tmp_path / "rw.img")
    groups = [line for line in dumpe2fs(img).splitlines() if line.startswith("Group ") and "(Blocks" in line]
    assert len(groups) == layout.groups
    # dumpe2fs prints bg_flags only with gdt_csum/metadata_csum, so read the descriptors themselves.
    with open(img, "rb") as f:
        f.seek(4096)
        gdt = f.read(64 * layout.groups)
    flags = [c_ext.ext4_group_desc(gdt[64 * g : 64 * g + 64]).bg_flags for g in range(layout.groups)]
    assert flags == [0x4] * layout.groups  # EXT4_BG_INODE_ZEROED only: no lazy itable init on mount
    copy = tmp_path / "copy.img"
    shutil.copyfile(img, copy)
    with loop_mount(copy, tmp_path / "mnt", readonly=False) as mnt:
        chunk = os.urandom(MiB)
        with open(mnt / "big.bin", "wb") as f:
            for _ in range(500):
                f.write(chunk)
        os.makedirs(mnt / "new" / "dir")
        for i in range(200):
            (mnt / "new" / f"f{i}").write_bytes(b"x" * (i * 100))
        os.remove(os.fsencode(mnt) + b"/pg/base/1/mid")
        shutil.rmtree(mnt / "deep")
        os.sync()
    assert_fsck_clean(copy)
    with loop_mount(copy, tmp_path / "mnt2") as mnt:
        assert os.path.getsize(mnt / "big.bin") == 500 * MiB
        assert not os.path.exists(mnt / "deep")
    # the lazy-init thread never ran: no writes happened to the pristine image
    assert_fsck_clean(img)


def test_large_file_many_extents(tmp_path: Path):
    """640 MiB + 1 needs 6 extents (a depth-1 tree with a leaf block); 129 MiB crosses a group."""
    sizes = {b"/seg.1": 640 * MiB + 1, b"/seg.2": 129 * MiB, b"/small": 10}
    nodes = [Node(b"/", stat.S_IFDIR | 0o700, 0, 0, 0)] + [
        Node(p, stat.S_IFREG | 0o600, 0, 0, 10**18, size=s, data=PatternData(s, i))
        for i, (p, s) in enumerate(sizes.items())
    ]
    layout = plan(nodes, PlanOptions(free_bytes=16 * MiB))
    img = write_image(layout, tmp_path / "big.img")
    assert_fsck_clean(img)
    ex = debugfs(img, "ex /seg.1")
    assert "Level Entries" in ex and ex.count("0/ 1") >= 1  # a depth-1 tree
    with loop_mount(img, tmp_path / "mnt") as mnt:
        compare_tree(nodes, mnt)


name_st = st.binary(min_size=1, max_size=255).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b"..")
)


@st.composite
def trees(draw) -> list[Node]:
    nodes = [Node(b"/", stat.S_IFDIR | draw(st.integers(0, 0o7777)), draw(st.integers(0, 2**32 - 2)), 0, 0)]
    dirs = [b"/"]
    files: list[bytes] = []
    for _ in range(draw(st.integers(0, 25))):
        parent = draw(st.sampled_from(dirs))
        path = (parent if parent != b"/" else b"") + b"/" + draw(name_st)
        if any(n.path == path for n in nodes):
            continue
        kind = draw(st.sampled_from(["dir", "file", "file", "link", "hard", "fifo", "chr", "sock"]))
        mode = draw(st.integers(0, 0o7777))
        uid, gid = draw(st.integers(0, 2**32 - 2)), draw(st.integers(0, 2**32 - 2))
        mtime = draw(st.integers(-(2**31) * 10**9, (2**34 - 2**31 - 1) * 10**9))
        if kind == "dir":
            nodes.append(Node(path, stat.S_IFDIR | mode, uid, gid, mtime))
            dirs.append(path)
        elif kind == "file" or (kind == "hard" and not files):
            content = draw(st.binary(max_size=9000))
            nodes.append(
                Node(path, stat.S_IFREG | mode, uid, gid, mtime, len(content), data=BytesData(content))
            )
            files.append(path)
        elif kind == "hard":
            nodes.append(Node(path, stat.S_IFREG, 0, 0, 0, hardlink_to=draw(st.sampled_from(files))))
        elif kind == "link":
            target = draw(st.binary(min_size=1, max_size=200).filter(lambda b: b"\0" not in b))
            nodes.append(
                Node(path, stat.S_IFLNK | 0o777, uid, gid, mtime, len(target), symlink_target=target)
            )
        elif kind == "chr":
            rdev = os.makedev(draw(st.integers(0, 4095)), draw(st.integers(0, 2**20 - 1)))
            nodes.append(Node(path, stat.S_IFCHR | mode, uid, gid, mtime, rdev=rdev))
        else:
            nodes.append(
                Node(path, (stat.S_IFIFO if kind == "fifo" else stat.S_IFSOCK) | mode, uid, gid, mtime)
            )
    return nodes


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(nodes=trees())
def test_generated_trees(nodes: list[Node], tmp_path: Path):
    layout = plan(nodes, PlanOptions(free_bytes=0))
    img = write_image(layout, tmp_path / "h.img")
    assert_fsck_clean(img)
    # Symlink modes read back as 0777 on Linux whatever is stored; the generator uses 0777.
    with loop_mount(img, tmp_path / "hmnt") as mnt:
        compare_tree(nodes, mnt)


MKE2FS_FEATURES = "^has_journal,^resize_inode,^metadata_csum,^dir_index,^ext_attr,sparse_super2,^orphan_file"
MKE2FS = ["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-O", MKE2FS_FEATURES]
MKE2FS += ["-E", "num_backup_sb=0,lazy_itable_init=0,root_owner=0:0"]


def test_against_mke2fs(source: Path, tmp_path: Path):
    nodes = list(walk(source))
    layout = plan(nodes, PlanOptions(free_bytes=64 * MiB, uid=0, gid=0))
    ours = write_image(layout, tmp_path / "ours.img")
    ref = tmp_path / "ref.img"
    subprocess.run(
        [*MKE2FS, "-d", str(source), str(ref), "512M"],
        check=True,
        capture_output=True,
    )
    assert_fsck_clean(ref)
    h_ours, h_ref = dumpe2fs(ours, True), dumpe2fs(ref, True)
    assert set(flags_of(h_ours, "Filesystem features").split()) == set(
        flags_of(h_ref, "Filesystem features").split()
    )
    for key in ("Block size", "Inode size", "Required extra isize", "Desired extra isize", "First inode"):
        assert flags_of(h_ours, key) == flags_of(h_ref, key), key
    # Same number of used inodes (mke2fs adds lost+found) and the same directory count.
    used = lambda h: int(flags_of(h, "Inode count")) - int(flags_of(h, "Free inodes"))  # noqa: E731
    assert used(h_ours) + 1 == used(h_ref)
    for path in ("/pg/base/1/mid", "/hard1", "/slow3000", "/fast", "/bigdev", "/sticky"):
        a, b = _stat_fields(debugfs(ours, f"stat {path}")), _stat_fields(debugfs(ref, f"stat {path}"))
        assert a == b, path
    assert debugfs(ours, "ex /pg/base/1/mid").count("\n") == debugfs(ref, "ex /pg/base/1/mid").count("\n")


def _stat_fields(out: str) -> dict[str, str]:
    """The debugfs stat fields that do not depend on placement: type, mode, size, links, flags, device."""
    import re

    fields = {}
    for key in ("Type", "Mode", "Links", "Flags", "Size", "Device major/minor number", "Fast link dest"):
        m = re.search(re.escape(key) + r":\s*(\S+)", out)
        fields[key] = m.group(1) if m else ""
    return fields


# --- the journal (PlanOptions.journal, for kept overlays) ------------------------------------------


def _journal_head(img: Path) -> bytes:
    """The first 1024 bytes of inode 8's data (the journal superblock), read by debugfs."""
    out = subprocess.run(["debugfs", "-R", "cat <8>", str(img)], check=True, capture_output=True).stdout
    return out[:1024]


def test_journal_against_mke2fs(source: Path, tmp_path: Path):
    layout = plan(list(walk(source)), PlanOptions(free_bytes=64 * MiB, uid=0, gid=0, journal=True))
    ours = write_image(layout, tmp_path / "ours.img")
    assert_fsck_clean(ours)
    ref = tmp_path / "ref.img"
    features = MKE2FS_FEATURES.replace("^has_journal", "has_journal")
    options = "num_backup_sb=0,lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0"
    argv = [*MKE2FS[:-4], "-O", features, "-E", options]
    subprocess.run(
        [*argv, "-d", str(source), str(ref), f"{layout.size // 1024}k"], check=True, capture_output=True
    )
    h_ours, h_ref = dumpe2fs(ours, True), dumpe2fs(ref, True)
    assert "has_journal" in flags_of(h_ours, "Filesystem features").split()
    assert set(flags_of(h_ours, "Filesystem features").split()) == set(
        flags_of(h_ref, "Filesystem features").split()
    )
    for key in (
        "Journal inode",
        "Journal backup",
        "Journal features",
        "Total journal blocks",
        "Journal start",
    ):
        assert flags_of(h_ours, key) == flags_of(h_ref, key), key
    assert "needs_recovery" not in h_ours
    # The journal superblock is mke2fs's, byte for byte, but for the UUID (the filesystem's own).
    a, b = _journal_head(ours), _journal_head(ref)
    uuid = slice(0x30, 0x40)
    assert a[uuid] == layout.uuid
    assert a[: uuid.start] + a[uuid.stop :] == b[: uuid.start] + b[uuid.stop :]


def test_journal_replayed_after_a_crash(source: Path, tmp_path: Path):
    """A copy taken while the filesystem is mounted read-write is what a crash leaves: it needs
    recovery, `e2fsck -p` replays the journal, and the result is clean and holds what was synced."""
    nodes = list(walk(source))
    layout = plan(nodes, PlanOptions(free_bytes=64 * MiB, journal=True))
    img = write_image(layout, tmp_path / "j.img")
    crash = tmp_path / "crash.img"
    with loop_mount(img, tmp_path / "mnt", readonly=False) as mnt:
        os.makedirs(mnt / "new")
        for i in range(300):
            (mnt / "new" / f"f{i}").write_bytes(b"y" * (i * 37))
        os.remove(mnt / "hard1")
        os.sync()
        subprocess.run(["cp", "--sparse=always", str(img), str(crash)], check=True)
    assert "needs_recovery" in flags_of(dumpe2fs(crash, True), "Filesystem features").split()
    r = subprocess.run(["e2fsck", "-p", str(crash)], capture_output=True, text=True)
    assert r.returncode in (0, 1), r.stdout + r.stderr  # 1: errors corrected (the journal replayed)
    assert "needs_recovery" not in flags_of(dumpe2fs(crash, True), "Filesystem features").split()
    assert_fsck_clean(crash)
    assert_fsck_clean(img)  # the cleanly unmounted original too
    with loop_mount(crash, tmp_path / "mnt2") as mnt:
        assert sorted(os.listdir(mnt / "new")) == sorted(f"f{i}" for i in range(300))
        assert (mnt / "new" / "f299").read_bytes() == b"y" * (299 * 37)
        assert not (mnt / "hard1").exists()
