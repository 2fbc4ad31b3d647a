# Shared helpers for the store reader tests: the fixture stores, their manifests (the oracle),
# and byte-flipping on copies. Opened stores are cached per process, so Argon2id (~1 s) runs once.
from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from kloset_blocks.store import Store, open_store

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO.parent / "shared" / "fixtures"
PLAIN = FIXTURES / "golden-plain"
ENC = FIXTURES / "golden-enc"
PASSPHRASE = "correct horse battery staple"
SNAP_A_PLAIN = "bf6afbaef15411cad49bd0cb276075c35b157f0d9b2ac15c9fad05e346641a7c"
SNAP_B_PLAIN = "3b116f400535e37b338dd8f220ffa26fe9d3c1df8f7ed35994f9df090323efa2"
SNAP_A_ENC = "0b3eff1dd4adbafe748cb61b9aa4d1cedd88f76ffd3690e1ecfe74596255b9a8"
PYTHON = str(REPO / ".venv" / "bin" / "python")


@functools.cache
def plain_store() -> Store:
    return open_store(f"fs:{PLAIN}")


@functools.cache
def enc_store() -> Store:
    return open_store(f"fs://{ENC}", PASSPHRASE)


@functools.cache
def manifest(name: str) -> dict[str, dict]:
    with open(FIXTURES / f"pg-{name}.manifest.json") as f:
        return {e["path"]: e for e in json.load(f)["entries"]}


def copy_store(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def flip_byte(path: str | os.PathLike, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def run_cli(
    *args: str, env: dict[str, str] | None = None, stdin: bytes | None = b""
) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "PLAKAR_PASSPHRASE"}
    full_env.update(env or {})
    return subprocess.run(
        [PYTHON, "-m", "kloset_blocks", *args],
        input=stdin,
        capture_output=True,
        env=full_env,
        cwd=REPO,
        timeout=120,
        check=False,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 1, (proc.returncode, err)
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.startswith("kloset-blocks: "), err
    for n in needles:
        assert n in err, (n, err)
    return err


__all__ = ["sys"]
