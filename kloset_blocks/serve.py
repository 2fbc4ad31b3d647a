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
# `kloset-blocks down`). The plugin's counters go to a file in the run directory (attach.RUN_DIR_TOKEN
# is replaced by the chain), read back at teardown for the "fetched ... from the store" line.
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kloset_blocks.attach import RUN_DIR_TOKEN, STATS_FILE
from kloset_blocks.errors import PassphraseError
from kloset_blocks.runtime import Progress

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "nbdplugin" / "kloset.py"
PASSPHRASE_ENV = "PLAKAR_PASSPHRASE"


# nbdkit threads a connection. The plugin is PARALLEL, but Python runs one thread at a time (the
# GIL): nbdkit's default of 16 a connection puts up to 64 threads in the plugin at once (nbdcopy's 4
# connections), and they spend their time handing the GIL to each other. Two a connection keep a
# miss from stalling its connection (a hit or a second fetch goes on meanwhile) for a fraction of
# the switching: bench/RESULTS.md, "nbdkit threads".
NBDKIT_THREADS = 2


def nbdkit_argv(
    store: str,
    snap: str,
    path: str | None = None,
    owner: str | None = None,
    *,
    key: bytes | None = None,
    pgdata: bool = False,
    stats: str | None = None,
) -> tuple[list[str], dict[str, str | None]]:
    """(argv, extra environment) for `nbdkit --threads=2 python nbdplugin/kloset.py store=...`.
    An encrypted store's `key`, derived by the caller, goes to nbdkit in its environment (store/
    config.py: KEY_ENV) instead of the passphrase, so that nbdkit does not derive it again."""
    argv = ["nbdkit", f"--threads={NBDKIT_THREADS}", "python", str(PLUGIN)]
    argv += [f"store={store}", f"snapshot={snap}"]
    if path:
        argv.append(f"path={path}")
    if pgdata:
        argv.append("pgdata=true")
    if owner:
        argv.append(f"owner={owner}")
    if stats:
        argv.append(f"stats={stats}")
    # nbdkit embeds Debian's /usr/bin/python3: give it the repo and the venv's site-packages.
    site = (
        REPO / ".venv" / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    )
    env: dict[str, str | None] = {"PYTHONPATH": os.pathsep.join([str(REPO), str(site)])}
    if key is not None:
        from kloset_blocks.store.config import KEY_ENV

        env[KEY_ENV] = key.hex()
        env[PASSPHRASE_ENV] = None  # nbdkit needs the key only: do not pass the passphrase on
    return argv, env


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
    from kloset_blocks import pg
    from kloset_blocks.errors import NotFound, UsageError
    from kloset_blocks.export import PG_VERSION, find_pgdata

    if pgdata:
        root = find_pgdata(snapshot)  # NotFound: "snapshot X is not a PostgreSQL data directory"
        f = snapshot.open_file(root.rstrip(b"/") + b"/" + PG_VERSION)
        text = f.read(0, min(f.entry.size, 64)).decode(errors="replace").strip()
        major = pg.check_major(text, f"snapshot {snapshot.info.short_id}")
        pg.server_bindir(major)  # not installed: "apt-get install postgresql-N"
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
