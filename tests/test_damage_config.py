# A damaged CONFIG costs little: every byte of both fixtures' CONFIG damaged (two ways), and every
# field the key derivation uses set beyond what Kloset writes, opens to one KlosetError line, with
# the work that reaches Argon2id / scrypt never above Kloset's defaults and the process's peak
# memory bounded. The cases run in a child (tests/config_sweep.py) under RLIMIT_AS, so a runaway
# allocation fails there instead of taking the machine, and ru_maxrss measures only the sweep.
from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
from pathlib import Path

import pytest

from kloset_blocks.errors import UsageError
from kloset_blocks.store import codec as c
from kloset_blocks.store.passphrase import KEY_ENV
from tests.store_helpers import (
    ENC,
    PASSPHRASE,
    PLAIN,
    PYTHON,
    REPO,
    assert_one_line_error,
    copy_store,
    enc_store,
    run_cli,
)

ADDRESS_SPACE = 2 << 30  # far below the 4 GiB a damaged Memory field used to ask for
PEAK_KIB = 600 << 10  # one Argon2id at Kloset's default (256 MiB) plus the interpreter
ARGON2_MAX = 4 * 262144  # time x memory (KiB) of Kloset's default
SCRYPT_MAX = (1 << 15) * 8


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def sweep(tmp_path: Path, fixture: Path, mode: str, passphrase: str | None = None) -> list[dict]:
    store = copy_store(fixture, tmp_path / "store")
    env = {k: v for k, v in os.environ.items() if k not in ("PLAKAR_PASSPHRASE", KEY_ENV)}
    if mode == "key-bytes":
        env[KEY_ENV] = enc_store().codec.key.hex()  # type: ignore[union-attr]
    args = [PYTHON, "-m", "tests.config_sweep", str(store), str(fixture / "CONFIG"), mode]
    proc = subprocess.run(
        [*args, *([passphrase] if passphrase else [])],
        capture_output=True,
        env=env,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        preexec_fn=_limit_memory,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    lines = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    summary = lines.pop()
    assert summary["maxrss_kib"] < PEAK_KIB, summary
    assert summary["cost"]["argon2"] <= ARGON2_MAX and summary["cost"]["scrypt"] <= SCRYPT_MAX, summary
    assert lines, "no case ran"
    for outcome in lines:
        assert "error" in outcome, outcome  # never a hang, a traceback, nor a damaged store opened
        assert "\n" not in outcome["error"] and outcome["error"], outcome
    return lines


def test_every_byte_of_a_plaintext_config(tmp_path: Path) -> None:
    outcomes = sweep(tmp_path, PLAIN, "plain-bytes")
    assert len(outcomes) == 2 * (PLAIN / "CONFIG").stat().st_size
    # Nothing is believed before the unkeyed MAC: only the wrapper's own checks come first.
    for o in outcomes:
        assert "CONFIG" in o["error"] or "unsupported store version" in o["error"], o


def test_every_byte_of_an_encrypted_config(tmp_path: Path) -> None:
    outcomes = sweep(tmp_path, ENC, "key-bytes")
    assert len(outcomes) == 2 * (ENC / "CONFIG").stat().st_size
    refused = [o for o in outcomes if c.DAMAGED_CONFIG in o["error"]]
    assert any("argon2id.Time" in o["error"] for o in refused)
    assert any("argon2id.Memory" in o["error"] for o in refused)
    assert any("subkey algorithm" in o["error"] for o in refused)


def test_every_byte_of_the_kdf_settings_with_the_passphrase(tmp_path: Path) -> None:
    outcomes = sweep(tmp_path, ENC, "kdf-bytes", PASSPHRASE)
    assert len(outcomes) > 100
    assert sum(c.DAMAGED_CONFIG in o["error"] for o in outcomes) > len(outcomes) // 2


def test_every_bounded_field_beyond_kloset(tmp_path: Path) -> None:
    outcomes = sweep(tmp_path, ENC, "fields", PASSPHRASE)
    for o in outcomes:
        assert str(tmp_path) in o["error"] and o["class"] == "CorruptionError", o
        if o["case"] == "Encryption=None":  # now it claims to be plaintext: the unkeyed MAC says no
            assert "MAC mismatch" in o["error"]
        else:
            assert o["error"].startswith(c.DAMAGED_CONFIG + ": "), o
    assert len(outcomes) > 150


def test_kloset_defaults_and_cheaper_settings_are_accepted() -> None:
    salt = bytes(16)
    base = {"SaltSize": 16, "KeyLen": 32}
    for kdf, section, params in [
        ("ARGON2ID", "argon2id", {"Time": 1, "Memory": 8, "Threads": 1}),
        ("SCRYPT", "scrypt", {"N": 1 << 15, "R": 8, "P": 1}),
        ("PBKDF2", "pbkdf2", {"Iterations": 100_000, "Hashing": "SHA256"}),
    ]:
        key = c.derive_key(b"pw", {"KDF": kdf, "Salt": salt, section: {**base, **params}})
        assert len(key) == 32
    params = {"SaltSize": 16, "Iterations": 7, "KeyLen": 32, "Hashing": "SHA256"}
    key = c.derive_key(b"pw", {"KDF": "PBKDF2", "Salt": salt, "pbkdf2": params})
    assert key == hashlib.pbkdf2_hmac("sha256", b"pw", salt, 7, 32)


def test_writer_refuses_settings_a_reader_would_refuse(tmp_path: Path) -> None:
    from kloset_blocks.writer import write_store

    with pytest.raises(UsageError, match=r"argon2id\.Time is 5 \(Kloset writes 1 to 4\)"):
        src = tmp_path / "src"
        src.mkdir()
        write_store(tmp_path / "s", str(src), passphrase=b"pw", kdf_time=5)


def test_cli_names_the_damaged_field(tmp_path: Path) -> None:
    store = copy_store(ENC, tmp_path / "enc")
    raw = bytearray((store / "CONFIG").read_bytes())
    at = raw.index(b"\xa4Time\xce") + 9  # the low byte of its uint32 value, 4
    raw[at] = 0x7F  # 127 passes: once hours of Argon2id
    (store / "CONFIG").write_bytes(bytes(raw))
    proc = run_cli("snapshots", str(store), env={"PLAKAR_PASSPHRASE": PASSPHRASE})
    assert_one_line_error(proc, c.DAMAGED_CONFIG, "argon2id.Time is 127 (Kloset writes 1 to 4)", str(store))
