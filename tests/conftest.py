from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kloset_blocks.serving.server import Server

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # `root` tests mount, attach loop devices and run Postgres as its own user: as any other user
    # they cannot run at all, so they are skipped with the reason (CI runs as root).
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (mounts, loop devices, the postgres user)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    assert FIXTURES.is_dir(), f"../shared/fixtures not found beside the repo at {FIXTURES}"
    return FIXTURES


@contextlib.contextmanager
def private_run_root(prefix: str) -> Iterator[Path]:
    """A run root of our own for the chains a test starts (KLOSET_BLOCKS_RUN_ROOT), so that a `down`
    there cannot touch anyone else's chains and "nothing left behind" is checkable. Postgres must
    traverse it: 0711."""
    root = Path("/run/kloset-blocks-test") / f"{prefix}-{uuid.uuid4().hex[:8]}"
    root.mkdir(parents=True)
    os.chmod(root.parent, 0o711)
    os.chmod(root, 0o711)
    from kloset_blocks.app.teardown import teardown_all

    try:
        yield root
    finally:  # a failing test body must not leave its chains running either
        leftovers = list(root.iterdir())
        teardown_all(root)
        shutil.rmtree(root, ignore_errors=True)
    assert not leftovers, f"run directories left behind: {leftovers}"


@pytest.fixture
def run_root(request: pytest.FixtureRequest) -> Iterator[Path]:
    with private_run_root(request.module.__name__.rsplit(".", 1)[-1]) as root:
        yield root


def server_for(store: Path | str, *params: str, snapshot: str = "bf6afbae") -> Server:
    """The nbdkit plugin's Server, configured and ready, in this process (golden-plain snapshot A by
    default): for tests of the plugin's logic without nbdkit."""
    server = Server()
    for key, value in (("store", str(store)), ("snapshot", snapshot), *(p.split("=", 1) for p in params)):
        server.configure(key, value)
    server.config_complete()
    server.get_ready()
    return server


# Real remote-store servers on loopback (tests/remote_servers.py), one per test module that uses them.
@pytest.fixture(scope="module")
def s3() -> Iterator[object]:
    from tests.remote_servers import moto_server

    with moto_server() as server:
        yield server


@pytest.fixture(scope="module")
def ssh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from tests.remote_servers import sshd_server

    with sshd_server(tmp_path_factory.mktemp("ssh")) as server:
        yield server
