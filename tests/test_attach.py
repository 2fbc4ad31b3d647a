# End-to-end tests of the attach chain and Postgres on it, all real parts: a real PostgreSQL 15
# cluster, pg_basebackup tar -X fetch, an ext4 image made by mke2fs -d (the stand-in for the
# synthesized image), nbdkit's C file plugin (the stand-in for our Python plugin), qemu-img,
# qemu-storage-daemon's FUSE export, a kernel loop device, a kernel ext4 mount, postgres.
#
# Oracle: the live server's answers at backup time. "Nothing left behind" is checked against the
# kernel (/proc/mounts, sysfs loop backing files, `losetup -j`), /proc (pids with start times, command
# lines naming the run directory) and the file system (run directory gone); the backing image's
# sha256 must never change.
from __future__ import annotations

import copy
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kloset_blocks import postgres
from kloset_blocks.app.sessions import pg_session
from kloset_blocks.app.teardown import teardown_all
from kloset_blocks.demo import sample as pc
from kloset_blocks.host.backing import NbdkitBacking
from kloset_blocks.host.chain import Chain
from kloset_blocks.host.mounts import loops_on
from kloset_blocks.host.procs import proc_alive, processes_mentioning
from kloset_blocks.host.progress import Progress
from kloset_blocks.host.rundir import RUN_ROOT_ENV
from kloset_blocks.host.tools import AttachError

REPO = Path(__file__).resolve().parent.parent
STANDIN_CLI = Path(__file__).resolve().parent / "standin_cli.py"

pytestmark = [pytest.mark.root, pytest.mark.slow]


# --- fixtures ------------------------------------------------------------------------------------


class Backup:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.live: dict[str, str] = {}
        self.image = work / "fetch.img"  # pg_basebackup -X fetch
        self.image_nowal = work / "none.img"  # pg_basebackup -X none
        self.sha: dict[Path, str] = {}

    def backing(self, image: Path | None = None) -> NbdkitBacking:
        return NbdkitBacking(["nbdkit", "file", f"file={image or self.image}"])


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


@pytest.fixture(scope="module")
def backup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backup]:
    b = Backup(tmp_path_factory.mktemp("backup"))
    cluster = pc.make_cluster()
    try:
        b.live = dict(cluster.live)
        tar = cluster.basebackup(b.work / "fetch.tar", wal="fetch")
        tar_none = cluster.basebackup(b.work / "none.tar", wal="none")
    finally:
        cluster.cleanup()
    pc.make_ext4_image(pc.extract_for_image(tar, b.work / "fetch"), b.image)
    pc.make_ext4_image(pc.extract_for_image(tar_none, b.work / "none"), b.image_nowal)
    shutil.rmtree(b.work / "fetch")
    shutil.rmtree(b.work / "none")
    b.sha = {img: sha256(img) for img in (b.image, b.image_nowal)}
    yield b


