# The snapshots the page has opened: each one the CLI's chain and a read-only Postgres on it.
#
# Strategy: opening runs in a thread (phases recorded by LiveProgress as they start and end, for the
# page to poll); the nbdkit command is built here from the store opened once by the ui process (the
# check of app.check.prepare, the key derived already), then pg_session brings up the same chain
# `kloset-blocks psql` uses. A reaper thread closes a session idle for longer than `idle`; opening
# one more than `max_open` closes the least recently used idle session first (a notice says so),
# and is refused if every open session is busy.
#
# Invariants: a session is torn down exactly once (close() is idempotent); close_all() waits for the
# opens under way and tears those down too, so nothing outlives the ui process but a crash (and
# `kloset-blocks down` is the backstop: every chain is recorded in its run directory).
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kloset_blocks import postgres as pg
from kloset_blocks.app.check import check_snapshot
from kloset_blocks.app.sessions import pg_session
from kloset_blocks.errors import KlosetError
from kloset_blocks.host.backing import RUN_DIR_TOKEN, NbdkitBacking
from kloset_blocks.host.chain import Chain
from kloset_blocks.host.progress import Progress
from kloset_blocks.serving.nbdkit import STATS_FILE, nbdkit_argv

OPENING, READY, FAILED, CLOSED = "opening", "ready", "error", "closed"


class Busy(KlosetError):
    """No room for one more open snapshot: every open one is in use."""


class LiveProgress(Progress):
    """Progress that remembers each phase as it starts and ends, for the page to show live."""

    def __init__(self) -> None:
        super().__init__(quiet=True)
        self.phases: list[dict[str, Any]] = []
        self.lines: list[str] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        with self._lock:
            self.phases.append({"name": name, "seconds": None})
        with super().phase(name):
            yield

    def done(self, name: str, seconds: float) -> None:
        super().done(name, seconds)
        with self._lock:
            for p in reversed(self.phases):
                if p["name"] == name and p["seconds"] is None:
                    p["seconds"] = round(seconds, 3)
                    break
            else:  # pg.Server reports start/recovery/ready without a phase() around them
                self.phases.append({"name": name, "seconds": round(seconds, 3)})

    def say(self, line: str) -> None:
        with self._lock:
            self.lines.append(line)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(p) for p in self.phases]


@dataclass(eq=False)
class Session:
    info: Any  # SnapshotInfo
    progress: LiveProgress = field(default_factory=LiveProgress)
    state: str = OPENING
    error: str | None = None
    chain: Chain | None = None
    server: pg.Server | None = None
    last_used: float = field(default_factory=time.monotonic)
    busy: int = 0
    thread: threading.Thread | None = None
    closing: bool = False
    teardown_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def short_id(self) -> str:
        return str(self.info.short_id)

    def conninfo(self) -> dict[str, Any]:
        """Where psycopg reaches this snapshot's Postgres: its private socket directory."""
        if self.state != READY or self.server is None:
            raise KlosetError(f"snapshot {self.short_id} is not open ({self.state})")
        return {"host": str(self.server.sockdir), "port": self.server.port, "user": pg.PG_USER}

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.info.hex_id,
            "short_id": self.short_id,
            "state": self.state,
            "error": self.error,
            "phases": self.progress.snapshot(),
            "pg_major": self.server.cluster.major if self.server else None,
        }


