# Messages about a component that exited never end in a bare colon nor in setsid's "did not exit
# normally": host.tools.exit_cause on real processes started as the chain starts its daemons
# (host.procs.spawn), alone and under `setsid -w` as nbdkit runs, and their real logs.
from __future__ import annotations

from pathlib import Path

import pytest

from kloset_blocks.host.procs import spawn
from kloset_blocks.host.tools import exit_cause, log_tail

CASES = [
    # (shell script, under setsid -w, the cause)
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


@pytest.mark.parametrize(("script", "setsid", "expected"), CASES)
def test_exit_cause_names_what_happened(tmp_path: Path, script: str, setsid: bool, expected: str) -> None:
    log = tmp_path / "log"
    rc = spawn((["setsid", "-w"] if setsid else []) + ["sh", "-c", script], log, "qsd").wait()
    if setsid:
        assert "did not exit normally" in log.read_text()  # what setsid itself says
    cause = exit_cause(rc, log, "qsd")
    assert cause == expected.format(log=log)
    assert "did not exit normally" not in log_tail(log)
