# Child process of test_damage_config.py: open a store whose CONFIG is damaged in every way a
# case list gives, one case after the other, and report each outcome as one JSON line, then the
# process's peak memory. Run apart from pytest so that ru_maxrss and RLIMIT_AS measure only this,
# and so that a runaway key derivation takes down only this process.
#
#   python -m tests.config_sweep STORE_COPY ORIGINAL_CONFIG MODE [PASSPHRASE]
#
# MODE: plain-bytes / key-bytes (every byte; the derived key, given in $KLOSET_BLOCKS_STORE_KEY) /
# kdf-bytes (the bytes of KDFParams but its salt, with the passphrase: a salt byte is a different key, i.e. a
# wrong passphrase, at full cost) / fields (each bounded field set just beyond, far beyond, to a
# wrong type, or removed).
#
# The cost that reaches Argon2id and scrypt is recorded by wrapping them: the parent asserts it
# never exceeds Kloset's defaults, a bound on work that does not depend on the machine's speed.
from __future__ import annotations

import copy
import json
import os
import resource
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import argon2.low_level

from kloset_blocks.errors import KlosetError
from kloset_blocks.store import codec as c
from kloset_blocks.store import open_store
from kloset_blocks.store.passphrase import KEY_ENV

HANG_SECONDS = 120  # a hang guard, not a timing assertion: damage used to cost hours
COST: dict[str, int] = {"argon2": 0, "scrypt": 0}


def _record_costs() -> None:
    real_argon2 = argon2.low_level.hash_secret_raw
    real_scrypt = c.hashlib.scrypt

    def argon2_raw(*args: Any, **kw: Any) -> bytes:
        COST["argon2"] = max(COST["argon2"], kw["time_cost"] * kw["memory_cost"])
        return real_argon2(*args, **kw)

    def scrypt(*args: Any, **kw: Any) -> bytes:
        COST["scrypt"] = max(COST["scrypt"], kw["n"] * kw["r"] * kw["p"])
        return real_scrypt(*args, **kw)

    argon2.low_level.hash_secret_raw = argon2_raw
    c.hashlib.scrypt = scrypt  # type: ignore[attr-defined]


class Hang(Exception):
    pass


def _alarm(*_: object) -> None:
    raise Hang


def byte_cases(raw: bytes, offsets: Iterator[int]) -> Iterator[tuple[str, bytes]]:
    for i in offsets:
        for x in (0xFF, 0x01):
            damaged = bytearray(raw)
            damaged[i] ^= x
            yield f"byte {i} ^ {x:#04x}", bytes(damaged)


def kdf_offsets(raw: bytes) -> Iterator[int]:
    """Offsets of the KDFParams map in the wrapped CONFIG, without its salt's bytes."""
    config = c.unpack(raw[c.HEADER_SIZE : -c.TRAILER_SIZE])
    salt = config["Encryption"]["KDFParams"]["Salt"]
    start = raw.index(b"KDFParams")
    end = raw.index(b"Canary")
    salt_at = raw.index(salt)
    return (i for i in range(start, end) if not salt_at <= i < salt_at + len(salt))


def _rewrap(raw: bytes, config: dict) -> bytes:
    # The old trailer stays: these fields are refused before a MAC could be checked.
    return c.wrap(c.RT_CONFIG, c.pack_version(1, 0, 0), c.pack(config), lambda _: raw[-c.TRAILER_SIZE :])


def _values(low: int, high: int) -> list[Any]:
    return [high + 1, 2**32 - 1, 2**64 - 1, low - 1, -1, "4", None, True, 1.5]


