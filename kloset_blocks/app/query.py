# `kloset-blocks query`: one SQL statement on many snapshots, nothing restored. "Which backup still
# has my row?"
#
# Strategy:
# - The store is opened in this process once: the snapshots are chosen (ids, dates), and each one is
#   checked before anything starts for it (a PostgreSQL data directory, a server installed for its
#   major), so those mistakes cost nothing and name the snapshot.
# - ONE nbdkit serves the whole run (a StandaloneServer; lazy=true: every snapshot is an export
#   named by its full id, built on first open), so all snapshots share one decoded-chunk cache:
#   chunks common to several snapshots (most of them) are fetched and decoded once. With
#   --cache-dir the plugin keeps a persistent second tier on disk (store/diskcache.py).
# - Per snapshot, a chain whose backing is its export of that nbdkit (SharedExport: qcow2 overlay
#   on nbd+unix:///ID?socket=..., FUSE export, loop, mount), Postgres read-only on the mounted data
#   directory, `psql --csv` with a random NULL marker (so NULL and '' stay distinct), then teardown.
#   Up to --jobs snapshots run at once, each in its own run directory (overlay, mount, socket
#   directory), so ports never clash: Postgres listens only on a private Unix socket.
# - An error on one snapshot (not a data directory, a missing server version, corrupt data, a
#   failing query) becomes that snapshot's result; the others still run. Results are printed in
#   the chosen order (newest first by default) as soon as all earlier ones are done.
#
# Invariants: every chain and the shared nbdkit are torn down on any exit (error, Ctrl-C, SIGTERM,
# SIGHUP); a chain never outlives its snapshot's result. The store's key (derived here once)
# reaches nbdkit only in its environment. Bytes fetched per snapshot are read from the plugin's
# stats file, rewritten whenever an NBD client disconnects; with --jobs > 1 they overlap and are
# only indicative.
from __future__ import annotations

import contextlib
import csv
import io
import json
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from kloset_blocks import postgres
from kloset_blocks.app.check import check_snapshot, open_checked_store
from kloset_blocks.app.damage import damage_error
from kloset_blocks.app.sessions import session_faults
from kloset_blocks.app.warden import Warden
from kloset_blocks.errors import KlosetError, UsageError
from kloset_blocks.host.backing import NbdkitBacking, SharedExport, StandaloneServer
from kloset_blocks.host.chain import Chain
from kloset_blocks.host.progress import Progress
from kloset_blocks.host.rundir import run_root as run_root_dir
from kloset_blocks.host.signals import signals_unwind
from kloset_blocks.serving.nbdkit import SHARED_NBDKIT_THREADS, STATS_FILE
from kloset_blocks.store import SnapshotInfo, Store

STATUS_ROWS, STATUS_EMPTY, STATUS_ERROR = "rows", "no rows", "error"


class QueryError(KlosetError):
    """The query could not run on a snapshot (psql's own words)."""


# --- choosing snapshots --------------------------------------------------------------------------


