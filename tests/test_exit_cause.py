# Messages about a component that exited never end in a bare colon: host.tools.exit_cause on real
# processes started as the chain starts its daemons (host.procs.spawn), alone and under the keeper
# as nbdkit runs (host/keeper.py), and their real logs.
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kloset_blocks.host.backing import KEEPER
from kloset_blocks.host.procs import spawn
from kloset_blocks.host.tools import exit_cause, log_tail

CASES = [
    # (shell script, under the keeper, the cause)
    ("kill -9 $$", False, "qsd was killed by SIGKILL, and its log {log} says nothing more"),
    (
        "echo 'qsd: cannot open overlay' >&2; exit 1",
        False,
        "qsd: cannot open overlay (qsd exited with status 1)",
    ),
    ("exit 3", False, "qsd exited with status 3, and its log {log} says nothing more"),
    ("echo 'Assertion failed' >&2; kill -6 $$", True, "Assertion failed (qsd was killed by SIGABRT)"),
    ("kill -9 $$", True, "qsd was killed by SIGKILL, and its log {log} says nothing more"),
]


@pytest.mark.parametrize(("script", "kept", "expected"), CASES)
def test_exit_cause_names_what_happened(tmp_path: Path, script: str, kept: bool, expected: str) -> None:
    log = tmp_path / "log"
    keeper = [sys.executable, "-I", "-S", str(KEEPER)] if kept else []
    rc = spawn([*keeper, "sh", "-c", script], log, "qsd", secret_env={} if kept else None).wait()
    if kept:
        assert "kloset-blocks keeper: sh was killed by SIG" in log.read_text()  # the keeper's own line
    cause = exit_cause(rc, log, "qsd")
    assert cause == expected.format(log=log)
    assert "keeper" not in log_tail(log)


def test_the_keeper_hands_its_child_the_secret_environment(tmp_path: Path) -> None:
    log = tmp_path / "log"
    script = "echo child:$KB_SECRET; tr '\\0' '\\n' < /proc/$PPID/environ | grep -c KB_SECRET || true"
    rc = spawn([sys.executable, "-I", "-S", str(KEEPER), "sh", "-c", script], log, "x",
               secret_env={"KB_SECRET": "s3"}).wait()  # fmt: skip
    assert rc == 0
    assert log.read_text().split() == ["child:s3", "0"]  # the child has it, its parent (the keeper) not