def field_cases(raw: bytes) -> Iterator[tuple[str, bytes]]:
    """Every bounded field of an encrypted CONFIG, for each KDF Kloset has, set out of bounds."""
    config = c.unpack(raw[c.HEADER_SIZE : -c.TRAILER_SIZE])
    enc = config["Encryption"]
    salt = enc["KDFParams"]["Salt"]
    kdfs = {
        "ARGON2ID": {"SaltSize": 16, "Time": 4, "Memory": 262144, "Threads": 1, "KeyLen": 32},
        "SCRYPT": {"SaltSize": 16, "N": 1 << 15, "R": 8, "P": 1, "KeyLen": 32},
        "PBKDF2": {"SaltSize": 16, "Iterations": 100_000, "KeyLen": 32, "Hashing": "SHA256"},
    }
    for kdf, params in kdfs.items():
        section = c.KDF_BOUNDS[kdf][0]
        bounds = {name: (lo, hi) for name, lo, hi in c.KDF_BOUNDS[kdf][1]}
        bounds.update(KeyLen=(32, 32), SaltSize=(16, 16))
        for name in params:
            low, high = bounds.get(name, (0, 0))
            for value in [*_values(low, high), "missing"] if name != "Hashing" else ["SHA1", 1, "missing"]:
                cfg = copy.deepcopy(config)
                p = dict(params)
                if value == "missing":
                    del p[name]
                else:
                    p[name] = value
                cfg["Encryption"]["KDFParams"] = {"KDF": kdf, "Salt": salt, section: p}
                yield f"{kdf} {name}={value!r}", _rewrap(raw, cfg)
    for name, values in [
        ("SubKeyAlgorithm", ["AES256-XX", "", None, 7]),
        ("DataAlgorithm", ["AES256-GCM", None, b"x"]),
        ("ChunkSize", [0, -1, 65537, 2**31, "64k", None]),
        ("Canary", [b"", b"x" * 59, b"x" * 4096, "canary", None]),
        ("KDFParams", [None, [], {}, {"KDF": "ARGON2ID"}, {"KDF": "BCRYPT", "Salt": salt}]),
    ]:
        for value in values:
            cfg = copy.deepcopy(config)
            cfg["Encryption"][name] = value
            yield f"Encryption.{name}={value!r}", _rewrap(raw, cfg)
    for salt_value in [b"", b"x" * 7, b"x" * 65, "salt", None]:
        cfg = copy.deepcopy(config)
        cfg["Encryption"]["KDFParams"]["Salt"] = salt_value
        yield f"Salt={salt_value!r}", _rewrap(raw, cfg)
    for top in ["x", [1], None, 0]:
        cfg = copy.deepcopy(config)
        cfg["Encryption"] = top
        yield f"Encryption={top!r}", _rewrap(raw, cfg)


def main() -> None:
    store, original, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    passphrase = sys.argv[4] if len(sys.argv) > 4 else None
    key = bytes.fromhex(os.environ[KEY_ENV]) if mode == "key-bytes" else None
    _record_costs()
    signal.signal(signal.SIGALRM, _alarm)
    raw = original.read_bytes()
    cases: Iterator[tuple[str, bytes]]
    if mode in ("plain-bytes", "key-bytes"):
        cases = byte_cases(raw, iter(range(len(raw))))
    elif mode == "kdf-bytes":
        cases = byte_cases(raw, kdf_offsets(raw))
    else:
        cases = field_cases(raw)
    for name, data in cases:
        (store / "CONFIG").write_bytes(data)
        signal.alarm(HANG_SECONDS)
        outcome: dict[str, Any] = {"case": name}
        try:
            with open_store(str(store), passphrase, key=key) as st:
                outcome["opened"] = [i.hex_id for i in st.snapshots()]
        except KlosetError as e:
            outcome["error"] = str(e)
            outcome["class"] = type(e).__name__
        except Hang:
            outcome["hang"] = True
        except BaseException as e:  # what the test is for: report it, do not die
            outcome["exception"] = f"{type(e).__name__}: {e}"
        finally:
            signal.alarm(0)
        print(json.dumps(outcome), flush=True)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"maxrss_kib": usage.ru_maxrss, "cost": COST}), flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