def parse_when(text: str, *, end: bool = False) -> datetime:
    """An ISO date or date-time; naive means UTC (as `kloset-blocks snapshots` prints). A bare date
    as an upper bound means the end of that day."""
    t = text.strip()
    try:
        when = datetime.fromisoformat(t[:-1] + "+00:00" if t.endswith("Z") else t)
    except ValueError:
        raise UsageError(f"bad date {text!r} (use e.g. 2026-05-01 or 2026-05-01T14:30:00)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if end and len(t) == 10:  # YYYY-MM-DD: the whole day
        when += timedelta(days=1) - timedelta(microseconds=1)
    return when


def select_snapshots(
    store: Store,
    spec: str = "all",
    since: str | None = None,
    until: str | None = None,
    oldest_first: bool = False,
) -> list[SnapshotInfo]:
    """SnapshotInfos, newest first (or oldest first): `all` or comma-separated id prefixes, then
    filtered by the --since/--until bounds (inclusive)."""
    if spec.strip().lower() in ("", "all"):
        infos = list(store.snapshots())
    else:
        infos, seen = [], set()
        for prefix in (p.strip() for p in spec.split(",")):
            if not prefix:
                continue
            info = store.find_snapshot(prefix)  # NotFound / AmbiguousSnapshot: one line
            if info.id not in seen:
                seen.add(info.id)
                infos.append(info)
    lo = parse_when(since) if since else None
    hi = parse_when(until, end=True) if until else None
    if lo and hi and lo > hi:
        raise UsageError(f"--since {since} is after --until {until}")
    infos = [i for i in infos if (lo is None or i.timestamp >= lo) and (hi is None or i.timestamp <= hi)]
    infos.sort(key=lambda i: (i.timestamp, i.id), reverse=not oldest_first)
    if not infos:
        raise UsageError("no snapshot matches the selection")
    return infos


# --- results -------------------------------------------------------------------------------------


@dataclass
class Result:
    info: SnapshotInfo
    columns: list[str] = field(default_factory=list)
    rows: list[list[str | None]] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    fetched: int | None = None  # bytes read from the store while this snapshot ran
    times: dict[str, float] = field(default_factory=dict)

    @property
    def status(self) -> str:
        if self.error is not None:
            return STATUS_ERROR
        return STATUS_ROWS if self.rows else STATUS_EMPTY

    @property
    def date(self) -> str:
        return self.info.timestamp.strftime("%Y-%m-%dT%H:%M:%SZ")

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.info.hex_id,
            "short_id": self.info.short_id,
            "date": self.date,
            "name": self.info.name,
            "status": self.status,
            "columns": self.columns,
            "rows": self.rows,
            "error": self.error,
            "seconds": round(self.seconds, 3),
            "fetched_bytes": self.fetched,
        }


def parse_csv(text: str, null: str) -> tuple[list[str], list[list[str | None]]]:
    """psql --csv output: a header line, then rows; fields equal to the NULL marker are None."""
    records = list(csv.reader(io.StringIO(text)))
    if not records:
        return [], []
    columns, rows = records[0], records[1:]
    return columns, [[None if v == null else v for v in row] for row in rows]


# --- one run -------------------------------------------------------------------------------------


@dataclass
class QueryOptions:
    sql: str
    db: str = "postgres"
    jobs: int = 1
    cache_dir: str | None = None
    cache_dir_size: str | None = None
    cache: str | None = None  # decoded-chunk cache size in nbdkit
    timeout: float = 600.0
    run_root: str | None = None


