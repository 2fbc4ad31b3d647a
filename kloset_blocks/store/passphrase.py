# Where the secret of an encrypted store comes from, at the edges only (the CLI's options, the
# plugin's parameters): the reader itself takes the secret as a parameter (open_store(location,
# passphrase, key=)) and reads no environment.
#
# One precedence rule everywhere, following nbdkit's and plakar's conventions (design.md): an
# explicit spec first ("-" -> prompt; "+FILE" -> the file's bytes minus one trailing newline; anything
# else is the passphrase itself: library callers only, the CLI never puts a secret in argv), then
# $PLAKAR_PASSPHRASE, then a prompt on a terminal, else an error saying how to supply one.
# passphrase_source() defers all of it until the store turns out to be encrypted.
#
# A key derived by a parent process (KEY_ENV, hex) is for the child it was handed to: only the
# plugin's edge reads it (key_from_env), never the CLI, so a stale one in a shell changes nothing.
from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Callable

from kloset_blocks.errors import PassphraseError

PASSPHRASE_ENV = "PLAKAR_PASSPHRASE"
KEY_ENV = "KLOSET_BLOCKS_STORE_KEY"

# What open_store() takes as the passphrase: the bytes themselves, or a callable that produces them
# only when asked (so that a plaintext store never prompts).
Secret = bytes | str | Callable[[], bytes]


def passphrase_source(spec: str | None, store: str) -> Callable[[], bytes]:
    """The passphrase of `store`, resolved by the precedence rule above when first called."""
    return lambda: resolve_passphrase(spec, store)


def key_from_env() -> bytes | None:
    """The key a parent derived and handed to this process (the plugin), or None."""
    value = os.environ.get(KEY_ENV)
    if not value:
        return None
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise PassphraseError(f"${KEY_ENV} is not a hex key") from None


def resolve_passphrase(spec: str | None, store: str) -> bytes:
    if spec is None:
        env = os.environ.get(PASSPHRASE_ENV)
        if env is not None:
            return os.fsencode(env)
        if sys.stdin is not None and sys.stdin.isatty():
            return _prompt(store)
        raise PassphraseError(
            f"store {store} is encrypted: set {PASSPHRASE_ENV}, pass --passphrase-file FILE"
            " (passphrase=+FILE), or run on a terminal to be prompted"
        )
    if spec == "-":
        return _prompt(store)
    if spec.startswith("+"):
        return _read_file(spec[1:])
    return os.fsencode(spec)


def _prompt(store: str) -> bytes:
    try:
        return os.fsencode(getpass.getpass(f"passphrase for {store}: "))
    except (EOFError, OSError) as e:
        raise PassphraseError(f"cannot prompt for the passphrase of {store}: {e}") from None


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise PassphraseError(f"cannot read passphrase file {path}: {e.strerror}") from None
    return data[:-1] if data.endswith(b"\n") else data