@pytest.fixture
def run_root(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    # A private root per test (postgres must traverse it: 0711), so a `down` here cannot touch
    # anyone else's chains and "nothing left" is checkable.
    root = Path("/run/kloset-blocks-test") / uuid.uuid4().hex[:8]
    root.mkdir(parents=True)
    os.chmod(root.parent, 0o711)
    os.chmod(root, 0o711)
    monkeypatch.setenv(RUN_ROOT_ENV, str(root))
    yield root
    leftovers = list(root.iterdir())
    teardown_all(root)
    shutil.rmtree(root, ignore_errors=True)
    assert not leftovers, f"run directories left behind: {leftovers}"


def assert_clean(state: dict[str, Any], run_root: Path) -> None:
    """Nothing the recorded chain started is left: mounts, loop devices, processes, files."""
    run = Path(state["mountpoint"]).parent if state.get("mountpoint_temp") else None
    mounts = Path("/proc/mounts").read_text()
    assert str(run_root) not in mounts
    if state.get("mountpoint"):
        assert not os.path.ismount(state["mountpoint"])
    if state.get("fuse"):
        assert loops_on(state["fuse"]) == []
        out = subprocess.run(["losetup", "-j", state["fuse"]], capture_output=True, text=True).stdout
        assert out.strip() == ""
    recs = [state.get("nbdkit"), state.get("nbdkit_keeper"), state.get("qsd")]
    recs += [state.get("postgres", {}).get(k) for k in ("runuser", "postmaster")]
    for rec in recs:
        assert not proc_alive(rec), f"process left running: {rec}"
    assert processes_mentioning(str(run_root) + "/") == []
    assert list(run_root.iterdir()) == []
    if run is not None:
        assert not run.exists()


def snapshot_state(chain: Chain) -> dict[str, Any]:
    assert chain.run is not None
    return copy.deepcopy(chain.run.state)


def standin_cli(backup: Backup, *args: str, image: Path | None = None, **kw: Any) -> subprocess.Popen[str]:
    """The real `kloset-blocks` CLI, in another process, with the stand-in nbdkit argv."""
    return subprocess.Popen(
        [sys.executable, str(STANDIN_CLI), str(image or backup.image), *args],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        **kw,
    )


def run_cli(backup: Backup, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    p = standin_cli(backup, *args)
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


# --- the chain works, and its answers are the live server's ---------------------------------------


def test_queries_equal_live_answers(backup: Backup, run_root: Path) -> None:
    t0 = time.monotonic()
    chain, server = pg_session(backup.backing(), progress=Progress(quiet=True))
    try:
        first = server.query(*reversed(pc.LIVE_QUERIES["accounts"]))
        print(f"time to first query: {time.monotonic() - t0:.2f} s")
        assert first == backup.live["accounts"]
        for name, (db, sql) in pc.LIVE_QUERIES.items():
            assert server.query(sql, db) == backup.live[name], name
        log = server.log.read_text()
        assert "redo starts at" in log and "consistent recovery state reached" in log
        # private socket: 0600 in a 0700 directory; Postgres has no TCP listener
        sock = chain.backing.socket
        assert sock is not None
        assert sock.stat().st_mode & 0o777 == 0o600
        assert sock.parent.stat().st_mode & 0o777 == 0o700
        assert server.query("show listen_addresses") == ""
        # writes land in the overlay
        server.query("create table scratch as select 1 as x", "shop")
        assert server.query("select count(*) from scratch", "shop") == "1"
        state = snapshot_state(chain)
    finally:
        chain.teardown()
    assert_clean(state, run_root)
    assert sha256(backup.image) == backup.sha[backup.image]


def test_read_only_refuses_writes(backup: Backup, run_root: Path) -> None:
    chain, server = pg_session(backup.backing(), read_only=True)
    try:
        assert server.query(*reversed(pc.LIVE_QUERIES["items"])) == backup.live["items"]
        with pytest.raises(postgres.PgError, match="read-only transaction"):
            server.query("insert into items values (1000, 'x')", "shop")
        state = snapshot_state(chain)
    finally:
        chain.teardown()
    assert_clean(state, run_root)


def test_reused_overlay_starts_without_recovery(backup: Backup, run_root: Path, tmp_path: Path) -> None:
    overlay = tmp_path / "kept.qcow2"
    chain, server = pg_session(backup.backing(), overlay=overlay)
    try:
        server.query("insert into items values (1000, 'kept')", "shop")
        first_socket = chain.backing.socket
    finally:
        chain.teardown()
    assert overlay.is_file(), "a user-given overlay is kept"
    info = subprocess.run(["qemu-img", "info", "-U", str(overlay)], capture_output=True, text=True).stdout
    assert "cluster_size: 131072" in info and "extended l2: true" in info

    chain, server = pg_session(backup.backing(), overlay=overlay)
    try:
        assert chain.backing.socket != first_socket  # so the overlay had to be rebased onto the new socket
        assert server.query("select name from items where id = 1000", "shop") == "kept"
        assert server.query(*reversed(pc.LIVE_QUERIES["accounts"])) == backup.live["accounts"]
        log = server.log.read_text()
        assert "database system was shut down at" in log
        assert "redo starts at" not in log
        state = snapshot_state(chain)
    finally:
        chain.teardown()
    assert_clean(state, run_root)
    assert overlay.is_file()
    assert sha256(backup.image) == backup.sha[backup.image]


def test_backup_without_wal_is_reported(backup: Backup, run_root: Path) -> None:
    with pytest.raises(postgres.NoWalError, match=r"no WAL.*-X fetch") as e:
        pg_session(backup.backing(backup.image_nowal))
    assert "\n" not in str(e.value)
    assert list(run_root.iterdir()) == []
    assert sha256(backup.image_nowal) == backup.sha[backup.image_nowal]


# --- faults ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("victim", "expected"),
    [
        ("nbdkit", r"Input/output error|could not read block"),
        ("postmaster", r"server closed the connection unexpectedly|terminating connection"),
    ],
)
def test_killing_a_process_mid_query_gives_an_error_and_down_cleans(
    backup: Backup, run_root: Path, victim: str, expected: str
) -> None:
    chain, server = pg_session(backup.backing())
    state = snapshot_state(chain)
    pid = state["nbdkit"]["pid"] if victim == "nbdkit" else state["postgres"]["postmaster"]["pid"]
    # pg_sleep first, then a scan of pages nobody has read yet: nbdkit dies in between.
    q = subprocess.Popen(
        server.psql_argv(["-XAtq", "-v", "ON_ERROR_STOP=1", "-d", "shop", "-c", "select pg_sleep(0.5)",
                          "-c", "select sum(abalance) from pgbench_accounts"]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
    )  # fmt: skip
    time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    _, err = q.communicate(timeout=60)
    assert q.returncode != 0
    assert re.search(expected, err), err
    # `kloset-blocks down` from another process
    down = run_cli(backup, "down")
    assert down.returncode == 0, down.stderr
    assert "down: 1 chain(s) torn down" in down.stderr
    assert_clean(state, run_root)
    chain.teardown()  # idempotent after `down`
    assert sha256(backup.image) == backup.sha[backup.image]


def _shadow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tool: str) -> None:
    """Put a failing `tool` first on PATH: a real failure of that step, nothing else changed."""
    d = tmp_path / "shadow"
    d.mkdir(exist_ok=True)
    script = d / tool
    script.write_text(f"#!/bin/sh\necho '{tool}: injected failure' >&2\nexit 1\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{d}:{os.environ['PATH']}")


PHASE_FAULTS = [
    # (id, how to break it, expected error type, expected message)
    ("serve", "missing-image", AttachError, r"^serve: nbdkit exited: .*"),
    ("overlay", "bad-qcow2-option", AttachError, r"^overlay: .*"),
    ("overlay", "overlay-not-qcow2", AttachError, r"^overlay: .* is raw, not qcow2"),
    ("attach", "shadow:qemu-storage-daemon", AttachError, r"^attach: qemu-storage-daemon exited: .*injected"),
    ("attach", "shadow:losetup", AttachError, r"^attach \(losetup\): losetup: injected failure"),
    ("mount", "missing-mountpoint", AttachError, r"^mount: mountpoint .* is not a directory"),
    ("mount", "shadow:mount", AttachError, r"^mount: mount: injected failure"),
    ("start", "bad-setting", postgres.PgError, r"^postgres failed to start: .*no_such_setting"),
]


@pytest.mark.parametrize(
    ("phase", "fault", "etype", "message"), PHASE_FAULTS, ids=[f"{p}-{f}" for p, f, _, _ in PHASE_FAULTS]
)
def test_failure_in_each_phase_leaves_nothing(
    backup: Backup,
    run_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    phase: str,
    fault: str,
    etype: type[Exception],
    message: str,
) -> None:
    argv = backup.backing().argv
    kw: dict[str, Any] = {}
    if fault == "missing-image":
        argv = ["nbdkit", "file", f"file={tmp_path / 'nope.img'}"]
    elif fault == "bad-qcow2-option":
        kw["qcow2_options"] = "cluster_size=bogus"
    elif fault == "overlay-not-qcow2":
        (tmp_path / "raw.img").write_bytes(b"\0" * 65536)
        kw["overlay"] = tmp_path / "raw.img"
    elif fault == "missing-mountpoint":
        kw["mountpoint"] = tmp_path / "no-such-dir"
    elif fault.startswith("shadow:"):
        _shadow(tmp_path, monkeypatch, fault.split(":", 1)[1])

    if phase == "start":
        with pytest.raises(etype, match=message) as e:
            pg_session(NbdkitBacking(argv), settings=["no_such_setting=1"])
    else:
        chain = Chain(NbdkitBacking(argv), run_root=run_root, timeout=10, **kw)
        with pytest.raises(etype, match=message) as e:
            chain.up()
    assert "\n" not in str(e.value)
    assert list(run_root.iterdir()) == []
    assert processes_mentioning(str(run_root) + "/") == []
    assert str(run_root) not in Path("/proc/mounts").read_text()
    if fault == "overlay-not-qcow2":
        assert (tmp_path / "raw.img").read_bytes() == b"\0" * 65536  # a user's file is never removed


# --- the CLI, in another process: signals, leaving the chain running, down --------------------------


@pytest.mark.parametrize(
    ("signame", "to_group", "expect_rc"),
    [("SIGTERM", False, 130), ("SIGHUP", False, 130), ("SIGINT", True, 1)],
)
def test_psql_teardown_on_signal(
    backup: Backup, run_root: Path, signame: str, to_group: bool, expect_rc: int
) -> None:
    # SIGINT goes to the whole foreground group, as from a terminal: psql cancels its query and
    # exits 1, we tear down. SIGTERM/SIGHUP go to our process only: we stop psql and tear down.
    p = standin_cli(backup, "psql", "fs:/standin", "snap", "-d", "shop", "-c", "select pg_sleep(30)",
                    start_new_session=True)  # fmt: skip
    assert p.stderr is not None
    lines = []
    for line in p.stderr:
        lines.append(line)
        if line.startswith("ready "):
            break
    else:
        pytest.fail(f"never ready: {''.join(lines)}")
    time.sleep(0.3)  # psql is running its query
    states = [pc_state(d) for d in run_root.iterdir()]
    assert len(states) == 1 and "postgres" in states[0]
    sig = getattr(signal, signame)
    if to_group:
        os.killpg(p.pid, sig)
    else:
        p.send_signal(sig)
    _, err = p.communicate(timeout=30)
    assert p.returncode == expect_rc, "".join(lines) + err
    assert "teardown " in err
    assert_clean(states[0], run_root)


def pc_state(run_dir: Path) -> dict[str, Any]:
    import json

    return json.loads((run_dir / "state.json").read_text())


def test_pg_start_outlives_the_cli_then_pg_stop(backup: Backup, run_root: Path) -> None:
    started = run_cli(backup, "pg", "start", "--read-only", "fs:/standin", "snap")
    assert started.returncode == 0, started.stderr
    hint = started.stdout.strip()
    assert hint.startswith("psql -h ")
    (run_dir,) = run_root.iterdir()
    state = pc_state(run_dir)
    # the CLI is gone; the chain and the server still answer
    sockdir, port = state["postgres"]["sockdir"], str(state["postgres"]["port"])
    out = subprocess.run(
        ["runuser", "-u", "postgres", "--", "psql", "-XAtq", "-h", sockdir, "-p", port, "-d", "shop",
         "-c", pc.LIVE_QUERIES["accounts"][1]],
        capture_output=True, text=True, cwd="/", check=True,
    )  # fmt: skip
    assert out.stdout.strip() == backup.live["accounts"]
    stopped = run_cli(backup, "pg", "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert_clean(state, run_root)


def test_mount_then_down(backup: Backup, run_root: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    res = run_cli(backup, "mount", "fs:/standin", "snap", str(mnt))
    assert res.returncode == 0, res.stderr
    for phase in ("serve", "overlay", "attach", "mount"):
        assert f"\n{phase} " in "\n" + res.stderr
    assert (mnt / "PG_VERSION").read_text().strip() == pc.PG_MAJOR
    (mnt / "written-by-test").write_text("x")  # read-write, into the overlay
    (run_dir,) = run_root.iterdir()
    state = pc_state(run_dir)
    down = run_cli(backup, "down", "-q")
    assert down.returncode == 0 and down.stderr == "", down.stderr
    assert_clean(state, run_root)
    assert mnt.is_dir() and list(mnt.iterdir()) == []  # the user's mountpoint stays, empty
    again = run_cli(backup, "down")
    assert again.returncode == 0 and "down: 0 chain(s)" in again.stderr


def test_zz_backing_images_unchanged(backup: Backup) -> None:
    for img, digest in backup.sha.items():
        assert sha256(img) == digest, img


@pytest.mark.parametrize(
    ("extra", "present", "absent"),
    [
        (None, {"PATH": os.environ["PATH"]}, ("PLAKAR_PASSPHRASE", "KLOSET_BLOCKS_STORE_KEY")),
        ({}, {"PATH": os.environ["PATH"]}, ("PLAKAR_PASSPHRASE", "KLOSET_BLOCKS_STORE_KEY")),
        ({"KB_TEST_SET": "1"}, {"KB_TEST_SET": "1", "PATH": os.environ["PATH"]}, ("PLAKAR_PASSPHRASE",)),
        ({"KB_TEST_SET": "1", "PATH": None}, {"KB_TEST_SET": "1"}, ("PATH",)),
        (
            {"KLOSET_BLOCKS_STORE_KEY": "k"},
            {"KLOSET_BLOCKS_STORE_KEY": "k"},
            ("PLAKAR_PASSPHRASE",),
        ),  # nbdkit's
    ],
)
def test_child_env_applies_and_unsets(monkeypatch: pytest.MonkeyPatch, extra, present, absent) -> None:
    from kloset_blocks.host.procs import child_env

    # The store's secrets in our environment never reach a child unless given explicitly.
    monkeypatch.setenv("PLAKAR_PASSPHRASE", "pw")
    monkeypatch.setenv("KLOSET_BLOCKS_STORE_KEY", "00")
    env = child_env(extra)
    assert all(env[k] == v for k, v in present.items())
    assert not any(k in env for k in absent)