class Sessions:
    """The open snapshots of one ui process."""

    def __init__(
        self,
        location: str,
        store: Any,
        *,
        run_root: Path | str | None = None,
        idle: float = 600.0,
        max_open: int = 3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.location = location
        self.store = store
        self.store_lock = threading.Lock()  # one reader of the store's index at a time
        self.run_root = run_root
        self.idle = idle
        self.max_open = max(1, max_open)
        self.clock = clock
        self.notices: list[dict[str, Any]] = []
        self._by_id: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._reaper = threading.Thread(target=self._reap_loop, name="kloset-ui-reaper", daemon=True)
        self._reaper.start()

    # ---- looking up ------------------------------------------------------------------------------

    def get(self, hex_id: str) -> Session | None:
        with self._lock:
            return self._by_id.get(hex_id)

    def all(self) -> list[Session]:
        with self._lock:
            return list(self._by_id.values())

    @contextlib.contextmanager
    def use(self, hex_id: str) -> Iterator[Session]:
        """A ready session, kept from the reaper while the caller uses it."""
        with self._lock:
            s = self._by_id.get(hex_id)
            if s is None or s.state != READY:
                state = s.state if s else "not opened"
                raise KlosetError(f"snapshot {hex_id[:8]} is not open ({state}): open it first")
            s.busy += 1
            s.last_used = self.clock()
        try:
            yield s
        finally:
            with self._lock:
                s.busy -= 1
                s.last_used = self.clock()

    # ---- opening and closing ---------------------------------------------------------------------

    def open(self, info: Any) -> Session:
        """Start opening the snapshot (or return the session already open or opening)."""
        victims: list[Session] = []
        with self._lock:
            if self._stopping.is_set():
                raise KlosetError("the server is stopping")
            s = self._by_id.get(info.hex_id)
            if s is not None and s.state in (OPENING, READY):
                s.last_used = self.clock()
                return s
            live = [x for x in self._by_id.values() if x.state in (OPENING, READY)]
            idle = sorted((x for x in live if x.state == READY and x.busy == 0), key=lambda x: x.last_used)
            while len(live) >= self.max_open:
                if not idle:
                    raise Busy(f"{len(live)} snapshot(s) open and in use (--max-open {self.max_open})")
                victim = idle.pop(0)
                live.remove(victim)
                victims.append(victim)
                victim.closing = True
            s = Session(info, last_used=self.clock())
            self._by_id[info.hex_id] = s
        for v in victims:
            self.close(v)
            self._notice(f"closed snapshot {v.short_id} to make room (--max-open {self.max_open})")
        s.thread = threading.Thread(target=self._bring_up, args=(s,), name=f"kloset-ui-open-{s.short_id}")
        s.thread.start()
        return s

    def _bring_up(self, s: Session) -> None:
        try:
            with s.progress.phase("open"):
                backing, state = self._backing_for(s.info)
            chain, server = pg_session(
                backing, read_only=True, progress=s.progress, run_root=self.run_root, state=state
            )
        except KlosetError as e:
            s.state, s.error = FAILED, str(e)
            return
        except Exception as e:  # a bug on one snapshot must not take the page down
            s.state, s.error = FAILED, f"internal error: {type(e).__name__}: {e}"
            return
        with self._lock:
            s.chain, s.server = chain, server
            late = s.closing or self._stopping.is_set()
            if not late:
                s.state, s.last_used = READY, self.clock()
        if late:
            chain.teardown()
            s.state = CLOSED

    def _backing_for(self, info: Any) -> tuple[NbdkitBacking, dict[str, Any]]:
        """app.check.prepare's check and nbdkit backing, from the store this process holds open."""
        with self.store_lock:
            check_snapshot(self.store.open_snapshot(info.hex_id), pgdata=True)
            key = self.store.codec.key
        argv, env = nbdkit_argv(
            self.location,
            info.hex_id,
            owner=pg.PG_USER,
            key=key,
            pgdata=True,
            stats=f"{RUN_DIR_TOKEN}/{STATS_FILE}",
        )
        state = {"served": {"snapshot": info.hex_id, "logical_size": info.size, "stats": STATS_FILE}}
        return NbdkitBacking(argv, env), state

    def close(self, s: Session) -> None:
        """Tear the session's chain down; a second caller waits for the first one's teardown."""
        with s.teardown_lock:
            with self._lock:
                s.closing = True
                chain, s.chain = s.chain, None
            if chain is not None:
                chain.teardown()
            with self._lock:
                if s.state in (READY, FAILED):
                    s.state = CLOSED

    def close_all(self, wait: float = 120.0) -> None:
        """Stop: no new opens; the opens under way finish (and are torn down); every chain goes."""
        self._stopping.set()
        self._reaper.join(wait)  # it may be closing a session: let it finish
        deadline = time.monotonic() + wait
        for s in self.all():
            if s.thread is not None:
                s.thread.join(max(0.0, deadline - time.monotonic()))
            self.close(s)

    # ---- idle ------------------------------------------------------------------------------------

    def reap(self) -> list[Session]:
        """Close the sessions idle for longer than `idle`; returns them."""
        now = self.clock()
        with self._lock:
            idle = [
                s
                for s in self._by_id.values()
                if s.state == READY and s.busy == 0 and now - s.last_used > self.idle
            ]
        for s in idle:
            self.close(s)
            self._notice(f"closed snapshot {s.short_id}: idle for more than {self.idle:.0f} s")
        return idle

    def _reap_loop(self) -> None:
        while not self._stopping.wait(1.0):
            with contextlib.suppress(Exception):
                self.reap()

    def _notice(self, text: str) -> None:
        with self._lock:
            self.notices.append({"n": len(self.notices) + 1, "text": text, "time": time.time()})
