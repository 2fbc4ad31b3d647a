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
# terminal, since nbdkit's stdin is /dev/null. A remote snapshot is warmed up here as soon as its
# root is known (before its PG_VERSION is read: that read then lies in a warm span).
#
# From the last view (prepare(from_last_view=True): psql, pg start, mount): a remote store is
# opened from the CONFIG and state list the last such command read (store/view.py), so that
# a warm start waits for no round trip, and a Confirmation reads both again in a thread; the
# session waits for it before it answers (Served.confirmed) and starts again when they changed.
#
# Invariants: no secret in argv; the key derived here is handed to the one child that reads the
# store (nbdkit, or `expose`) in its environment, and the passphrase to nobody. No
# --exit-with-parent: for `mount` and `pg start` nbdkit must outlive the CLI that started it. The
# plugin's counters go to a file in the run directory, read back at teardown for the "fetched ...
# from the store" line (the REPORT step registered here).
from __future__ import annotations

import contextlib
import functools
import json
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from kloset_blocks import postgres
from kloset_blocks.errors import KlosetError, NotFound, StaleView, UsageError
from kloset_blocks.host.backing import RUN_DIR_TOKEN, Backing, NbdkitBacking
from kloset_blocks.host.progress import Progress
from kloset_blocks.host.teardown import REPORT, Teardown, register_teardown
from kloset_blocks.pgdata import find_pgdata
from kloset_blocks.pgmanifest import snapshot_major
from kloset_blocks.serving.nbdkit import STATS_FILE, nbdkit_argv
from kloset_blocks.store import Snapshot, Store, cache_dir_for, open_store, passphrase_source
from kloset_blocks.store.location import parse_location
from kloset_blocks.store.view import load_view, save_view


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
    confirmation: Confirmation | None = None  # prepare(from_last_view=True)'s

    def confirmed(self, block: bool = True) -> None:
        """Returns once the store is known to hold what is served (at once, unless it was opened
        from its last view, or without `block`); StaleView when it does not, or without `block`
        when that is known already: tear down and prepare again."""
        if self.confirmation is not None:
            self.confirmation.wait(block)

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
    return open_store(
        location,
        _passphrase(passphrase_file, location),
        cache_dir=cache_dir_for(location, cache_dir),
        cache_chunks=cache_chunks,
    )


def _passphrase(passphrase_file: str | None, location: str) -> Callable[[], bytes]:
    """The CLI's precedence rule: --passphrase-file, $PLAKAR_PASSPHRASE, a prompt."""
    return passphrase_source(f"+{passphrase_file}" if passphrase_file else None, location)


def check_snapshot(
    snapshot: Snapshot,
    *,
    path: str | None = None,
    pgdata: bool = False,
    found: Callable[[str], object] | None = None,
) -> Checked:
    """The served root (must be a directory) and, for a data directory, its checked major version.
    `found` is called with the root before a file is read (prepare's warm-up: those reads then
    lie in its spans, no round trip of their own)."""
    short = snapshot.info.short_id
    if pgdata:
        root = find_pgdata(snapshot)  # NotFound: "snapshot X is not a PostgreSQL data directory"
        if found is not None:
            found(os.fsdecode(root))
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
    if found is not None:
        found(os.fsdecode(root_b))
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
    from_last_view: bool = False,
    fresh_view: str | None = None,
) -> Served:
    """Open the store and check the snapshot in-process; then the backing that serves it: nbdkit
    (backend "nbd") or the image file `expose` makes (backend "fuse").

    With `from_last_view`, a remote store is opened from the view the last command saved (no round
    trip: store/view.py) and checked against the store in the background: the caller must call
    Served.confirmed() before it answers anything, and start again (from_last_view off) when that
    raises StaleView (whose `view` is the store's now: pass it as `fresh_view`, which saves the
    listing's round trips). Any error met on the way from the last view is taken again from the
    store itself (the view may be what is out of date); the passphrase is asked for once either
    way."""
    progress = progress or Progress(quiet=True)
    passphrase = functools.cache(_passphrase(passphrase_file, store))  # asked for once, if encrypted
    cache_dir = cache_dir_for(store)
    serve = functools.partial(
        _serve,
        snap=snap,
        path=path,
        pgdata=pgdata,
        owner=owner,
        backend=backend,
        journal=journal,
        location=store,
    )
    with progress.phase("open"):
        view = load_view(cache_dir, parse_location(store).display) if from_last_view and cache_dir else None
        if view is not None and cache_dir is not None:
            try:
                st = open_store(store, passphrase, cache_dir=cache_dir, view=view)
                served = serve(st, Confirmation(st, snap, cache_dir))
                if st.packfiles.preads:  # it had to ask the store anyway: the check is nearly done
                    served.confirmed()
                return served
            except StaleView as e:
                fresh_view = e.view  # nothing started: again, on the store as the check read it
            except KlosetError:
                pass  # said again, or not, by the store itself below
        st = open_store(store, passphrase, cache_dir=cache_dir, view=fresh_view)  # saves a view it reads
        if fresh_view is not None and cache_dir is not None:
            save_view(cache_dir, st.location, fresh_view)  # the store's now: the next start's
        return serve(st, None)


