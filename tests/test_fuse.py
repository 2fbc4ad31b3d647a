# The pyfuse3 views through real syscalls: `kloset-blocks expose` / `browse` run as subprocesses
# (pyfuse3's own test pattern: start, wait for the mount, os.* calls, unmount in finally).
#
# Oracles: for the image file, the in-process BlockImage built from the same snapshot with the same
# options, e2fsck, and the fixture manifest's sha256s read back through the kernel's ext4 on a loop
# device; for the tree, the in-process reader's entries and bytes and the manifest; for Postgres,
# the fixture README's answers.
from __future__ import annotations

import errno
import hashlib
import io
import os
import random
import signal
import stat
import subprocess
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from kloset_blocks.ext4.layout import ZERO
from kloset_blocks.host.progress import Progress
from kloset_blocks.image.snapshot import ImageOptions, snapshot_image
from tests.store_helpers import ENC, PASSPHRASE, PLAIN, PYTHON, REPO, manifest, plain_store
from tests.writer_helpers import add_member

SNAP_A = "bf6afbae"
pytestmark = pytest.mark.root


# ---------------------------------------------------------------- harness


def mounted(path: Path | str) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def wait_for_mount(proc: subprocess.Popen, path: Path, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not mounted(path):
        if proc.poll() is not None:
            pytest.fail(f"exited {proc.returncode} before mounting: {log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"not mounted within {timeout} s: {log.read_text()}")
        time.sleep(0.02)


def cli_env(run_root: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PLAKAR_PASSPHRASE"}
    env["KLOSET_BLOCKS_RUN_ROOT"] = str(run_root)
    env.update(extra)
    return env


@contextmanager
def view(
    kind: str,
    store: Path,
    snap: str,
    mnt: Path,
    *opts: str,
    stop: int = signal.SIGTERM,
    env: dict | None = None,
) -> Iterator[subprocess.Popen]:
    """A foreground expose/browse; on exit `stop` is sent and a clean unmount is asserted."""
    log = mnt.parent / f"{mnt.name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [PYTHON, "-m", "kloset_blocks", kind, str(store), snap, str(mnt), *opts],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            cwd=REPO,
            env=env or cli_env(mnt.parent / "run"),
        )
    try:
        wait_for_mount(proc, mnt, log)
        yield proc
        proc.send_signal(stop)
        assert proc.wait(timeout=30) == 0, log.read_text()
        assert not mounted(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "kloset_blocks", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=timeout,
        check=False,
    )


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def mpath(mnt: Path, snap_path: bytes) -> bytes:
    return os.fsencode(mnt) + snap_path if snap_path != b"/" else os.fsencode(mnt)


# ---------------------------------------------------------------- expose


@pytest.fixture(scope="module")
def image_oracle():
    image, _ = snapshot_image(plain_store().open_snapshot(SNAP_A), ImageOptions())
    return image


@pytest.fixture(scope="module")
def exposed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp("expose")
    path = d / "image"
    with view("expose", PLAIN, SNAP_A, path, stop=signal.SIGINT):
        yield path
    assert not path.exists(), "expose created the file and must remove it at exit"


def test_expose_stat(exposed: Path, image_oracle) -> None:
    st = os.stat(exposed)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o444
    assert st.st_size == image_oracle.size
    assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())


def test_expose_bytes_at_random_offsets(exposed: Path, image_oracle) -> None:
    rng = random.Random(7)
    size = image_oracle.size
    data_regions = [r for r in image_oracle.regions if r.kind != ZERO]
    cases = [(0, 4096), (1024, 1024), (size - 4096, 4096), (size - 1, 1)]
    for _ in range(150):  # anywhere, unaligned, some spanning regions
        cases.append((rng.randrange(size - 300_000), rng.choice([1, 511, 4096, 65536, 300_000])))
    for _ in range(150):  # inside metadata and file data, where the bytes are not zeros
        r = rng.choice(data_regions)
        off = r.start + rng.randrange(r.length)
        cases.append((off, min(rng.choice([7, 4096, 131072, 1 << 20]), size - off)))
    fd = os.open(exposed, os.O_RDONLY)
    try:
        for off, n in cases:
            assert os.pread(fd, n, off) == image_oracle.pread(off, n), (off, n)
        assert os.pread(fd, 100, size) == b""  # at EOF
    finally:
        os.close(fd)


def test_expose_e2fsck_clean(exposed: Path) -> None:
    p = subprocess.run(["e2fsck", "-fn", str(exposed)], capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stdout + p.stderr


def test_expose_debugfs(exposed: Path) -> None:
    p = subprocess.run(["debugfs", "-R", "cat /PG_VERSION", str(exposed)], capture_output=True, check=False)
    assert p.returncode == 0 and p.stdout == b"15\n", p.stderr


def test_expose_loop_ro_mount_matches_manifest(exposed: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    loop = subprocess.run(
        ["losetup", "-r", "-f", "--show", str(exposed)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        subprocess.run(["mount", "-t", "ext4", "-o", "ro", loop, str(mnt)], check=True)
        try:
            files = {p: e for p, e in manifest("A").items() if e["type"] == "file"}
            assert len(files) == 1284
            for path, e in files.items():
                assert sha256_file(str(mnt) + path) == e["sha256"], path
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)


WRITES = [
    ("open O_WRONLY", lambda p: os.open(p, os.O_WRONLY)),
    ("open O_RDWR", lambda p: os.open(p, os.O_RDWR)),
    ("open O_TRUNC", lambda p: os.open(p, os.O_RDONLY | os.O_TRUNC)),
    ("truncate", lambda p: os.truncate(p, 0)),
    ("chmod", lambda p: os.chmod(p, 0o644)),
    ("chown", lambda p: os.chown(p, 1, 1)),
    ("utime", lambda p: os.utime(p, (0, 0))),
    ("setxattr", lambda p: os.setxattr(p, "user.x", b"1")),
]


@pytest.mark.parametrize(("what", "op"), WRITES, ids=[w for w, _ in WRITES])
def test_expose_writes_fail_erofs(exposed: Path, what: str, op) -> None:
    with pytest.raises(OSError) as e:
        op(exposed)
    assert e.value.errno == errno.EROFS, what


EXPOSE_OPTIONS = [
    (("--path", "/base"), ImageOptions(path=b"/base")),
    (("--pgdata", "--owner", "nobody"), ImageOptions(pgdata=True, owner="nobody")),
    (("--free", "64M"), ImageOptions(free=64 << 20)),
    (("--pgdata", "--journal"), ImageOptions(pgdata=True, journal=True)),  # mount --backend fuse --overlay
]


@pytest.mark.parametrize(("opts", "options"), EXPOSE_OPTIONS, ids=["path", "pgdata-owner", "free", "journal"])
def test_expose_options_match_the_planner(
    tmp_path: Path, opts: tuple[str, ...], options: ImageOptions
) -> None:
    image, _ = snapshot_image(plain_store().open_snapshot(SNAP_A), options)
    path = tmp_path / "img"
    with view("expose", PLAIN, SNAP_A, path, *opts):
        assert os.stat(path).st_size == image.size
        rng = random.Random(3)
        with open(path, "rb") as f:
            for off in [0, 1024, *(rng.randrange(image.size - 8192) for _ in range(40))]:
                f.seek(off)
                assert f.read(8192) == image.pread(off, 8192), off
        p = subprocess.run(["e2fsck", "-fn", str(path)], capture_output=True, text=True, check=False)
        assert p.returncode == 0, p.stdout


# ---------------------------------------------------------------- browse


@pytest.fixture(scope="module")
def browsed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    mnt = tmp_path_factory.mktemp("browse") / "tree"
    with view("browse", PLAIN, SNAP_A, mnt):
        yield mnt


def test_browse_stat_matches_entries(browsed: Path) -> None:
    snap = plain_store().open_snapshot(SNAP_A)
    n = 0
    for path, e in snap.walk(b"/"):
        st = os.lstat(mpath(browsed, path))
        got = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns)
        assert got == (e.st_mode, e.uid, e.gid, e.mtime_ns), path
        if e.is_reg or e.is_symlink:
            assert st.st_size == e.size, path
        n += 1
    assert n == 1311


def test_browse_sizes_and_types_match_manifest(browsed: Path) -> None:
    for path, e in manifest("A").items():
        st = os.lstat(str(browsed) + path)
        assert stat.S_IMODE(st.st_mode) == int(e["mode"], 0), path
        assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (e["uid"], e["gid"], e["mtime"] * 10**9), path
        if e["type"] == "file":
            assert stat.S_ISREG(st.st_mode) and st.st_size == e["size"], path
        elif e["type"] == "dir":
            assert stat.S_ISDIR(st.st_mode), path


def test_browse_listings_match(browsed: Path) -> None:
    snap = plain_store().open_snapshot(SNAP_A)
    dirs = [p for p, e in snap.walk(b"/") if e.is_dir]
    assert len(dirs) > 20
    for d in dirs:
        want = [name for name, _ in snap.listdir(d)]
        assert os.listdir(mpath(browsed, d)) == want, d


def test_browse_dir_nlink_counts_subdirs(browsed: Path) -> None:
    for d in (b"/", b"/base", b"/pg_wal"):
        p = mpath(browsed, d)
        subdirs = sum(1 for n in os.listdir(p) if stat.S_ISDIR(os.lstat(os.path.join(p, n)).st_mode))
        assert os.lstat(p).st_nlink == 2 + subdirs, d


def test_browse_bytes_match_manifest(browsed: Path) -> None:
    for path, e in manifest("A").items():
        if e["type"] == "file":
            assert sha256_file(str(browsed) + path) == e["sha256"], path


def test_browse_bytes_at_random_offsets(browsed: Path) -> None:
    snap = plain_store().open_snapshot(SNAP_A)
    files = sorted((e.size, p) for p, e in snap.walk(b"/") if e.is_reg and e.size > 0)
    big = [p for _, p in files[-20:]]  # several chunks each: offsets cross chunk boundaries
    rng = random.Random(11)
    for path in big:
        f = snap.open_file(path)
        fd = os.open(mpath(browsed, path), os.O_RDONLY)
        try:
            for _ in range(10):
                off = rng.randrange(f.size)
                n = rng.choice([1, 4096, 8192, 200_000, 3 << 20])
                assert os.pread(fd, n, off) == f.read(off, min(n, f.size - off)), (path, off, n)
        finally:
            os.close(fd)


BROWSE_WRITES = [
    ("create", lambda m: os.open(os.path.join(m, "new"), os.O_WRONLY | os.O_CREAT, 0o644)),
    ("open O_RDWR", lambda m: os.open(os.path.join(m, "PG_VERSION"), os.O_RDWR)),
    ("open O_APPEND", lambda m: os.open(os.path.join(m, "PG_VERSION"), os.O_WRONLY | os.O_APPEND)),
    ("mkdir", lambda m: os.mkdir(os.path.join(m, "newdir"))),
    ("rmdir", lambda m: os.rmdir(os.path.join(m, "pg_notify"))),
    ("unlink", lambda m: os.unlink(os.path.join(m, "PG_VERSION"))),
    ("rename", lambda m: os.rename(os.path.join(m, "PG_VERSION"), os.path.join(m, "x"))),
    ("symlink", lambda m: os.symlink("PG_VERSION", os.path.join(m, "s"))),
    ("link", lambda m: os.link(os.path.join(m, "PG_VERSION"), os.path.join(m, "h"))),
    ("mkfifo", lambda m: os.mkfifo(os.path.join(m, "fifo"))),
    ("chmod", lambda m: os.chmod(os.path.join(m, "PG_VERSION"), 0o777)),
    ("chown", lambda m: os.chown(os.path.join(m, "PG_VERSION"), 0, 0)),
    ("utime", lambda m: os.utime(os.path.join(m, "PG_VERSION"), (0, 0))),
    ("truncate", lambda m: os.truncate(os.path.join(m, "PG_VERSION"), 0)),
    ("setxattr", lambda m: os.setxattr(os.path.join(m, "PG_VERSION"), "user.x", b"1")),
]


@pytest.mark.parametrize(("what", "op"), BROWSE_WRITES, ids=[w for w, _ in BROWSE_WRITES])
def test_browse_writes_fail_erofs(browsed: Path, what: str, op) -> None:
    with pytest.raises(OSError) as e:
        op(str(browsed))
    assert e.value.errno == errno.EROFS, what
    assert os.listdir(os.fsencode(browsed)) == [
        n for n, _ in plain_store().open_snapshot(SNAP_A).listdir(b"/")
    ]


# ---------------------------------------------------------------- browse: every file type


UID, GID, MTIME = 1234, 2345, 1_700_000_000


def _typed_tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(name: str, kind: bytes, mode: int, data: bytes = b"", **kw: object) -> None:
            add_member(tar, name, kind, mode, data, uid=UID, gid=GID, mtime=MTIME, **kw)

        add("d", tarfile.DIRTYPE, 0o755)
        add("d/f", tarfile.REGTYPE, 0o4755, b"hello")
        add("d/g", tarfile.REGTYPE, 0o2750, bytes(range(256)) * 4000)
        add("d/sub", tarfile.DIRTYPE, 0o700)
        add("d/sub/h", tarfile.LNKTYPE, 0o4755, linkname="d/f")
        add("d/hard", tarfile.LNKTYPE, 0o4755, linkname="d/f")
        add("d/link", tarfile.SYMTYPE, 0o777, linkname="f")
        add("d/fifo", tarfile.FIFOTYPE, 0o640)
        add("t", tarfile.DIRTYPE, 0o1777)
        add("d/\udcffname", tarfile.REGTYPE, 0o600, b"non-utf8")
    return buf.getvalue()


@pytest.fixture(scope="module")
def typed_tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from kloset_blocks.writer.store import write_store

    d = tmp_path_factory.mktemp("typed")
    tar = d / "t.tar"
    tar.write_bytes(_typed_tar())
    write_store(d / "store", tar, chunk_min=64 << 10, chunk_avg=128 << 10, chunk_max=256 << 10, seed=1)
    with view("browse", d / "store", "latest", d / "tree") as _:
        yield d / "tree"


def test_browse_hard_links_share_an_inode(typed_tree: Path) -> None:
    f, hard, h = (os.lstat(typed_tree / p) for p in ("d/f", "d/hard", "d/sub/h"))
    assert f.st_ino == hard.st_ino == h.st_ino
    assert f.st_nlink == 3
    assert (typed_tree / "d/sub/h").read_bytes() == b"hello"


TYPED = [
    ("d", stat.S_IFDIR | 0o755, 3),
    ("d/f", stat.S_IFREG | 0o4755, 3),
    ("d/g", stat.S_IFREG | 0o2750, 1),
    ("d/sub", stat.S_IFDIR | 0o700, 2),
    ("d/link", stat.S_IFLNK | 0o777, 1),
    ("d/fifo", stat.S_IFIFO | 0o640, 1),
    ("t", stat.S_IFDIR | 0o1777, 2),
    ("d/\udcffname", stat.S_IFREG | 0o600, 1),
]


@pytest.mark.parametrize(("path", "mode", "nlink"), TYPED, ids=[p for p, _, _ in TYPED])
def test_browse_types_modes_owners(typed_tree: Path, path: str, mode: int, nlink: int) -> None:
    st = os.lstat(typed_tree / path)
    assert (st.st_mode, st.st_nlink) == (mode, nlink)
    assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (UID, GID, MTIME * 1_000_000_000)


def test_browse_symlink_and_contents(typed_tree: Path) -> None:
    assert os.readlink(typed_tree / "d/link") == "f"
    assert (typed_tree / "d/link").read_bytes() == b"hello"  # followed inside the view
    assert (typed_tree / "d/g").read_bytes() == bytes(range(256)) * 4000
    assert os.listdir(typed_tree / "d") == sorted(os.listdir(typed_tree / "d"), key=os.fsencode)


# ---------------------------------------------------------------- lifecycle and errors


def test_daemon_then_down(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "run")
    tree, img = tmp_path / "tree", tmp_path / "img"
    try:
        p = cli("browse", str(PLAIN), SNAP_A, str(tree), "--daemon", env=env)
        assert p.returncode == 0 and "kloset-blocks down" in p.stdout, p.stderr
        p = cli("expose", str(PLAIN), SNAP_A, str(img), "--daemon", "--pgdata", env=env)
        assert p.returncode == 0, p.stderr
        assert mounted(tree) and mounted(img)
        assert (tree / "PG_VERSION").read_bytes() == b"15\n"
        assert len(os.listdir(tmp_path / "run")) == 2
        p = cli("down", env=env)
        assert p.returncode == 0 and "2 chain(s)" in p.stderr, p.stderr
        assert not mounted(tree) and not mounted(img)
        assert os.listdir(tmp_path / "run") == []
        assert not img.exists()
    finally:
        for m in (tree, img):
            if mounted(m):
                subprocess.run(["umount", "-l", str(m)], check=False)


def test_encrypted_store_with_passphrase_file(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text(PASSPHRASE + "\n")
    with view("browse", ENC, "latest", tmp_path / "tree", "--passphrase-file", str(pw)):
        want = manifest("A")["/global/pg_control"]["sha256"]
        assert sha256_file(tmp_path / "tree" / "global" / "pg_control") == want


ERRORS = [
    ("browse", (str(PLAIN), "ffffffff"), "snapshot"),
    ("browse", (str(ENC), "latest"), "PLAKAR_PASSPHRASE"),
    ("browse", (str(PLAIN), SNAP_A, "--path", "/PG_VERSION"), "not a directory"),
    ("expose", (str(PLAIN), SNAP_A, "--path", "/nowhere"), "no directory"),
    ("expose", (str(PLAIN), SNAP_A, "--owner", "no-such-user-x"), "no such user"),
]


@pytest.mark.parametrize(("kind", "args", "needle"), ERRORS, ids=[e[2] for e in ERRORS])
@pytest.mark.parametrize("daemon", [False, True], ids=["fg", "daemon"])
def test_errors_are_one_line_and_leave_nothing(
    tmp_path: Path, kind: str, args: tuple[str, ...], needle: str, daemon: bool
) -> None:
    target = tmp_path / "target"
    store, snap, *opts = args
    p = cli(
        kind,
        store,
        snap,
        str(target),
        *opts,
        *(["--daemon"] if daemon else []),
        env=cli_env(tmp_path / "run"),
    )
    assert p.returncode == 1, p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("kloset-blocks: ") and needle in p.stderr, (
        p.stderr
    )
    assert "Traceback" not in p.stderr
    assert not mounted(target)
    assert kind == "browse" or not target.exists()
    with suppress(FileNotFoundError):
        assert os.listdir(tmp_path / "run") == []


@pytest.mark.parametrize("kind", ["non-empty", "directory"])
def test_expose_refuses_a_bad_file(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "x"
    if kind == "directory":
        target.mkdir()
    else:
        target.write_bytes(b"precious")
    p = cli("expose", str(PLAIN), SNAP_A, str(target), env=cli_env(tmp_path / "run"))
    assert p.returncode == 1 and p.stderr.startswith("kloset-blocks: "), p.stderr
    assert kind == "directory" or target.read_bytes() == b"precious"


# ---------------------------------------------------------------- Postgres on a qcow2 overlay over the file


def test_postgres_on_qcow2_overlay_of_the_exposed_file(tmp_path: Path) -> None:
    from kloset_blocks import postgres
    from kloset_blocks.fuse.chain import ExposedImage, expose_argv
    from kloset_blocks.host.chain import Chain

    chain = Chain(ExposedImage(expose_argv(str(PLAIN), SNAP_A, owner="postgres")), run_root=tmp_path / "run")
    try:
        chain.up()
        assert chain.run is not None and chain.mountpoint is not None and chain.overlay is not None
        info = subprocess.run(
            ["qemu-img", "info", "-U", str(chain.overlay)], capture_output=True, text=True, check=True
        ).stdout
        assert f"backing file: {chain.run.path / 'image'}" in info
        cluster = postgres.locate(chain.mountpoint)
        uid, gid = postgres.pg_ids()
        postgres.ensure_traversable(chain.mountpoint, cluster.datadir, uid)
        postgres.fix_ownership(cluster.datadir, uid, gid)
        postgres.prepare_datadir(cluster.datadir, Progress(quiet=True))
        server = postgres.Server(chain.run, cluster)
        server.start()
        assert server.query("select count(*), sum(id) from customers", db="shop") == "5000|12502500"
        assert server.query("select name from customers where id=150", db="shop") == "customer-150"
        assert server.query("create table t as select 1 as x; select count(*) from t", db="shop") == "1"
        image = chain.run.path / "image"
        assert mounted(image)
    finally:
        problems = chain.teardown()
    assert problems == []
    assert not mounted(image) and not (tmp_path / "run" / chain.run.id).exists()


def test_mount_backend_fuse_then_down(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "run")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        p = cli("mount", "--backend", "fuse", str(PLAIN), SNAP_A, str(mnt), env=env)
        assert p.returncode == 0, p.stderr
        assert (mnt / "PG_VERSION").read_bytes() == b"15\n"
        (mnt / "written").write_bytes(b"x" * 10000)  # lands in the overlay
        assert (mnt / "written").stat().st_size == 10000
        p = cli("down", env=env)
        assert p.returncode == 0, p.stderr
        assert not mounted(mnt) and os.listdir(tmp_path / "run") == []
    finally:
        if mounted(mnt):
            cli("down", env=env)
