# Where the passphrase of an encrypted store comes from, following nbdkit's and plakar's
# conventions (design.md): None -> $PLAKAR_PASSPHRASE, else a prompt on a terminal, else an
# error saying how to supply one; "-" -> prompt; "+FILE" -> the file's bytes minus one trailing
# newline; anything else is the passphrase itself (library callers only: the CLI never puts a
# secret in argv). It is only asked for when the store turns out to be encrypted.
from __future__ import annotations

import getpass
import os
import sys

from kloset_blocks.errors import PassphraseError

PASSPHRASE_ENV = "PLAKAR_PASSPHRASE"


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
