# The warden (app/warden.py) on its own: a command that dies by SIGKILL has its run directories torn
# down (and its temporary paths removed) by its warden within seconds; a live command's, another
# command's, and a command that ended cleanly are left alone. Real processes, real /proc and pidfds;
# the chains of real commands are in test_signals.py.
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kloset_blocks.host.rundir import RunDir

REPO = Path(__file__).resolve().parent.parent

# A stand-in command: a run directory of its own (with a process recorded in it, as a chain would
# have), a temporary directory, its warden; then it waits to be killed or told to end cleanly.
COMMAND = r"""
import subprocess, sys, time, os
from pathlib import Path
from kloset_blocks.host.procs import proc_record
from kloset_blocks.host.rundir import RunDir
from kloset_blocks.app.warden import Warden
root, tmp = sys.argv[1], Path(sys.argv[2])
run = RunDir.create(root)
child = subprocess.Popen(["sleep", "600"], start_new_session=True)
run.record(nbdkit=proc_record(child.pid))
tmp.mkdir()
warden = Warden(root, [tmp])
print(run.path, child.pid, warden.proc.pid, flush=True)
line = sys.stdin.readline()
if line.strip() == "clean":
    from kloset_blocks.app.teardown import teardown_run_dir
    teardown_run_dir(run.path)
    warden.close()
    print("done", flush=True)
"""


def _default_signals() -> None:
    # What a terminal's command starts with, whatever this test run inherited (a suite started in
    # the background by a shell, or under nohup, ignores SIGINT or SIGHUP, and so would the command).
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def _command(root: Path, tmp: Path) -> tuple[subprocess.Popen[str], Path, int, int]:
    p = subprocess.Popen(
        [sys.executable, "-c", COMMAND, str(root), str(tmp)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)}, preexec_fn=_default_signals,
    )  # fmt: skip
    assert p.stdout is not None
    run, child, warden = p.stdout.readline().split()
    return p, Path(run), int(child), int(warden)


def _gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        time.sleep(0.05)
    return False


def test_sigkill_of_the_command_tears_down_its_run_dir(tmp_path: Path) -> None:
    root = tmp_path / "root"
    other = RunDir.create(root)  # another command's chain (this test process): never touched
    p, run, child, warden = _command(root, tmp_path / "kb-tmp")
    assert run.is_dir() and (tmp_path / "kb-tmp").is_dir()
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert _gone(warden), "the warden did not finish"
    assert _gone(child), "the recorded process outlived its command"
    assert not run.exists()
    assert not (tmp_path / "kb-tmp").exists()
    assert other.path.is_dir()


def test_a_clean_end_leaves_nothing_for_the_warden(tmp_path: Path) -> None:
    root = tmp_path / "root"
    p, run, child, warden = _command(root, tmp_path / "kb-tmp")
    out, _ = p.communicate("clean\n", timeout=60)
    assert out.strip() == "done" and p.returncode == 0
    assert _gone(warden) and _gone(child) and not run.exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_terminal_signals_do_not_reach_the_warden(tmp_path: Path, sig: int) -> None:
    """The warden is in its own session: what a terminal sends the command's group spares it."""
    root = tmp_path / "root"
    p, run, child, warden = _command(root, tmp_path / "kb-tmp")
    os.killpg(os.getpgid(warden), 0)  # its own group exists
    assert os.getpgid(warden) != os.getpgid(p.pid)
    p.send_signal(sig)
    p.wait()
    assert _gone(warden) and _gone(child) and not run.exists()
