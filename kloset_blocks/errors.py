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


class NotFound(KlosetError):
    """Unknown snapshot prefix, path or blob."""


class AmbiguousSnapshot(KlosetError):
    """A snapshot id prefix matches more than one snapshot."""


class LayoutError(KlosetError):
    """A tree cannot be represented as ext4 (name too long, too many inodes, ...)."""


class PgError(KlosetError):
    """PostgreSQL could not be found, started, stopped or queried."""
