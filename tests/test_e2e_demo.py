# `make demo` (python -m kloset_blocks.demo), run as a user runs it, into a private data directory: the
# first run builds the store from a throwaway cluster, the second reuses it without one, and a tampered
# record of the live answers makes it fail. The expected answers are computed here from the sample's
# setup SQL (kloset_blocks.demo.sample), independently of both the live server and the snapshot.
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kloset_blocks.host.rundir import RUN_ROOT_ENV
from tests.conftest import REPO, private_run_root

pytestmark = [pytest.mark.root, pytest.mark.slow]

ACCOUNTS = 100_000  # pgbench -i -s 1
BALANCE = sum(aid % 97 for aid in range(1, ACCOUNTS + 1) if aid % 10 == 0)  # sample.SETUP_SQL
ITEMS = [i for i in range(1, 51) if i % 7]


@pytest.fixture(scope="module")
def run_root() -> Iterator[Path]:
    with private_run_root("demo") as root:
        yield root


@pytest.fixture(scope="module")
def tmpdir_for_demo() -> Iterator[Path]:
    # The demo's TMPDIR: the throwaway cluster is made there (the postgres user must traverse it),
    # so "it was removed" is checkable without looking at anyone else's files.
    d = Path(tempfile.mkdtemp(prefix="kb-demo-test-"))
    os.chmod(d, 0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo") / "data"


def demo(data: Path, run_root: Path, tmpdir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kloset_blocks.demo", "--data-dir", str(data)],
        cwd=REPO,
        env={**os.environ, RUN_ROOT_ENV: str(run_root), "TMPDIR": str(tmpdir)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_answers(out: str) -> None:
    rows = [[cell.strip() for cell in ln.split("|")] for ln in out.splitlines() if "|" in ln]
    assert [str(ACCOUNTS), str(BALANCE)] in rows, out
    assert ["1", "42"] in rows, out
    assert [str(len(ITEMS)), str(ITEMS[0]), str(ITEMS[-1])] in rows, out
    for i in ITEMS[:5]:
        assert [str(i), f"item-{i}"] in rows, out


def test_demo_builds_the_store_and_answers(data: Path, run_root: Path, tmpdir_for_demo: Path) -> None:
    first = demo(data, run_root, tmpdir_for_demo)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "pg_basebackup -F tar -X fetch -c fast" in first.stdout
    assert "the answers equal the live server's at backup time" in first.stdout
    assert_answers(first.stdout)
    for phase in ("serve", "mount", "recovery", "ready", "teardown"):
        assert f"     {phase} " in first.stdout, phase
    assert "fetched " in first.stdout and "from the store" in first.stdout
    assert list(tmpdir_for_demo.iterdir()) == [], "the throwaway cluster (or the tar) was left behind"
    assert list(run_root.iterdir()) == []


def test_demo_reuses_the_store_without_a_cluster(data: Path, run_root: Path, tmpdir_for_demo: Path) -> None:
    second = demo(data, run_root, tmpdir_for_demo)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "reusing " in second.stdout and "cluster:" not in second.stdout
    assert "the answers equal the live server's at backup time" in second.stdout
    assert_answers(second.stdout)
    assert list(tmpdir_for_demo.iterdir()) == []
    assert list(run_root.iterdir()) == []


def test_demo_fails_when_the_answers_differ(data: Path, run_root: Path, tmpdir_for_demo: Path) -> None:
    answers = data / "demo-answers.json"
    record = json.loads(answers.read_text())
    record["psql_output"] = record["psql_output"].replace(str(ACCOUNTS), str(ACCOUNTS + 1))
    answers.write_text(json.dumps(record))
    res = demo(data, run_root, tmpdir_for_demo)
    assert res.returncode == 1
    assert "MISMATCH" in res.stdout