class QueryRun:
    """One `query`: a shared nbdkit, then each snapshot through its own chain and Postgres."""

    def __init__(
        self,
        location: str,
        store: Store,
        infos: Sequence[SnapshotInfo],
        options: QueryOptions,
        *,
        progress: Progress | None = None,
        on_result: Callable[[Result], None] | None = None,
    ) -> None:
        self.location = location
        self.store = store
        self.infos = list(infos)
        self.options = options
        self.progress = progress or Progress(quiet=True)
        self.on_result = on_result or (lambda r: None)
        self.null = f"<kb-null-{secrets.token_hex(8)}>"
        self.results: list[Result | None] = [None] * len(self.infos)
        self.fetched_total: int | None = None
        self.seconds = 0.0
        self._chains: set[Chain] = set()
        self._chains_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._cancelled = threading.Event()
        self._printed = 0
        self._tmp: Path | None = None
        self.server: StandaloneServer | None = None

    @property
    def stats_path(self) -> Path:
        assert self._tmp is not None
        return self._tmp / STATS_FILE

    # ---- the whole run ---------------------------------------------------------------------------

    def run(self) -> list[Result]:
        t0 = time.monotonic()
        # One signal scope from the first thing made to the last removed; the warden tears down the
        # chains and removes the temporary directory if this process is killed outright.
        with signals_unwind():
            self._tmp = Path(tempfile.mkdtemp(prefix="kb-query-"))  # 0700: the stats file
            try:
                with Warden(run_root_dir(self.options.run_root), [self._tmp]):
                    try:
                        self._start_server()
                        self._run_all()
                    finally:
                        self._stop_all()
            finally:
                self.fetched_total = self._stats().get("store_bytes_read")
                shutil.rmtree(self._tmp, ignore_errors=True)
                self.seconds = time.monotonic() - t0
        return [r for r in self.results if r is not None]

    def nbdkit(self) -> tuple[list[str], dict[str, str | None]]:
        from kloset_blocks.serving.nbdkit import nbdkit_argv

        argv, env = nbdkit_argv(
            self.location,
            self.infos[0].hex_id,
            owner=postgres.PG_USER,
            key=self.store.codec.key,  # derived already: nbdkit need not derive it again
            pgdata=True,
            stats=str(self.stats_path),
            threads=SHARED_NBDKIT_THREADS,  # one chain dying must not abort the others' nbdkit
        )
        argv.append("lazy=true")  # one broken snapshot must not stop the server for the others
        if self.options.cache_dir:
            argv.append(f"cache-dir={Path(self.options.cache_dir).absolute()}")
        if self.options.cache_dir_size:
            argv.append(f"cache-dir-size={self.options.cache_dir_size}")
        if self.options.cache:
            argv.append(f"cache={self.options.cache}")
        return argv, env

    def _start_server(self) -> None:
        argv, env = self.nbdkit()
        self.server = StandaloneServer(NbdkitBacking(argv, env), run_root=self.options.run_root).up()

    def _run_all(self) -> None:
        jobs = max(1, min(self.options.jobs, len(self.infos)))
        pool = ThreadPoolExecutor(jobs, thread_name_prefix="kloset-query")
        try:
            futures: dict[Future[Result], int] = {
                pool.submit(self._one_guarded, i): i for i in range(len(self.infos))
            }
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                for f in done:
                    self.results[futures[f]] = f.result()
                self._emit_ready()
        except BaseException:
            self._cancelled.set()
            pool.shutdown(wait=False, cancel_futures=True)
            self._teardown_chains()  # the workers' next tool call fails; they tear down again
            pool.shutdown(wait=True)
            raise
        pool.shutdown(wait=True)

    def _emit_ready(self) -> None:
        while self._printed < len(self.results) and self.results[self._printed] is not None:
            self.on_result(self.results[self._printed])  # type: ignore[arg-type]
            self._printed += 1

    def _stop_all(self) -> None:
        self._teardown_chains()
        if self.server is not None:
            self.server.teardown()  # nbdkit writes its final counters as it exits

    def _teardown_chains(self) -> None:
        with self._chains_lock:
            chains = list(self._chains)
        for chain in chains:
            chain.teardown()

    # ---- one snapshot ----------------------------------------------------------------------------

    def _one_guarded(self, index: int) -> Result:
        info = self.infos[index]
        result = Result(info)
        t0 = time.monotonic()
        try:
            if self._cancelled.is_set():
                raise KlosetError("cancelled")
            self._one(info, result)
        except KlosetError as e:
            result.error = str(e)
        except Exception as e:  # a bug must not hide the other snapshots' answers
            result.error = f"internal error: {type(e).__name__}: {e}"
        result.seconds = time.monotonic() - t0
        return result

    def _one(self, info: SnapshotInfo, result: Result) -> None:
        self._check(info)
        assert self.server is not None
        progress = Progress(quiet=True)
        chain = Chain(
            SharedExport(self.server.socket, info.hex_id), run_root=self.options.run_root, progress=progress
        )
        with self._chains_lock:
            self._chains.add(chain)
        before = self._stats().get("store_bytes_read", 0)
        try:
            try:
                chain.up()
            except KlosetError as e:
                raise self._diagnose(info, e) from None
            if self._cancelled.is_set():
                raise KlosetError("cancelled")
            server = self._start_postgres(chain, progress)
            with progress.phase("query"):
                result.columns, result.rows = self._query(server)
        except KlosetError as e:
            # Say what failed under the snapshot (reads from the store that failed, the shared
            # nbdkit died, the overlay's disk is full) rather than only Postgres' last words.
            damage = damage_error(self.stats_path, info.hex_id)
            faults = session_faults(chain.run) + session_faults(self.server.run if self.server else None)
            if damage is not None and not faults:
                raise damage from None
            if faults:
                first = str(damage) if damage is not None else str(e)
                raise KlosetError("; ".join(dict.fromkeys([first, *faults]))) from None
            raise
        finally:
            mark = self._stats_mtime()
            with progress.phase("down"):
                chain.teardown()
            with self._chains_lock:
                self._chains.discard(chain)
            self._wait_stats_after(mark)
            after = self._stats().get("store_bytes_read")
            if after is not None:
                result.fetched = max(0, after - before)
            result.times = dict(progress.times)

    def _check(self, info: SnapshotInfo) -> None:
        """Before anything starts: a data directory, and a server for its major version."""
        check_snapshot(self.store.open_snapshot(info.hex_id), pgdata=True)

    def _diagnose(self, info: SnapshotInfo, error: KlosetError) -> KlosetError:
        """The chain failed to come up. If the export itself cannot be built (damaged metadata),
        nbdkit only said "export not available": say what is wrong, in the store's own words."""
        from kloset_blocks.image.snapshot import ImageOptions, snapshot_image

        try:
            snapshot_image(
                self.store.open_snapshot(info.hex_id), ImageOptions(pgdata=True, owner=postgres.PG_USER)
            )
        except KlosetError as e:
            return type(e)(str(e))
        return error

    def _start_postgres(self, chain: Chain, progress: Progress) -> postgres.Server:
        assert chain.mountpoint is not None and chain.run is not None
        return postgres.start_server(chain.run, chain.mountpoint, read_only=True, progress=progress)

    def _query(self, server: postgres.Server) -> tuple[list[str], list[list[str | None]]]:
        args = ["-X", "-q", "--csv", "-P", f"null={self.null}", "-v", "ON_ERROR_STOP=1"]
        argv = server.psql_argv([*args, "-d", self.options.db, "-c", self.options.sql])
        try:
            p = subprocess.run(
                argv, capture_output=True, timeout=self.options.timeout, stdin=subprocess.DEVNULL, cwd="/",
                env=postgres.child_env(),
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise QueryError(f"query did not finish within {self.options.timeout:.0f} s") from None
        err = p.stderr.decode(errors="replace")
        if p.returncode != 0:
            raise QueryError(f"query failed: {postgres.relevant_lines(err) or f'psql exited {p.returncode}'}")
        return parse_csv(p.stdout.decode(errors="replace"), self.null)

    # ---- the plugin's counters -------------------------------------------------------------------

    def _stats(self) -> dict[str, int]:
        try:
            with self._stats_lock:
                return dict(json.loads(self.stats_path.read_text()))
        except (OSError, ValueError, AssertionError):
            return {}

    def _stats_mtime(self) -> int:
        with contextlib.suppress(OSError, AssertionError):
            return self.stats_path.stat().st_mtime_ns
        return 0

    def _wait_stats_after(self, mark: int, timeout: float = 1.0) -> None:
        # nbdkit rewrites the file when the overlay's connection closes, which the teardown just
        # caused: wait briefly for it so this snapshot's bytes are not counted for the next one.
        deadline = time.monotonic() + timeout
        while self._stats_mtime() == mark and time.monotonic() < deadline:
            time.sleep(0.01)


# --- the library entry point ---------------------------------------------------------------------


@contextlib.contextmanager
def opened_store(location: str, passphrase_file: str | None) -> Iterator[Store]:
    """The store, opened here (the prompt, if any, happens now; nbdkit gets the key derived here)."""
    with open_checked_store(location, passphrase_file) as store:
        yield store
