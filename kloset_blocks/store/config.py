# Reading CONFIG and unlocking the store, in plakar's order (§3.3): parse the wrapper without
# its MAC, refuse any CONFIG version but 1.0.0, derive the key (once: Argon2id is ~1 s and
# 256 MiB) and check the canary, then check the CONFIG trailer (BLAKE3, keyed with the master
# key when encrypted, unkeyed otherwise) before trusting any field.
#
# $KLOSET_BLOCKS_STORE_KEY (hex) is the key already derived: `kloset-blocks psql/mount/query` derive
# it once in the CLI, to check the passphrase before starting anything, and hand it to the nbdkit
# they start in its environment, where the passphrase would otherwise go, instead of having nbdkit
# derive it again (Argon2id with plakar's defaults: ~1.5 s and 256 MiB). It is as secret as the
# passphrase, is checked against the canary like one, and an explicit passphrase spec wins over it.
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from kloset_blocks.errors import CorruptionError, PassphraseError, StoreError, UnsupportedVersion
from kloset_blocks.store import codec as c
from kloset_blocks.store.backend import Backend, as_backend
from kloset_blocks.store.passphrase import resolve_passphrase

CONFIG_VERSION = c.pack_version(1, 0, 0)
KEY_ENV = "KLOSET_BLOCKS_STORE_KEY"


@dataclass(frozen=True)
class StoreConfig:
    version: int
    config: dict[str, Any]
    key: bytes | None
    codec: c.Codec


def read_config_file(backend: Backend | str, display: str | None = None) -> bytes:
    """The raw CONFIG object (StoreError: no store there, or no CONFIG in it)."""
    backend = as_backend(backend)
    try:
        return backend.read("CONFIG")
    except FileNotFoundError:
        raise StoreError(
            f"not a kloset store: {display or backend.location.display} (no CONFIG file)"
        ) from None


def load_config(backend: Backend | str, display: str, passphrase: str | None) -> StoreConfig:
    backend = as_backend(backend)
    raw = read_config_file(backend, display)
    path = backend.describe("CONFIG")
    version, payload = c.unwrap(raw, c.RT_CONFIG, None, path)
    if version != CONFIG_VERSION:
        raise UnsupportedVersion(
            f"unsupported store version {c.version_str(version)} (this reader supports 1.0.0): {display}"
        )
    try:
        config = c.unpack(payload)
    except Exception:
        raise CorruptionError(f"{path}: cannot decode the configuration (damaged file)") from None
    if not isinstance(config, dict):
        raise CorruptionError(f"{path}: configuration is not a map (damaged file)")
    key = None
    encryption = config.get("Encryption")
    if encryption is not None:
        if not isinstance(encryption, dict) or not isinstance(encryption.get("KDFParams"), dict):
            raise CorruptionError(f"{path}: bad Encryption section (damaged file)")
        subkey = encryption.get("SubKeyAlgorithm") or "AES256-KW"
        canary = bytes(encryption.get("Canary") or b"")
        key = _key_from_env(display, canary, subkey) if passphrase is None else None
        if key is None:
            secret = resolve_passphrase(passphrase, display)
            key = c.derive_key(secret, encryption["KDFParams"])
            if not c.verify_canary(key, canary, subkey):
                raise PassphraseError(f"wrong passphrase for store {display}")
    c.unwrap(raw, c.RT_CONFIG, c.config_mac(key), path)
    try:
        codec = c.Codec(config, key)
    except (AttributeError, TypeError, ValueError):
        raise CorruptionError(f"{path}: malformed configuration") from None
    return StoreConfig(version, config, key, codec)


def _key_from_env(display: str, canary: bytes, subkey: str) -> bytes | None:
    value = os.environ.get(KEY_ENV)
    if not value:
        return None
    try:
        key = bytes.fromhex(value)
    except ValueError:
        raise PassphraseError(f"${KEY_ENV} is not a hex key") from None
    if len(key) != 32 or not c.verify_canary(key, canary, subkey):
        raise PassphraseError(f"the key in ${KEY_ENV} does not open store {display}")
    return key
