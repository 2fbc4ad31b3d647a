# What the run commands (`mount`, `pg start`, `psql`) serve, checked in-process before anything starts,
# and the nbdkit command line that serves it.
#
# Strategy: `prepare()` opens the store, unlocks it and resolves the snapshot in this process, so that
# every mistake a user can make (wrong or missing passphrase, unknown or ambiguous snapshot prefix,
# unsupported store version, a snapshot that is no PostgreSQL data directory, a PostgreSQL major
# whose server is not installed) is one line and exit 1 with nothing started. Only then is the
# nbdkit argv built, naming the snapshot by its full id (so nbdkit serves exactly what was checked,
# even for `latest`). A prompt for the passphrase happens here, on the terminal, since nbdkit's stdin
# is /dev/null.
#
# Invariants: no secret in argv (the passphrase is verified in-process first, through the path
# the plugin would take; the key derived from it travels in nbdkit's environment, KEY_ENV, and the
# passphrase does not); no --exit-with-parent: for `mount` and
# `pg start` nbdkit must outlive the CLI that started it (it runs in its own session and is stopped by
# `kloset-blocks down`). The plugin's counters go to a file in the run directory (host.chain.RUN_DIR_TOKEN
# is replaced by the chain), read back at teardown for the "fetched ... from the store" line.
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from kloset_blocks.errors import PassphraseError
from kloset_blocks.host.chain import RUN_DIR_TOKEN
from kloset_blocks.host.progress import Progress
from kloset_blocks.serving.nbdkit import STATS_FILE, nbdkit_argv
from kloset_blocks.store.passphrase import PASSPHRASE_ENV


@dataclass(frozen=True)
class Served:
    """A checked snapshot and the nbdkit command that serves it."""

    argv: list[str]
    env: dict[str, str | None] = field(repr=False)  # may hold the key; None unsets a variable
    snapshot_id: str = ""  # 64 hex digits
    logical_size: int = 0  # the snapshot's bytes, for the "fetched ... of ..." line
    root: str = "/"  # the snapshot directory that is the filesystem's root
    pg_major: str | None = None

    @property
    def nbdkit(self) -> tuple[list[str], dict[str, str | None]]:
        return self.argv, self.env

    def state(self) -> dict[str, Any]:
        """What the chain records for its teardown's fetch report."""
        return {
            "served": {"snapshot": self.snapshot_id, "logical_size": self.logical_size, "stats": STATS_FILE}
        }


def prepare(
    store: str,
    snap: str,
    *,
    path: str | None = None,
    pgdata: bool = False,
    owner: str | None = None,
    passphrase_file: str | None = None,
    progress: Progress | None = None,
) -> Served:
    """Open the store and check the snapshot in-process; then the nbdkit command for it."""
    from kloset_blocks.store import open_store

    progress = progress or Progress(quiet=True)
    with progress.phase("open"):
        secret = passphrase_for(store, passphrase_file)
        # The same path the plugin takes: passphrase=None -> $PLAKAR_PASSPHRASE.
        with _env(PASSPHRASE_ENV, secret), open_store(store) as st:
            snapshot = st.open_snapshot(snap)
            info = snapshot.info
            root, major = _check_root(snapshot, path, pgdata)
            key = st.codec.key
    argv, env = nbdkit_argv(
        store,
        info.hex_id,
        path=None if pgdata else path,
        owner=owner,
        key=key,
        pgdata=pgdata,
        stats=f"{RUN_DIR_TOKEN}/{STATS_FILE}",
    )
    return Served(argv, env, info.hex_id, info.size, root, major)


def _check_root(snapshot: Any, path: str | None, pgdata: bool) -> tuple[str, str | None]:
    """The served root (must be a directory) and, for a data directory, its checked major version."""
    from kloset_blocks import postgres
    from kloset_blocks.errors import NotFound, UsageError
    from kloset_blocks.pgdata import PG_VERSION, find_pgdata

    if pgdata:
        root = find_pgdata(snapshot)  # NotFound: "snapshot X is not a PostgreSQL data directory"
        f = snapshot.open_file(root.rstrip(b"/") + b"/" + PG_VERSION)
        text = f.read(0, min(f.entry.size, 64)).decode(errors="replace").strip()
        major = postgres.check_major(text, f"snapshot {snapshot.info.short_id}")
        postgres.server_bindir(major)  # not installed: "apt-get install postgresql-N"
        return os.fsdecode(root), major
    root_b = ("/" + (path or "").strip("/")).encode("utf-8", "surrogateescape")
    try:
        is_dir = snapshot.lookup(root_b).is_dir
    except NotFound:
        raise NotFound(f"no directory {os.fsdecode(root_b)} in snapshot {snapshot.info.short_id}") from None
    if not is_dir:
        raise UsageError(f"{os.fsdecode(root_b)} is not a directory in snapshot {snapshot.info.short_id}")
    return os.fsdecode(root_b), None


def passphrase_for(store: str, passphrase_file: str | None) -> str | None:
    """The passphrase nbdkit will need (None for a plaintext store): --passphrase-file, else
    $PLAKAR_PASSPHRASE, else a prompt on the terminal. Asked for only if the store is encrypted."""
    from kloset_blocks.store.passphrase import resolve_passphrase

    if not store_is_encrypted(store):
        return None
    spec = f"+{passphrase_file}" if passphrase_file else None
    secret = resolve_passphrase(spec, store)
    if b"\0" in secret:
        raise PassphraseError("the passphrase contains a NUL byte: it cannot be passed on")
    return os.fsdecode(secret)


def store_is_encrypted(store: str) -> bool:
    """Whether CONFIG has an Encryption section (read without its MAC, which needs the key). Any
    problem answers False: open_store then reports it in its own words, before any prompt."""
    from kloset_blocks.store import codec as c
    from kloset_blocks.store.backend import open_backend
    from kloset_blocks.store.config import read_config_file
    from kloset_blocks.store.location import parse_location

    try:
        backend = open_backend(parse_location(store))
        try:
            raw = read_config_file(backend)
            _, payload = c.unwrap(raw, c.RT_CONFIG, None, backend.describe("CONFIG"))
        finally:
            backend.close()
        config = c.unpack(payload)
    except Exception:
        return False
    return isinstance(config, dict) and config.get("Encryption") is not None


@contextlib.contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    if value is None:
        yield
        return
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old
