"""The S3 backend against a server that checks signatures: moto with authentication on (it
recomputes each request's SigV4 signature with botocore's signer and checks the key's IAM policy),
so every request the CLI, the nbdkit plugin and mkstore send must be signed right. With the right
key the answers equal the fs store's; a wrong secret or a wrong access key is one clear line and
exit 1 from the CLI and psql, and one error line (no traceback) ending the plugin's start."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kloset_blocks.store import open_store
from kloset_blocks.store.options import CONFIG_ENV
from tests.conftest import REPO
from tests.remote_servers import S3Server, moto_server
from tests.test_e2e_pg import GOLDEN_ANSWERS, GOLDEN_B, GOLDEN_QUERIES, cli, psql_args
from tests.test_remote_store import _cli, _one_line_failure, _tree

AUTH_HINT = "(check access_key and secret_access_key)"


@pytest.fixture(scope="module")
def s3_auth(fixtures_dir: Path) -> Iterator[S3Server]:
    with moto_server(auth=True) as server:
        server.put_tree(fixtures_dir / "golden-plain", "auth", "plain")
        yield server


@pytest.fixture
def configs(s3_auth: S3Server, tmp_path: Path) -> dict[str, Path]:
    return {
        "right": s3_auth.config(tmp_path / "right.conf"),
        "wrong secret": s3_auth.config(tmp_path / "secret.conf", secret_access_key=s3_auth.secret_key + "x"),
        "wrong key": s3_auth.config(tmp_path / "key.conf", access_key="AKIAIOSFODNN7EXAMPLE"),
    }


def test_right_key_reads_what_fs_reads(
    s3_auth: S3Server, configs: dict[str, Path], fixtures_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whole GETs, ranged GETs and paged listings, all signed: every entry and chunk equal fs."""
    monkeypatch.setenv(CONFIG_ENV, str(configs["right"]))
    remote = _tree(s3_auth.location("auth", "plain"))
    assert remote == _tree(str(fixtures_dir / "golden-plain")) and len(remote) > 1300
    r = _cli(
        "cat", s3_auth.location("auth", "plain"), "3b11:/PG_VERSION", "--store-config", str(configs["right"])
    )
    assert (r.returncode, r.stdout) == (0, "15\n"), r.stderr


@pytest.mark.parametrize(
    ("which", "code"), [("wrong secret", "SignatureDoesNotMatch"), ("wrong key", "InvalidAccessKeyId")]
)
def test_wrong_credentials_are_one_line(
    s3_auth: S3Server, configs: dict[str, Path], which: str, code: str
) -> None:
    r = _cli("snapshots", s3_auth.location("auth", "plain"), "--store-config", str(configs[which]))
    _one_line_failure(r, f"{code} {AUTH_HINT}")
    assert "after" not in r.stderr  # an authentication failure is not retried


@pytest.mark.parametrize(
    ("which", "code"), [("wrong secret", "SignatureDoesNotMatch"), ("wrong key", "InvalidAccessKeyId")]
)
def test_wrong_credentials_end_the_plugin_start_in_one_line(
    s3_auth: S3Server, configs: dict[str, Path], tmp_path: Path, which: str, code: str
) -> None:
    env = {**os.environ, CONFIG_ENV: str(configs[which]), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    argv = ["nbdkit", "-f", "-U", str(tmp_path / "nbd.sock"), "python", str(REPO / "nbdplugin" / "kloset.py")]
    argv += [f"store={s3_auth.location('auth', 'plain')}", f"snapshot={GOLDEN_B[:8]}"]
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and f"{code} {AUTH_HINT}" in lines[0], r.stderr
    assert not (tmp_path / "nbd.sock").exists()


def test_mkstore_signs_its_writes(
    s3_auth: S3Server, configs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CreateBucket and PutObject with a signed payload hash; the store reads back."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(os.urandom(200_000))
    location = s3_auth.location("made-auth", "x")
    wrong = _cli(
        "mkstore",
        location,
        "--from-dir",
        str(src),
        "--plaintext",
        "--store-config",
        str(configs["wrong secret"]),
    )
    _one_line_failure(wrong, f"cannot create bucket made-auth at 127.0.0.1: AccessDenied {AUTH_HINT}")
    made = _cli(
        "mkstore", location, "--from-dir", str(src), "--plaintext", "--store-config", str(configs["right"])
    )
    assert made.returncode == 0, made.stderr
    monkeypatch.setenv(CONFIG_ENV, str(configs["right"]))
    with open_store(location) as st:
        (info,) = st.snapshots()
        assert info.hex_id == made.stdout.strip()
        data = st.open_snapshot(info.hex_id).open_file(b"/a.bin").read(0, 200_000)
    assert data == (src / "a.bin").read_bytes()


@pytest.mark.root
@pytest.mark.slow
def test_psql_wrong_key_one_line_right_key_answers(
    s3_auth: S3Server, configs: dict[str, Path], run_root: Path, tmp_path: Path
) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    location = s3_auth.location("auth", "plain")
    query = psql_args([("shop", q) for q in GOLDEN_QUERIES])

    def psql_with(config: str) -> subprocess.CompletedProcess[str]:
        return cli(
            run_root,
            "psql",
            location,
            GOLDEN_B[:8],
            "--store-config",
            str(configs[config]),
            "--",
            *query,
            env=env,
        )

    wrong = psql_with("wrong secret")
    _one_line_failure(wrong, f"SignatureDoesNotMatch {AUTH_HINT}")
    assert not list(run_root.iterdir())
    right = psql_with("right")
    assert right.returncode == 0, right.stderr
    assert right.stdout.splitlines() == GOLDEN_ANSWERS[GOLDEN_B]
    assert not list(run_root.iterdir())
