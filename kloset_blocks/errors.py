# Every error a user can cause or meet (bad input, bad store, bad data) is a KlosetError whose
# str() is one line that says what is wrong and, where it helps, what to do. The CLI and the
# nbdkit plugin print that line and exit non-zero; they never show a traceback for these.
from __future__ import annotations


class KlosetError(Exception):
    """Base of all user-facing errors: str(e) is a complete one-line message."""


class UsageError(KlosetError):
    """Bad arguments or options."""


class StoreError(KlosetError):
    """The store cannot be opened or read: missing, unsupported backend or version, bad CONFIG."""


class UnsupportedVersion(StoreError):
    """A resource written by a newer Kloset than this reader knows."""


class PassphraseError(StoreError):
    """No passphrase, or a wrong one."""


class CorruptionError(KlosetError):
    """Stored bytes fail a check (MAC, magic, length, decode). Never returns wrong bytes."""


class FileDamaged(CorruptionError):
    """A file of a snapshot cannot be read (its entry, object or a chunk fails a check): the
    message starts with the snapshot path, so that whoever reads it knows which file is lost."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class NotFound(KlosetError):
    """Unknown snapshot prefix, path or blob."""


class AmbiguousSnapshot(KlosetError):
    """A snapshot id prefix matches more than one snapshot."""


class LayoutError(KlosetError):
    """A tree cannot be represented as ext4 (name too long, too many inodes, ...)."""


class PgError(KlosetError):
    """PostgreSQL could not be found, started, stopped or queried."""


class StaleView(KlosetError):
    """A start from the last view of a remote store found, once checked, that the store had changed
    since: the command starts again on what it holds now (app/check.py), `view` (Store.view())."""

    def __init__(self, message: str, view: str | None = None) -> None:
        super().__init__(message)
        self.view = view
