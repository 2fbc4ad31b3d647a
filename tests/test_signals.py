# No chain outlives its command: the real CLI in another process (tests/standin_cli.py: nbdkit's file
# plugin over an ext4 image of a real PostgreSQL 15 backup), signalled at the worst instants.
#
# Oracles: the kernel (/proc/mounts, loop devices), /proc (recorded pids with start times, command
# lines naming the run directory), the run root (empty) and the CLI's exit status and stderr.
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from kloset_blocks.host.procs import proc_alive, processes_mentioning
from kloset_blocks.host.rundir import RUN_ROOT_ENV
from tests.test_attach import REPO, Backup, assert_clean, backup, run_root, standin_cli  # noqa: F401

pytestmark = [pytest.mark.root, pytest.mark.slow]

# SIGTERM the instant `ready` is printed: bounded, but enough runs to hit every instant around it.
READY_RUNS = 10


def _states(root: Path) -> list[dict[str, Any]]:
    out = []
    for d in root.iterdir():
        with_state = d / "state.json"
        if with_state.exists():
            out.append(json.loads(with_state.read_text()))
    return out


def _wait_clean(root: Path, timeout: float = 30.0) -> None:
    """Poll until the run root is empty and nothing runs that names it (an upper bound, not a timing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not list(root.iterdir()) and not processes_mentioning(str(root) + "/"):
            return
        time.sleep(0.1)


def _until_ready(p: subprocess.Popen[str]) -> list[str]:
    assert p.stderr is not None
    lines = []
    for line in p.stderr:
        lines.append(line)
        if line.startswith("ready "):
            return lines
    pytest.fail(f"never ready: {''.join(lines)}")


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_signal_exactly_at_ready_leaves_nothing(
    backup: Backup,  # noqa: F811
    run_root: Path,  # noqa: F811
    signame: str,
) -> None:
    # SIGTERM goes to the CLI alone (a service manager, `kill`): we stop psql and tear down, 130.
    # SIGINT goes to the whole process group, as a terminal's Ctrl-C does: before psql runs we unwind
    # (130); psql, once running, cancels and exits 1; in the instant psql is being started the
    # Ctrl-C is psql's business and lost (it runs its statement: 0). Never anything left behind.
    sig = getattr(signal, signame)
    sleep, codes = ("30", (130,)) if sig == signal.SIGTERM else ("2", (130, 1, 0))
    for run in range(READY_RUNS if signame == "SIGTERM" else READY_RUNS // 2 - 1):
        sql = f"select pg_sleep({sleep})"
        p = standin_cli(
            backup, "psql", "fs:/standin", "snap", "-d", "shop", "-c", sql, start_new_session=True
        )
        lines = _until_ready(p)
        if sig == signal.SIGINT:  # the instant `ready` is read: psql may not even have started
            os.killpg(p.pid, sig)
        else:
            p.send_signal(sig)
        states = _states(run_root)
        _, err = p.communicate(timeout=60)
        assert p.returncode in codes, f"run {run}: rc {p.returncode}\n{''.join(lines)}{err}"
        assert "Traceback" not in err, err
        assert "teardown " in err, err
        for st in states:
            assert_clean(st, run_root)
        assert list(run_root.iterdir()) == [], f"run {run}: left behind\n{''.join(lines)}{err}"


@pytest.mark.parametrize("command", ["psql"])
def test_sigkill_of_the_cli_tears_the_chain_down(
    backup: Backup,  # noqa: F811
    run_root: Path,  # noqa: F811
    command: str,
) -> None:
    p = standin_cli(backup, "psql", "fs:/standin", "snap", "-d", "shop", "-c", "select pg_sleep(60)")
    _until_ready(p)
    (state,) = _states(run_root)
    assert proc_alive(state["postgres"]["postmaster"])
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    _wait_clean(run_root)
    assert_clean(state, run_root)


# --- query: one CLI, a shared nbdkit, one chain per snapshot -----------------------------------------

GOLDEN = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures" / "golden-plain"


def _query_cli(root: Path, sql: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "PLAKAR_PASSPHRASE"}
    return subprocess.Popen(
        [sys.executable, "-m", "kloset_blocks", "query", f"fs:{GOLDEN}", "--db", "shop", "-j", "2", sql],
        cwd=REPO, env={**env, RUN_ROOT_ENV: str(root)},
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _until_postgres(root: Path, n: int, p: subprocess.Popen[str], timeout: float = 120) -> None:
    """Until n chains run a Postgres server (their state records it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(1 for st in _states(root) if "postgres" in st) >= n:
            return
        assert p.poll() is None, p.communicate()
        time.sleep(0.05)
    pytest.fail("the chains never came up")


def _query_tmp_dirs() -> set[str]:
    return {d for d in os.listdir(tempfile.gettempdir()) if d.startswith("kb-query-")}


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGKILL"])
def test_query_killed_leaves_nothing(run_root: Path, signame: str) -> None:  # noqa: F811
    before = _query_tmp_dirs()
    p = _query_cli(run_root, "select pg_sleep(60)")
    _until_postgres(run_root, 2, p)
    mine = _query_tmp_dirs() - before
    assert len(mine) == 1  # this run's stats directory
    states = _states(run_root)
    p.send_signal(getattr(signal, signame))
    _, err = p.communicate(timeout=120)
    if signame == "SIGTERM":
        assert p.returncode == 130, err
        assert "Errno" not in err and "Traceback" not in err, err
        assert "kloset-blocks: teardown" not in err, err  # no teardown problem reported
    _wait_clean(run_root)
    for st in states:
        assert_clean(st, run_root)
    assert not (mine & _query_tmp_dirs()), "the query's temporary directory was left behind"


# --- a component dying under a session is said, with its own words, and is not exit 0 ---------------


def test_nbdkit_dying_during_psql_is_reported_not_exit_0(backup: Backup, run_root: Path) -> None:  # noqa: F811
    # psql sleeps, then reads what Postgres has cached already (so psql itself may well succeed).
    p = standin_cli(backup, "psql", "fs:/standin", "snap", "-d", "shop", "-c", "select pg_sleep(2)",
                    "-c", "select 1")  # fmt: skip
    _until_ready(p)
    (state,) = _states(run_root)
    os.kill(state["nbdkit"]["pid"], signal.SIGKILL)
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0, err  # psql's own status if it failed, else 1
    assert "nbdkit, which served the snapshot, died during the session" in err, err
    assert "nbdkit was killed by a signal" in err, err
    assert "did not exit normally" not in err  # setsid's words say nothing: nbdkit's own are given
    assert_clean(state, run_root)


def test_query_names_its_nbdkit_dying(run_root: Path) -> None:  # noqa: F811
    p = _query_cli(run_root, "select pg_sleep(3), sum(abalance) from pgbench_accounts")
    _until_postgres(run_root, 2, p)
    (server,) = [st for st in _states(run_root) if "nbdkit" in st and "postgres" not in st]
    states = _states(run_root)
    os.kill(server["nbdkit"]["pid"], signal.SIGKILL)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 1, out + err
    assert "Traceback" not in out + err
    assert (out + err).count("nbdkit, which served the snapshot, died during the session") >= 2, out + err
    _wait_clean(run_root)
    for st in states:
        assert_clean(st, run_root)


# --- the viewer (`kloset-blocks ui`) -------------------------------------------------------------


def test_sigkill_of_the_viewer_tears_its_chains_down(fixtures_dir: Path) -> None:
    from tests.conftest import private_run_root
    from tests.test_ui import A, login, request, start_ui

    with private_run_root("ui-kill") as root:
        ui = start_ui(fixtures_dir / "golden-plain", root)
        try:
            auth = {"Cookie": login(ui.url)}
            assert request(ui, "POST", f"/api/snapshots/{A}/open", headers=auth, body={})[0] == 200
            for _ in range(1200):
                _, text = request(ui, "GET", f"/api/snapshots/{A}/session", headers=auth)
                if json.loads(text)["state"] == "ready":
                    break
                time.sleep(0.1)
            (state,) = _states(root)
            assert proc_alive(state["postgres"]["postmaster"])
            os.kill(ui.proc.pid, signal.SIGKILL)
            ui.proc.wait()
        finally:
            if ui.proc.poll() is None:
                ui.proc.kill()
        _wait_clean(root)
        assert_clean(state, root)
