# Fast tests of the pieces under the attach chain and Postgres lifecycle: data directory discovery,
# version and binaries, ownership fixing (real chown), server options, process bookkeeping on real
# processes, state files. The end-to-end chain is tested in test_attach.py.
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from kloset_blocks import postgres
from kloset_blocks.errors import KlosetError, NotFound
from kloset_blocks.host.backing import nbdkit_command, probe_nbd
from kloset_blocks.host.procs import proc_alive, proc_record, proc_starttime, stop_process
from kloset_blocks.host.progress import Progress
from kloset_blocks.host.rundir import RunDir, list_run_dirs


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        (["PG_VERSION", "data/PG_VERSION"], ""),  # pg_basebackup tar: the root
        (["data/PG_VERSION", "data/base/1/x"], "data"),  # plakar's postgres importer
        (["srv/PG_VERSION"], "srv"),  # one level down
        (["a/b/PG_VERSION"], None),  # deeper: not searched
        (["PG_VERSION/x"], None),  # a directory named PG_VERSION is not it
    ],
)
def test_find_data_dir(tmp_path: Path, files: list[str], expected: str | None) -> None:
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("15\n")
    if expected is None:
        with pytest.raises(NotFound, match="no PostgreSQL data directory"):
            postgres.find_data_dir(tmp_path)
    else:
        assert postgres.find_data_dir(tmp_path) == (tmp_path / expected if expected else tmp_path)


@pytest.mark.parametrize(("text", "major"), [("15\n", "15"), ("9.6\n", "9.6"), ("16", "16"), ("x1\n", None)])
def test_read_major(tmp_path: Path, text: str, major: str | None) -> None:
    (tmp_path / "PG_VERSION").write_text(text)
    if major is None:
        with pytest.raises(postgres.PgError, match="unexpected PG_VERSION"):
            postgres.read_major(tmp_path)
    else:
        assert postgres.read_major(tmp_path) == major


def test_server_bindir_names_the_debian_package() -> None:
    assert postgres.server_bindir("15") == Path("/usr/lib/postgresql/15/bin")
    with pytest.raises(postgres.PgError, match=r"apt-get install postgresql-99$") as e:
        postgres.server_bindir("99")
    assert "\n" not in str(e.value) and isinstance(e.value, KlosetError)


@pytest.mark.parametrize(("root_mode", "expected_mode"), [(0o755, 0o700), (0o750, 0o750), (0o700, 0o700)])
def test_fix_ownership(tmp_path: Path, root_mode: int, expected_mode: int) -> None:
    uid, gid = postgres.pg_ids()
    d = tmp_path / "data"
    (d / "base" / "1").mkdir(parents=True)
    (d / "base" / "1" / "1259").write_bytes(b"x")
    (d / "backup_manifest").write_text("{}")
    os.chown(d / "backup_manifest", 2048, 1024)  # what pg_basebackup writes (references §3.4)
    os.symlink("/nonexistent", d / "link")  # lchown: a dangling link is not followed
    os.chmod(d, root_mode)
    changed = postgres.fix_ownership(d, uid, gid)
    assert changed >= 5
    for p in [d, d / "base", d / "base" / "1", d / "base" / "1" / "1259", d / "backup_manifest", d / "link"]:
        st = p.lstat()
        assert (st.st_uid, st.st_gid) == (uid, gid), p
    assert d.stat().st_mode & 0o7777 == expected_mode
    assert postgres.fix_ownership(d, uid, gid) == 0  # idempotent: nothing left to change


def test_ensure_traversable_and_prepare(tmp_path: Path) -> None:
    uid, _ = postgres.pg_ids()
    root = tmp_path / "mnt"
    data = root / "data"
    data.mkdir(parents=True)
    os.chmod(root, 0o700)  # root-owned and closed: postgres could not reach /data
    postgres.ensure_traversable(root, data, uid)
    assert root.stat().st_mode & 0o001
    for name in ("postmaster.pid", "standby.signal", "recovery.signal", "PG_VERSION"):
        (data / name).write_text("x")
    postgres.prepare_datadir(data, Progress(quiet=True))
    assert sorted(p.name for p in data.iterdir()) == ["PG_VERSION"]


