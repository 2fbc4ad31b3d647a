# The nbdkit plugin, driven through real nbdkit and libnbd (upstream's test pattern: nbdkit -s
# --exit-with-parent under connect_command, one fact per test). The oracle for every byte is the
# in-process BlockImage built from the same snapshot with the same options; the image itself is
# judged by e2fsck in the ext4 tests and again here on what nbdcopy copied out of the server.
from __future__ import annotations

import random
import shutil
import subprocess
import threading
from pathlib import Path

import nbd
import pytest

from kloset_blocks.image.snapshot import chunk_macs
from kloset_blocks.serving.server import Server
from tests.conftest import REPO
from tests.store_helpers import SNAP_A_PLAIN, SNAP_B_PLAIN

PLUGIN = str(REPO / "nbdplugin" / "kloset.py")
SNAP_A = "bf6afbae"
SNAP_B = "3b116f40"


def nbdkit_argv(store: Path, *params: str) -> list[str]:
    return ["nbdkit", "-s", "--exit-with-parent", "python", PLUGIN, f"store={store}", *params]


def connect(store: Path, *params: str, export: str = "") -> nbd.NBD:
    h = nbd.NBD()
    h.set_export_name(export)
    h.set_opt_mode(False)
    h.connect_command(nbdkit_argv(store, *params))
    return h


@pytest.fixture(scope="module")
def store(fixtures_dir: Path) -> Path:
    return fixtures_dir / "golden-plain"


@pytest.fixture(scope="module")
def oracle(store: Path) -> Server:
    """The same export built in this process: the byte oracle for the plugin."""
    server = Server()
    for key, value in (("store", str(store)), ("snapshot", SNAP_A)):
        server.configure(key, value)
    server.config_complete()
    server.get_ready()
    return server


def image_of(server: Server):
    return server.exports[server.default_export].image


def test_size_and_flags(store: Path, oracle: Server) -> None:
    h = connect(store, f"snapshot={SNAP_A}")
    assert h.get_size() == image_of(oracle).size
    assert h.is_read_only()
    assert h.can_multi_conn()
    assert h.can_cache()
    assert h.get_block_size(nbd.SIZE_PREFERRED) >= 64 * 1024
    h.shutdown()


def test_random_reads_equal_the_image(store: Path, oracle: Server) -> None:
    image = image_of(oracle)
    h = connect(store, f"snapshot={SNAP_A}")
    rng = random.Random(1)
    data_end = min(image.size, 256 << 20)
    for _ in range(300):
        length = rng.choice([1, 511, 4096, 8192, 65536, 200_000, 1 << 20])
        offset = rng.randrange(0, data_end - length)
        assert h.pread(length, offset) == image.pread(offset, length), (offset, length)
    h.shutdown()


def test_parallel_readers_over_four_connections(store: Path, oracle: Server) -> None:
    image = image_of(oracle)
    handles = [connect(store, f"snapshot={SNAP_A}") for _ in range(4)]
    failures: list[tuple[int, int]] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        h = handles[seed % 4]
        for _ in range(40):
            length = rng.choice([4096, 65536, 131072])
            offset = rng.randrange(0, min(image.size, 128 << 20) - length)
            if h.pread(length, offset) != image.pread(offset, length):
                failures.append((offset, length))

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    for h in handles:
        h.shutdown()


def test_extents_report_free_space_as_holes(store: Path, oracle: Server) -> None:
    image = image_of(oracle)
    h = connect(store, f"snapshot={SNAP_A}")
    seen: list[tuple[int, int, int]] = []

    def callback(metacontext: str, offset: int, entries: list[int], err: int) -> int:
        if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
            pos = offset
            for i in range(0, len(entries), 2):
                seen.append((pos, entries[i], entries[i + 1]))
                pos += entries[i]
        return 0

    h2 = nbd.NBD()
    h2.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h2.connect_command(nbdkit_argv(store, f"snapshot={SNAP_A}"))
    offset = 0
    while offset < image.size:
        before = len(seen)
        h2.block_status(min(image.size - offset, 1 << 30), offset, callback)
        offset = seen[-1][0] + seen[-1][1]
        assert len(seen) > before
    hole_bytes = sum(length for _, length, flags in seen if flags & nbd.STATE_HOLE)
    expected = sum(length for _, length, zero in image.extents(0, image.size) if zero)
    assert hole_bytes == expected > image.size // 2  # the virtual free space is most of the image
    for pos, length, flags in seen:
        if flags & nbd.STATE_ZERO:
            probe = min(length, 65536)
            assert h.pread(probe, pos) == bytes(probe)
    h.shutdown()
    h2.shutdown()


