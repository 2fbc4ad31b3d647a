"""`kloset-blocks psql` end to end on remote stores seen through the project's delaying proxy (25 ms
each way, 200 Mbit/s, loopback): S3 (moto) and SFTP (sshd), plaintext and encrypted fixtures. The
answers must be the live server's at backup time (the fixtures' README), the bucket and remote
directory unchanged, the on-disk cache on by default (a second run fetches less), nothing left
behind."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.remote_servers import S3Server, SshServer, delay_proxy
from tests.test_e2e_pg import GOLDEN_A, GOLDEN_ANSWERS, GOLDEN_B, GOLDEN_QUERIES, cli, psql_args

pytestmark = [pytest.mark.root, pytest.mark.slow]
PASS = "correct horse battery staple"
ENC_A = "0b3eff1d"  # golden-enc's one snapshot: the same backup as golden-plain's A


def _fetched(stderr: str) -> float:
    m = re.search(r"fetched ([\d.]+) (B|KiB|MiB|GiB) of", stderr)
    assert m, stderr
    return float(m.group(1)) * {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[m.group(2)]


def test_psql_over_s3_through_delay(s3: S3Server, fixtures_dir: Path, run_root: Path, tmp_path: Path) -> None:
    s3.put_tree(fixtures_dir / "golden-plain", "e2e", "plain")
    before = s3.listing("e2e")
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    with delay_proxy(s3.port, tmp_path, delay_ms=25, rate_mbit=200) as proxy:
        config = s3.config(tmp_path / "s3.conf")
        location = s3.location("e2e", "plain", port=proxy.port)
        args = ["psql", location, GOLDEN_B[:8], "--store-config", str(config), "--"]
        first = cli(run_root, *args, *psql_args([("shop", q) for q in GOLDEN_QUERIES]), env=env)
        assert first.returncode == 0, first.stderr
        assert first.stdout.splitlines() == GOLDEN_ANSWERS[GOLDEN_B]
        second = cli(run_root, *args, *psql_args([("shop", q) for q in GOLDEN_QUERIES]), env=env)
        assert second.returncode == 0, second.stderr
        assert second.stdout.splitlines() == GOLDEN_ANSWERS[GOLDEN_B]
    assert (tmp_path / "cache" / "kloset-blocks").is_dir()  # on by default for a remote store
    # (the metadata preload is fetched again at each start: a few hundred KiB here)
    assert _fetched(second.stderr) < _fetched(first.stderr) / 4
    assert proxy.stats()["bytes_down"] > 0  # the runs really went through the proxy
    assert s3.listing("e2e") == before
    assert not list(run_root.iterdir())


def test_psql_over_sftp_encrypted_through_delay(
    ssh: SshServer, fixtures_dir: Path, run_root: Path, tmp_path: Path
) -> None:
    remote = tmp_path / "remote" / "enc"
    shutil.copytree(fixtures_dir / "golden-enc", remote)
    before = sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in remote.rglob("*"))
    with delay_proxy(ssh.port, tmp_path, delay_ms=25, rate_mbit=200) as proxy:
        config = ssh.config(tmp_path / "sftp.conf", known_hosts=str(ssh.known_hosts_for(proxy.port)))
        location = ssh.location(remote, port=proxy.port)
        queries = psql_args([("shop", q) for q in GOLDEN_QUERIES])

        def psql(passphrase: str) -> subprocess.CompletedProcess[str]:
            env = {"PLAKAR_PASSPHRASE": passphrase, "XDG_CACHE_HOME": str(tmp_path / "cache")}
            args = ["psql", location, ENC_A, "--store-config", str(config), "--", *queries]
            return cli(run_root, *args, env=env, timeout=300)

        runs = [psql(PASS) for _ in range(2)]  # the second from the store's last view, unlocked
        wrong = psql("not it")
    assert wrong.returncode == 1
    assert wrong.stderr.strip().splitlines()[-1].startswith("kloset-blocks: wrong passphrase for store")
    assert "Traceback" not in wrong.stderr
    for res in runs:
        assert res.returncode == 0, res.stderr
        assert res.stdout.splitlines() == GOLDEN_ANSWERS[GOLDEN_A]
    assert list((tmp_path / "cache" / "kloset-blocks" / "views").iterdir())  # the view it started from
    assert sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in remote.rglob("*")) == before
    assert not list(run_root.iterdir())


def test_psql_answers_from_what_the_store_holds_when_it_changed_since_the_last_start(
    s3: S3Server, fixtures_dir: Path, run_root: Path, tmp_path: Path
) -> None:
    """A start from the store's last view (no round trip before the chain starts) answers only once
    the store is checked: when B's backup landed since, `latest` is B, and the command starts again."""
    b_state = next(p for p in (fixtures_dir / "golden-plain" / "states").rglob(f"{GOLDEN_B}*"))
    before = tmp_path / "before"
    shutil.copytree(fixtures_dir / "golden-plain", before)
    (before / b_state.relative_to(fixtures_dir / "golden-plain")).unlink()
    s3.put_tree(before, "e2e-stale", "p")
    config = s3.config(tmp_path / "s3.conf")
    args = ["psql", s3.location("e2e-stale", "p"), "latest", "--store-config", str(config), "--"]
    query = psql_args([("shop", q) for q in GOLDEN_QUERIES])
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    first = cli(run_root, *args, *query, env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == GOLDEN_ANSWERS[GOLDEN_A]
    s3.client().fput_object(
        "e2e-stale", f"p/{b_state.relative_to(fixtures_dir / 'golden-plain')}", str(b_state)
    )
    second = cli(run_root, *args, *query, env=env)
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines() == GOLDEN_ANSWERS[GOLDEN_B]
    assert "the store changed since its last view" in second.stderr
    third = cli(run_root, *args, *query, env=env)
    assert third.stdout.splitlines() == GOLDEN_ANSWERS[GOLDEN_B]
    assert "changed" not in third.stderr
    assert not list(run_root.iterdir())