@pytest.mark.parametrize(
    ("read_only", "has_conf", "settings"),
    [(False, True, []), (True, True, []), (False, False, ["work_mem=8MB"])],
)
def test_server_options_and_files(
    tmp_path: Path, read_only: bool, has_conf: bool, settings: list[str]
) -> None:
    # Our config_file always; the snapshot's auto.conf emptied and its signal files replaced by ours.
    root = Path("/run/kloset-blocks-test") / f"opts-{os.getpid()}"
    try:
        run = RunDir.create(root)
        data = tmp_path / "data"
        data.mkdir()
        if has_conf:
            (data / "postgresql.conf").write_text("work_mem = 3MB\nrestore_command = 'touch /tmp/x'\n")
        (data / "postgresql.auto.conf").write_text("archive_mode = on\n")
        (data / "recovery.signal").write_text("")
        cluster = postgres.Cluster(data, "15", Path("/usr/lib/postgresql/15/bin"))
        s = postgres.Server(run, cluster, read_only=read_only, settings=settings)
        s._write_config()
        opts = s._options()
        pairs = [opts[i + 1] for i, o in enumerate(opts) if o == "-c"]
        assert opts[:2] == ["-D", str(data)]
        assert pairs[0] == f"config_file={s.dir / 'postgresql.conf'}" and pairs[1:] == settings
        ours = (s.dir / "postgresql.conf").read_text()
        assert "archive_mode = 'off'" in ours and "restore_command = ''" in ours
        assert ("work_mem = '3MB'" in ours) == has_conf
        assert (f"default_transaction_read_only = '{'on' if read_only else 'off'}'") in ours
        assert "archive_mode" not in (data / "postgresql.auto.conf").read_text()
        signals = sorted(p.name for p in data.iterdir() if p.name.endswith(".signal"))
        assert signals == (["standby.signal"] if read_only else [])
        for p in [s.dir / "postgresql.conf", s.dir / "pg_hba.conf", data / "postgresql.auto.conf"]:
            assert p.stat().st_uid == postgres.pg_ids()[0] and p.stat().st_mode & 0o777 == 0o600, p
        assert s.dir.stat().st_uid == postgres.pg_ids()[0] and s.dir.stat().st_mode & 0o777 == 0o700
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=True)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("LOG: a\nFATAL:  x\nLOG: b\n", "FATAL:  x"),
        ("LOG: a\nLOG: b\nLOG: c\nLOG: d\n", "LOG: b / LOG: c / LOG: d"),
        ("", ""),
    ],
)
def test_relevant_lines(text: str, expected: str) -> None:
    assert postgres.relevant_lines(text) == expected


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["nbdkit", "file", "file=x"], ["nbdkit", "-f", "-r", "-U", "S", "file", "file=x"]),
        (["nbdkit", "-r", "python", "p.py"], ["nbdkit", "-f", "-U", "S", "-r", "python", "p.py"]),
        (["nbdkit", "-f", "-r", "file", "f"], ["nbdkit", "-U", "S", "-f", "-r", "file", "f"]),
    ],
)
def test_nbdkit_command(argv: list[str], expected: list[str]) -> None:
    assert nbdkit_command(argv, Path("S")) == expected


def test_probe_nbd_on_no_server(tmp_path: Path) -> None:
    assert probe_nbd(tmp_path / "none.sock") is False


def test_stop_process_only_signals_the_recorded_process() -> None:
    p = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        rec = proc_record(p.pid)
        assert rec["starttime"] == proc_starttime(p.pid) and proc_alive(rec)
        stale = {"pid": p.pid, "starttime": rec["starttime"] + 1}  # the pid, reused by another process
        stop_process(stale)
        assert p.poll() is None, "a reused pid must not be signalled"
        stop_process(rec, sig=signal.SIGTERM, timeout=5)
        assert not proc_alive(rec)  # (stop_process reaped it: our own child leaves no zombie)
        p.wait(timeout=5)
        stop_process(rec)  # idempotent
    finally:
        p.kill()
        p.wait()


def test_stop_process_escalates_to_sigkill() -> None:
    p = subprocess.Popen(["sh", "-c", "trap '' TERM; exec sleep 30"], start_new_session=True)
    try:
        rec = proc_record(p.pid)
        time.sleep(0.1)  # let sh install its trap
        t0 = time.monotonic()
        stop_process(rec, timeout=0.3)
        assert not proc_alive(rec) and time.monotonic() - t0 >= 0.3  # TERM ignored, then KILL
    finally:
        p.kill()
        p.wait()


def test_run_dir_state_roundtrip(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path)
    assert run.path.stat().st_mode & 0o777 == 0o711
    run.record(loop="/dev/loop9", nbdkit={"pid": 1, "starttime": 2})
    again = RunDir.load(run.path)
    assert again.state["loop"] == "/dev/loop9" and again.state["nbdkit"] == {"pid": 1, "starttime": 2}
    again.forget("loop")
    assert "loop" not in RunDir.load(run.path).state
    assert list_run_dirs(tmp_path) == [run.path]
    assert (run.path / "state.json").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(("quiet", "expected"), [(False, "serve 0.12 s\n"), (True, "")])
def test_progress(capsys: pytest.CaptureFixture[str], quiet: bool, expected: str) -> None:
    prog = Progress(quiet)
    prog.done("serve", 0.123)
    assert capsys.readouterr().err == expected
    assert prog.times == {"serve": 0.123}