def test_list_exports_has_one_per_snapshot(store: Path) -> None:
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_command(nbdkit_argv(store))
    names: list[tuple[str, str]] = []
    h.opt_list(lambda name, description: names.append((name, description)) or 0)
    h.opt_abort()
    # Named by the full snapshot id; the 8-hex short id is an alias of the same export.
    assert sorted(n for n, _ in names) == sorted([SNAP_A_PLAIN, SNAP_B_PLAIN])
    assert all("snapshot" in d for _, d in names)


def test_second_export_serves_the_other_snapshot(store: Path) -> None:
    server = Server()
    for key, value in (("store", str(store)), ("snapshot", SNAP_B)):
        server.configure(key, value)
    server.config_complete()
    server.get_ready()
    image_b = image_of(server)
    h = connect(store, f"snapshot={SNAP_A}", export=SNAP_B)
    assert h.get_size() == image_b.size
    assert h.pread(1 << 20, 0) == image_b.pread(0, 1 << 20)
    h.shutdown()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (("snapshot=ffffffff",), "no snapshot has prefix"),
        (("bogus=1",), "unknown parameter bogus="),
        (("cache=lots",), "not a size"),
        (("owner=no-such-user-here",), "no such user"),
    ],
)
def test_bad_parameters_fail_at_startup_with_one_line(
    store: Path, params: tuple[str, ...], message: str, tmp_path: Path
) -> None:
    # A socket path of our own, not `-U -`: nbdkit 1.32 leaves the temporary directory of `-U -`
    # behind whenever startup fails, even with its own file plugin.
    sock = tmp_path / "nbd.sock"
    proc = subprocess.run(
        ["nbdkit", "-f", "-U", str(sock), "python", PLUGIN, f"store={store}", *params, "--run", "true"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert list(tmp_path.iterdir()) == []  # no socket left behind


def test_nbdcopy_of_whole_export_equals_image_and_passes_e2fsck(
    store: Path, oracle: Server, tmp_path: Path
) -> None:
    copied = tmp_path / "copy.img"
    expected = tmp_path / "expected.img"
    subprocess.run(
        [
            "nbdcopy",
            "--",
            "[",
            "nbdkit",
            "python",
            PLUGIN,
            f"store={store}",
            f"snapshot={SNAP_A}",
            "]",
            str(copied),
        ],
        check=True,
        timeout=300,
    )
    image_of(oracle).write_sparse(expected)
    assert filecmp_large(copied, expected)
    fsck = subprocess.run(["e2fsck", "-fn", str(copied)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_journal_parameter_gives_a_journaled_filesystem(store: Path, oracle: Server, tmp_path: Path) -> None:
    """journal=true (what kloset-blocks passes for a kept --overlay): the copied export is a
    journaled ext4 that e2fsck passes, holding the same files (same data start) as without."""
    copied = tmp_path / "journal.img"
    argv = ["nbdkit", "python", PLUGIN, f"store={store}", f"snapshot={SNAP_A}", "journal=true"]
    subprocess.run(["nbdcopy", "--", "[", *argv, "]", str(copied)], check=True, timeout=300)
    fsck = subprocess.run(["e2fsck", "-fn", str(copied)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    header = subprocess.run(["dumpe2fs", "-h", str(copied)], capture_output=True, text=True).stdout
    assert "has_journal" in header and "Journal inode:            8" in header
    plain = image_of(oracle).layout
    with open(copied, "rb") as f:  # the first data block is where it is without a journal
        f.seek(plain.data_start_block * 4096)
        assert f.read(4096) == image_of(oracle).pread(plain.data_start_block * 4096, 4096)


def filecmp_large(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def test_corrupted_chunk_gives_eio_there_and_correct_bytes_elsewhere(
    store: Path, oracle: Server, tmp_path: Path
) -> None:
    from kloset_blocks.store import open_store
    from kloset_blocks.store.codec import RT_CHUNK

    broken = tmp_path / "store"
    shutil.copytree(store, broken)
    subprocess.run(["chmod", "-R", "u+w", str(broken)], check=True)
    damaged = open_store(str(broken))
    victim = damaged.open_snapshot(SNAP_A).open_file(b"/base/1/1259")  # pg_class of template1
    mac = victim.macs[0]
    loc = damaged.locate(RT_CHUNK, mac)
    with open(damaged.packfiles.path(loc.packfile), "r+b") as f:
        f.seek(16 + loc.offset + loc.length // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))

    image = image_of(oracle)
    offset = first_offset_using(image, mac)
    assert mac in set(chunk_macs(image, offset, 4096))
    h = connect(broken, f"snapshot={SNAP_A}")
    with pytest.raises(nbd.Error) as info:
        h.pread(4096, offset)
    assert info.value.errno == "EIO"
    # Metadata and other files still read right, and the server still serves.
    assert h.pread(4096, 0) == image.pread(0, 4096)
    other = first_offset_using(image, other_chunk(image, mac))
    assert h.pread(4096, other) == image.pread(other, 4096)
    h.shutdown()


def first_offset_using(image, mac: bytes) -> int:
    """The first 4 KiB-aligned image offset whose read needs chunk `mac`."""
    for data, _, _ in image.file_ranges(0, image.size):
        if mac in getattr(data, "macs", ()):
            index = data.macs.index(mac)
            start = data.offsets[index]
            region = next(r for r in image.regions if r.source is data)
            return region.start + (start - region.src_offset) // 4096 * 4096
    raise AssertionError("chunk not used")


def other_chunk(image, mac: bytes) -> bytes:
    for data, _, _ in image.file_ranges(0, image.size):
        for m in getattr(data, "macs", ()):
            if m != mac:
                return m
    raise AssertionError("no other chunk")


def test_dump_plugin_lists_every_parameter() -> None:
    from kloset_blocks.serving.server import CONFIG_KEYS

    out = subprocess.run(
        ["nbdkit", "python", PLUGIN, "--dump-plugin"], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    lines = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert lines["kloset_config_keys"].split(",") == list(CONFIG_KEYS)
    assert lines["thread_model"] == "parallel"
    assert {"store", "snapshot", "passphrase", "cache"} <= set(CONFIG_KEYS)


@pytest.mark.parametrize(
    ("cmdline", "foreground"),
    [
        (b"nbdkit\0-f\0-r\0-U\0/run/x.sock\0python\0kloset.py\0store=s3://h/b\0", True),
        (b"/usr/sbin/nbdkit\0--foreground\0python\0kloset.py\0", True),
        (b"nbdkit\0-s\0--exit-with-parent\0python\0kloset.py\0", True),
        (b"nbdkit\0-r\0-U\0/run/x.sock\0python\0kloset.py\0", False),  # forks after get_ready
        (b"nbdkit\0-U\0-fx\0python\0kloset.py\0", False),  # a socket named -fx, no -f
        (b"nbdkit\0-f\0-U\0-\0--run\0qemu-img info $nbd\0python\0kloset.py\0", False),  # captive: forks
        (b"nbdkit\0-f\0--run=true\0python\0kloset.py\0", False),
        (b"python3\0-m\0pytest\0-f\0", False),  # not nbdkit
        (b"", False),
    ],
)
def test_the_image_is_built_in_after_fork_only_in_an_nbdkit_that_never_forks(
    cmdline: bytes, foreground: bool, tmp_path: Path
) -> None:
    from kloset_blocks.serving.server import nbdkit_in_foreground

    path = tmp_path / "cmdline"
    path.write_bytes(cmdline)
    assert nbdkit_in_foreground(str(path)) is foreground
    assert nbdkit_in_foreground(str(tmp_path / "absent")) is False
