# Kept overlays (`--overlay FILE`) after a fault, all real parts: a real PostgreSQL 15 backup in an
# ext4 image with a journal (what the plugin serves with journal=true, which kloset-blocks asks for
# when the overlay is kept), nbdkit's file plugin, qemu-storage-daemon, loop, kernel ext4, postgres.
#
# Oracles: the rows psql confirmed as committed before the fault; e2fsck's own exit status and
# words; the kernel's mount; "nothing left behind" as in test_attach.
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kloset_blocks.app.sessions import pg_session, session_faults
from kloset_blocks.host.backing import NbdkitBacking
from kloset_blocks.host.chain import Chain
from kloset_blocks.host.progress import Progress
from kloset_blocks.host.space import MIN_FREE_ENV, OVERLAY_DIR_ENV
from kloset_blocks.host.tools import AttachError
from tests.test_attach import Backup, assert_clean, backup, run_root, snapshot_state, standin_cli  # noqa: F401

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture(scope="module")
def journaled(backup: Backup, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """The backup's image with a journal added by tune2fs and without metadata checksums, like
    the image the plugin serves with journal=true."""
    img = tmp_path_factory.mktemp("journaled") / "j.img"
    shutil.copyfile(backup.image, img)
    subprocess.run(["e2fsck", "-fy", str(img)], check=True, capture_output=True)
    subprocess.run(["tune2fs", "-O", "has_journal,^metadata_csum", str(img)], check=True, capture_output=True)
    return img


def _insert_until_killed(server, victim_pid: int, rows_before_kill: int) -> int:  # type: ignore[no-untyped-def]
    """psql commits one row a transaction and echoes its number after each commit; the victim is
    SIGKILLed once `rows_before_kill` are confirmed. Returns the last confirmed row."""
    server.query("create table fault(i int primary key, pad text)", "shop")
    script = "".join(
        f"insert into fault values ({i}, repeat('x', 3000));\n\\echo {i}\n" for i in range(1, 100000)
    )
    p = subprocess.Popen(
        server.psql_argv(["-XAtq", "-d", "shop"]),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
    )  # fmt: skip
    assert p.stdin is not None and p.stdout is not None

    def feed() -> None:
        with contextlib.suppress(BrokenPipeError):  # psql stops reading when the server dies
            p.stdin.write(script)  # type: ignore[union-attr]
            p.stdin.close()  # type: ignore[union-attr]

    threading.Thread(target=feed, daemon=True).start()
    confirmed = 0
    for line in p.stdout:
        if line.strip().isdigit():
            confirmed = int(line)
            if confirmed == rows_before_kill:
                os.kill(victim_pid, signal.SIGKILL)
    p.wait(timeout=120)
    assert confirmed >= rows_before_kill
    return confirmed


def test_qsd_killed_mid_write_then_the_kept_overlay_is_replayed(
    backup: Backup,  # noqa: F811
    journaled: Path,
    run_root: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    overlay = tmp_path / "kept.qcow2"
    argv = NbdkitBacking(["nbdkit", "file", f"file={journaled}"])
    chain, server = pg_session(argv, overlay=overlay)
    try:
        state = snapshot_state(chain)
        assert "qsd" in state, "the FUSE attach path (no /dev/nbd) is the one under test"
        confirmed = _insert_until_killed(server, state["qsd"]["pid"], 300)
        (fault,) = session_faults(chain.run)  # what psql_session says before its teardown
        assert fault.startswith("qemu-storage-daemon, which attached the overlay, died during the session: ")
    finally:
        chain.teardown()
    assert_clean(state, run_root)
    assert overlay.is_file()

    chain, server = pg_session(argv, overlay=overlay, progress=Progress())
    try:
        err = capsys.readouterr().err
        assert "\nfsck " in "\n" + err, err
        assert "was not cleanly unmounted; its journal was replayed" in err, err
        # All confirmed commits survived the crash (Postgres' WAL on a replayed ext4 journal).
        assert int(server.query(f"select count(*) from fault where i <= {confirmed}", "shop")) == confirmed
        state = snapshot_state(chain)
    finally:
        chain.teardown()
    assert_clean(state, run_root)
    r = subprocess.run(["e2fsck", "-fn", str(journaled)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout  # the backing never changed: everything went to the overlay


def _write_into_overlay(overlay: Path, backing: Path, offset: int, data: bytes) -> None:
    """A write into the overlay's guest view, as a damaged run would leave (qemu-io over the
    image file as its backing; the next chain rebases it onto its own socket)."""
    subprocess.run(["qemu-img", "rebase", "-u", "-F", "raw", "-b", str(backing), str(overlay)], check=True)
    tmp = overlay.parent / "patch.bin"
    tmp.write_bytes(data)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -s {tmp} {offset} {len(data)}", str(overlay)],
        check=True, capture_output=True,
    )  # fmt: skip


def test_damage_e2fsck_cannot_preen_stops_with_one_line(
    journaled: Path,
    run_root: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    overlay = tmp_path / "kept.qcow2"
    argv = NbdkitBacking(["nbdkit", "file", f"file={journaled}"])
    with Chain(argv, overlay=overlay, run_root=run_root) as chain:
        assert chain.mountpoint is not None
        (chain.mountpoint / "kept-file").write_text("x")
    # The root inode overwritten and the filesystem marked not clean: preen mode must give up.
    header = subprocess.run(["dumpe2fs", "-h", str(journaled)], capture_output=True, text=True).stdout
    assert "Inode size:\t          256" in header
    groups = subprocess.run(["dumpe2fs", str(journaled)], capture_output=True, text=True).stdout
    itable = int(groups.split("Inode table at ", 1)[1].split("-", 1)[0])
    _write_into_overlay(overlay, journaled, itable * 4096 + 256, b"\xff" * 256)  # inode 2
    _write_into_overlay(overlay, journaled, 1024 + 0x3A, b"\x00\x00")  # s_state: not clean

    chain = Chain(argv, overlay=overlay, run_root=run_root, timeout=30)
    with pytest.raises(AttachError, match=r"^fsck: the filesystem in the kept overlay .* is damaged") as e:
        chain.up()
    assert "\n" not in str(e.value) and str(overlay) in str(e.value)
    assert list(run_root.iterdir()) == []
    assert overlay.is_file()  # a user's overlay is never removed


# --- the disk holding the overlay: room checked at the start, a full one named ---------------------


@contextlib.contextmanager
def small_fs(where: Path, size: str) -> Iterator[Path]:
    """A small tmpfs of our own, the overlay's place for the test."""
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_start_refuses_when_the_overlay_place_has_too_little_room(
    backup: Backup,  # noqa: F811
    run_root: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    with small_fs(tmp_path / "small", "32M") as small:
        env = {**os.environ, OVERLAY_DIR_ENV: str(small)}
        env.pop(MIN_FREE_ENV, None)  # the default minimum, 1 GiB
        p = standin_cli(backup, "psql", "fs:/standin", "snap", "-c", "select 1", env=env)
        _, err = p.communicate(timeout=120)
        assert p.returncode == 1, err
        (line,) = [ln for ln in err.splitlines() if ln.startswith("kloset-blocks:")]
        assert f"overlay: {small} has 32 MiB free, less than the 1.0 GiB an overlay needs" in line, err
        assert "Traceback" not in err
        assert list(small.iterdir()) == []
        assert "serve " not in err  # refused before anything started
    assert list(run_root.iterdir()) == []


def test_disk_full_while_postgres_writes_says_where(
    backup: Backup,  # noqa: F811
    run_root: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    with small_fs(tmp_path / "small", "160M") as small:
        env = {**os.environ, OVERLAY_DIR_ENV: str(small), MIN_FREE_ENV: "64M"}
        sql = (
            "create table big as select g, repeat(md5(g::text), 60) as pad from generate_series(1, 400000) g"
        )
        p = standin_cli(backup, "psql", "fs:/standin", "snap", "-d", "shop", "-c", sql, env=env)
        _, err = p.communicate(timeout=300)
        assert p.returncode != 0, err
        assert "Traceback" not in err, err
        full = [ln for ln in err.splitlines() if "the disk holding the overlay is full" in ln]
        assert len(full) == 1, err
        assert f"lives on the filesystem mounted at {small}" in full[0], err
        assert "free at the start" in full[0] and "/" + "overlay" not in full[0].split(str(small))[0]
        assert list(small.iterdir()) == [], "the temporary overlay is removed with its run"
    assert list(run_root.iterdir()) == []
