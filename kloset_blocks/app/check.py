# Before anything starts: the store opened and the snapshot checked in this process, and what will
# serve it.
#
# Strategy: `prepare()` opens the store, unlocks it and resolves the snapshot here, so that every
# mistake a user can make (wrong or missing passphrase, unknown or ambiguous snapshot prefix,
# unsupported store version, a snapshot that is no PostgreSQL data directory, a PostgreSQL major
# whose server is not installed) is one line and exit 1 with nothing started; `check_snapshot()` is
# that check, the one used by psql, pg, mount and query alike. Only then is the backing built (an
# nbdkit command, or the FUSE image file), naming the snapshot by its full id, so that it serves
# exactly what was checked, even for `latest`. A prompt for the passphrase happens here, on the
# terminal, since nbdkit's stdin is /dev/null.
#
# Invariants: no secret in argv; the key derived here is handed to the one child that reads the
# store (nbdkit, or `expose`) in its environment, and the passphrase to nobody. No
# --exit-with-parent: for `mount` and `pg start` nbdkit must outlive the CLI that started it. The
# plugin's counters go to a file in the run directory, read back at teardown for the "fetched ...
# from the store" line (the REPORT step registered here).
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from kloset_blocks import postgres
from kloset_blocks.errors import NotFound, UsageError
from kloset_blocks.host.backing import RUN_DIR_TOKEN, Backing, NbdkitBacking
from kloset_blocks.host.progress import Progress
from kloset_blocks.host.teardown import REPORT, Teardown, register_teardown
from kloset_blocks.pgdata import find_pgdata
from kloset_blocks.pgmanifest import snapshot_major
from kloset_blocks.serving.nbdkit import STATS_FILE, nbdkit_argv
from kloset_blocks.store import Snapshot, Store, cache_dir_for, open_store, passphrase_source


@dataclass(frozen=True)
class Checked:
    """What check_snapshot() found: the directory that becomes the filesystem's root and, for a
    PostgreSQL data directory, its major version (whose server is installed)."""

    root: str
    pg_major: str | None


@dataclass(frozen=True)
class Served:
    """A checked snapshot and the backing that serves it."""

    backing: Backing
    snapshot_id: str = ""  # 64 hex digits
    logical_size: int = 0  # the snapshot's bytes, for the "fetched ... of ..." line
    root: str = "/"
    pg_major: str | None = None

    def state(self) -> dict[str, Any]:
        """What the chain records for its teardown's fetch report (an nbdkit backing only)."""
        if not isinstance(self.backing, NbdkitBacking):
            return {}
        return {
            "served": {"snapshot": self.snapshot_id, "logical_size": self.logical_size, "stats": STATS_FILE}
        }


def open_checked_store(
    location: str, passphrase_file: str | None, *, cache_dir: str | None = None, cache_chunks: bool = False
) -> Store:
    """The store, opened here by the CLI's precedence rule (--passphrase-file, $PLAKAR_PASSPHRASE,
    a prompt), asked for only if the store is encrypted. A remote store's metadata goes through
    the on-disk cache the plugin uses too (store.cache_dir_for), so that of two processes on one
    snapshot, or two runs, only the first fetches it; file contents too with `cache_chunks` (the
    few small files a check reads, not a restore's every chunk)."""
    spec = f"+{passphrase_file}" if passphrase_file else None
    return open_store(
        location,
        passphrase_source(spec, location),
        cache_dir=cache_dir_for(location, cache_dir),
        cache_chunks=cache_chunks,
    )


def check_snapshot(snapshot: Snapshot, *, path: str | None = None, pgdata: bool = False) -> Checked:
    """The served root (must be a directory) and, for a data directory, its checked major version."""
    short = snapshot.info.short_id
    if pgdata:
        root = find_pgdata(snapshot)  # NotFound: "snapshot X is not a PostgreSQL data directory"
        major = snapshot_major(snapshot, root)  # plakar's manifest.json, then PG_VERSION
        postgres.server_bindir(major)  # not installed: "apt-get install postgresql-N ..."
        return Checked(os.fsdecode(root), major)
    root_b = ("/" + (path or "").strip("/")).encode("utf-8", "surrogateescape")
    try:
        is_dir = snapshot.lookup(root_b).is_dir
    except NotFound:
        raise NotFound(f"no directory {os.fsdecode(root_b)} in snapshot {short}") from None
    if not is_dir:
        raise UsageError(f"{os.fsdecode(root_b)} is not a directory in snapshot {short}")
    return Checked(os.fsdecode(root_b), None)


def prepare(
    store: str,
    snap: str,
    *,
    path: str | None = None,
    pgdata: bool = False,
    owner: str | None = None,
    passphrase_file: str | None = None,
    progress: Progress | None = None,
    backend: str = "nbd",
    journal: bool = False,
) -> Served:
    """Open the store and check the snapshot in-process; then the backing that serves it: nbdkit
    (backend "nbd") or the image file `expose` makes (backend "fuse")."""
    progress = progress or Progress(quiet=True)
    with progress.phase("open"), open_checked_store(store, passphrase_file, cache_chunks=True) as st:
        snapshot = st.open_snapshot(snap)
        info = snapshot.info
        checked = check_snapshot(snapshot, path=path, pgdata=pgdata)
        key = st.codec.key
        view = st.view() if st.remote else None  # the plugin then asks the store for nothing
        if st.remote and st.disk is not None and backend != "fuse":
            from kloset_blocks.serving.startup import warm_snapshot

            warm_snapshot(snapshot, checked.root, st.disk)  # on this connection: see warm_snapshot
    backing: Backing
    if backend == "fuse":
        from kloset_blocks.fuse.chain import ExposedImage, expose_argv

        backing = ExposedImage(expose_argv(store, info.hex_id, None if pgdata else path, owner, journal), key)
    else:
        argv, env = nbdkit_argv(
            store,
            info.hex_id,
            path=None if pgdata else path,
            owner=owner,
            key=key,
            pgdata=pgdata,
            stats=f"{RUN_DIR_TOKEN}/{STATS_FILE}",
            journal=journal,
            view=view,
        )
        backing = NbdkitBacking(argv, env)
    return Served(backing, info.hex_id, info.size, checked.root, checked.pg_major)


def _report_fetched(t: Teardown) -> None:
    """The plugin's counters, written by nbdkit as it exited: bytes read from the store against the
    snapshot's size. Only when nbdkit ran until this teardown stopped it (else the file may hold the
    counters of an earlier client's close), and only for a chain that recorded what it served."""
    served = t.state.get("served")
    if not served or "nbdkit" not in t.alive_at_start:
        return
    try:
        stats = json.loads((t.path / served.get("stats", STATS_FILE)).read_text())
    except (OSError, ValueError):
        return
    if "store_bytes_read" in stats:
        t.progress.fetched(int(stats["store_bytes_read"]), int(served.get("logical_size") or 0))


register_teardown(REPORT, "fetch report", _report_fetched)
