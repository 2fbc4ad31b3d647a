# Reading CONFIG and unlocking the store, in plakar's order (§3.3): parse the wrapper without
# its MAC, refuse any CONFIG version but 1.0.0, derive the key (once: Argon2id is ~1 s and
# 256 MiB) and check the canary, then check the CONFIG trailer (BLAKE3, keyed with the master
# key when encrypted, unkeyed otherwise) before trusting any field.
#
# Damaged input costs little: a plaintext CONFIG's unkeyed MAC is checked before any field is
# believed; an encrypted one's settings are used before its MAC can be checked, so everything the
# derivation and the canary use is bounded first (codec.check_encryption: at most Kloset's own
# defaults), and anything beyond is "CONFIG is damaged or from an unknown version: ...".
#
# The secret comes as a parameter: the passphrase (or a callable giving it, called only if the store
# is encrypted), or a key already derived (the CLI derives it once and hands it to the nbdkit it
# starts, so that Argon2id does not run twice). A key is checked against the canary like a
# passphrase; when both are given the key is used.
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

from kloset_blocks.errors import CorruptionError, PassphraseError, StoreError, UnsupportedVersion
from kloset_blocks.store import codec as c
from kloset_blocks.store.backend import Backend, as_backend
from kloset_blocks.store.passphrase import Secret

CONFIG_VERSION = c.pack_version(1, 0, 0)
MAX_CONFIG = 64 << 10  # Kloset's is under 1 KiB; a foreign file is not read whole


@dataclass(frozen=True)
class StoreConfig:
    version: int
    config: dict[str, Any]
    key: bytes | None
    codec: c.Codec
    raw: bytes = b""  # the CONFIG object as read


def read_config_file(backend: Backend | str, display: str | None = None) -> bytes:
    """The raw CONFIG object (StoreError: no store there, or no CONFIG in it)."""
    backend = as_backend(backend)
    try:
        return backend.read("CONFIG")
    except FileNotFoundError:
        raise StoreError(
            f"not a kloset store: {display or backend.location.display} (no CONFIG file)"
        ) from None


def load_config(
    backend: Backend | str,
    display: str,
    passphrase: Secret | None,
    key: bytes | None = None,
    raw: bytes | None = None,
) -> StoreConfig:
    """The store's configuration and codec, from its CONFIG (or from `raw`, the same object read
    moments ago by a parent process: checked exactly as one read from the store)."""
    backend = as_backend(backend)
    path = backend.describe("CONFIG")
    if raw is None:
        raw = read_config_file(backend, display)
    if len(raw) > MAX_CONFIG:  # read from the store or handed over: bounded alike
        raise CorruptionError(f"{c.DAMAGED_CONFIG}: {path} is larger than {MAX_CONFIG} bytes")
    version, payload = c.unwrap(raw, c.RT_CONFIG, None, path)
    if version != CONFIG_VERSION:
        raise UnsupportedVersion(
            f"unsupported store version {c.version_str(version)} (this reader supports 1.0.0): {display}"
        )
    # A plaintext CONFIG is covered by an unkeyed MAC: check it before believing any field (a
    # damaged byte could otherwise make it claim an Encryption section).
    plain_intact = c.config_mac(None)(raw[: -c.TRAILER_SIZE]) == raw[-c.TRAILER_SIZE :]
    try:
        config = c.unpack(payload)
    except Exception:
        raise CorruptionError(f"{c.DAMAGED_CONFIG}: {path}: cannot decode the configuration") from None
    if not isinstance(config, dict):
        raise CorruptionError(f"{c.DAMAGED_CONFIG}: {path}: the configuration is not a map")
    encryption = config.get("Encryption")
    if encryption is None and not plain_intact:
        raise CorruptionError(f"{path}: MAC mismatch (file damaged or wrong key)")
    if encryption is not None:
        try:
            subkey, canary = c.check_encryption(encryption)
        except CorruptionError as e:
            raise CorruptionError(f"{e}: {path}") from None
        if key is not None:
            if len(key) != 32 or not c.verify_canary(key, canary, subkey):
                raise PassphraseError(f"the key given does not open store {display}")
        else:
            secret = _passphrase_bytes(passphrase, display)
            try:
                key = _derive_key(secret, encryption["KDFParams"])
            except CorruptionError as e:
                raise CorruptionError(f"{e}: {path}") from None
            if not c.verify_canary(key, canary, subkey):
                raise PassphraseError(f"wrong passphrase for store {display}")
    else:
        key = None  # a key handed to a plaintext store's reader means nothing
    c.unwrap(raw, c.RT_CONFIG, c.config_mac(key), path)
    try:
        codec = c.Codec(config, key)
    except (AttributeError, TypeError, ValueError):
        raise CorruptionError(f"{path}: malformed configuration") from None
    return StoreConfig(version, config, key, codec, raw)


# This process's key derivations, by the passphrase's digest and the KDF parameters: a command that
# opens a store twice (app/check.prepare starting over on what the store holds now, or after a
# start from its last view failed) derives the key once; a derivation costs seconds by design.
_derived: dict[tuple[bytes, str], bytes] = {}


def _derive_key(secret: bytes, params: Any) -> bytes:
    memo = (hashlib.sha256(secret).digest(), repr(params))
    key = _derived.get(memo)
    if key is None:
        key = _derived[memo] = c.derive_key(secret, params)
    return key


def _passphrase_bytes(passphrase: Secret | None, display: str) -> bytes:
    if passphrase is None:
        raise PassphraseError(f"store {display} is encrypted: no passphrase given")
    if callable(passphrase):
        return passphrase()
    return os.fsencode(passphrase) if isinstance(passphrase, str) else passphrase