def _serve(
    st: Store,
    confirmation: Confirmation | None,
    *,
    snap: str,
    path: str | None,
    pgdata: bool,
    owner: str | None,
    backend: str,
    journal: bool,
    location: str,
) -> Served:
    """prepare() on the opened store; the store is closed at the end (by the confirmation's last
    holder, when there is one)."""
    recovery = False
    try:
        snapshot = st.open_snapshot(snap)
        info = snapshot.info
        warm = None
        if st.remote and st.disk is not None and backend != "fuse":
            from kloset_blocks.serving.startup import warm_snapshot

            warm = functools.partial(warm_snapshot, snapshot, disk=st.disk)  # on this connection
        checked = check_snapshot(snapshot, path=path, pgdata=pgdata, found=warm)
        key = st.codec.key
        view = st.view() if st.remote else None  # the plugin then asks the store for nothing
        # What recovery reads first, fetched on this connection while the chain starts (the
        # plugin's is not made yet), in a thread holding the store: found and fetched there.
        recovery = warm is not None and pgdata and st.disk is not None
    finally:
        if recovery:
            if confirmation is not None:
                confirmation.hold()
            release = st.close if confirmation is None else confirmation.release
            threading.Thread(
                target=_fetch_then,
                args=(st, snapshot, checked.root, release),
                name="kloset-recovery",
                daemon=True,
            ).start()
        elif confirmation is None:
            st.close()
        else:
            confirmation.release()
    backing: Backing
    if backend == "fuse":
        from kloset_blocks.fuse.chain import ExposedImage, expose_argv

        backing = ExposedImage(
            expose_argv(location, info.hex_id, None if pgdata else path, owner, journal), key
        )
    else:
        argv, env = nbdkit_argv(
            location,
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
    return Served(backing, info.hex_id, info.size, checked.root, checked.pg_major, confirmation)


def _fetch_then(st: Store, snapshot: Snapshot, root: str, release: Callable[[], None]) -> None:
    """The chunks a start of the data directory at `root` reads first, into the on-disk cache."""
    from kloset_blocks.serving.startup import fetch_into, recovery_chunks

    try:
        assert st.disk is not None
        with contextlib.suppress(KlosetError):  # a hint: the plugin reads what is not there
            fetch_into(st, recovery_chunks(snapshot, root, st.disk), st.disk)
    finally:
        release()


class Confirmation:
    """The check that a store opened from its last view still serves what the view said for the
    snapshot named `snap` (Store.changes: the same CONFIG and states, or states that only add
    blobs and other snapshots), made in a thread while the command starts. It owns the store
    and closes it when done; wait() returns once the store agrees, raises StaleView when it does
    not and StoreError when it cannot be read (every request has its deadline: it ends)."""

    def __init__(self, store: Store, snap: str, cache_dir: str) -> None:
        self._store = store
        self._snap = snap
        self._cache_dir = cache_dir
        self._holders = 2  # the check's thread and prepare(), which is still reading it
        self._lock = threading.Lock()
        self._outcome: Future[str | None] = Future()  # None: agreed; else the view now ("": none)
        threading.Thread(target=self._check, name="kloset-confirm", daemon=True).start()

    def _check(self) -> None:
        try:
            now, same = self._store.changes(self._snap)
            if now and same:  # only additions, none of them this snapshot's business
                save_view(self._cache_dir, self._store.location, now)  # the next start's
            self._outcome.set_result(None if same else now)
        except BaseException as e:
            self._outcome.set_exception(e)
        finally:
            self.release()

    def hold(self) -> None:
        """One more holder (a thread reading the store), before prepare() lets go of it."""
        with self._lock:
            self._holders += 1

    def release(self) -> None:
        """One holder is done with the store; the last one closes it."""
        with self._lock:
            self._holders -= 1
            last = self._holders == 0
        if last:
            self._store.close()

    def wait(self, block: bool = True) -> None:
        """Returns once the store agrees (at once without `block`, unless the check has found it
        changed already)."""
        if not block and not self._outcome.done():
            return
        now = self._outcome.result()
        if now is not None:
            raise StaleView(
                "the store changed since its last view: starting again on what it holds now", now or None
            )


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
