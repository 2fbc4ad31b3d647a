# Across backups for the page: the query engine (QueryRun: one shared nbdkit, every snapshot an
# export, one chain and read-only Postgres per snapshot in turn), with the page's statement runner
# in place of psql, so the statement is held to the same read-only transaction, timeout and row cap.
#
# Strategy: a job runs in a thread and collects results as the engine hands them over (in the
# chosen order, newest first); the page polls the job. Each snapshot's rows are marked where they
# differ from the next older snapshot's answer (a row not in it): "what changed" between backups.
#
# Invariants: the engine's own teardown applies (every chain and the shared nbdkit go at the end of
# the job, on error too); cancel() stops the job between snapshots and the running statement.
from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Sequence
from typing import Any

from kloset_blocks import postgres as pg
from kloset_blocks.app.query import QueryOptions, QueryRun, Result
from kloset_blocks.errors import KlosetError
from kloset_blocks.web import db


class PageQueryRun(QueryRun):
    """QueryRun whose statement runs through db.run (read-only transaction, timeout, cap)."""

    def __init__(self, *args: Any, cap: int, stmt_timeout: float, cancels: db.Cancels, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.cap = cap
        self.stmt_timeout = stmt_timeout
        self.cancels = cancels
        self.run_id = secrets.token_hex(8)

    def _query(self, server: pg.Server) -> tuple[list[str], list[list[str | None]]]:
        conninfo = {"host": str(server.sockdir), "port": server.port, "user": pg.PG_USER}
        try:
            out = db.run(
                conninfo,
                self.options.db,
                self.options.sql,
                cap=self.cap,
                timeout=self.stmt_timeout,
                cancels=self.cancels,
                run_id=self.run_id,
            )
        except db.SqlError as e:
            raise KlosetError(str(e)) from None
        return out.columns, out.rows

    def cancel(self) -> None:
        self._cancelled.set()
        self.cancels.cancel(self.run_id)


def mark_changes(results: Sequence[dict[str, Any]]) -> None:
    """results newest first: each row gets changed=True if the next older snapshot (with an
    answer) does not have the same row."""
    for i, r in enumerate(results):
        older = next((o for o in results[i + 1 :] if o["error"] is None), None)
        if r["error"] is not None or older is None:
            r["changed"] = [False] * len(r["rows"])
            continue
        theirs = {tuple(row) for row in older["rows"]}
        r["changed"] = [tuple(row) not in theirs for row in r["rows"]]
        mine = {tuple(row) for row in r["rows"]}
        r["gone"] = sum(1 for row in older["rows"] if tuple(row) not in mine)


class AcrossJob:
    """One across-backups run in a thread; the page polls as_json()."""

    def __init__(
        self,
        location: str,
        store: Any,
        infos: Sequence[Any],
        sql: str,
        database: str,
        *,
        run_root: str | None,
        cap: int,
        timeout: float,
    ) -> None:
        self.id = secrets.token_hex(8)
        self.infos = list(infos)
        self.results: list[dict[str, Any]] = []
        self.state = "running"
        self.error: str | None = None
        self.started = time.monotonic()
        self.seconds = 0.0
        self._lock = threading.Lock()
        options = QueryOptions(sql=sql, db=database, run_root=run_root, timeout=timeout)
        self.run = PageQueryRun(
            location, store, self.infos, options, cap=cap, stmt_timeout=timeout, cancels=db.Cancels(),
            on_result=self._on_result,
        )  # fmt: skip
        self.thread = threading.Thread(target=self._work, name=f"kloset-ui-across-{self.id}", daemon=True)

    def start(self) -> AcrossJob:
        self.thread.start()
        return self

    def _on_result(self, r: Result) -> None:
        item = r.as_json()
        item["truncated"] = len(r.rows) >= self.run.cap
        item["times"] = {k: round(v, 3) for k, v in r.times.items()}
        with self._lock:
            self.results.append(item)

    def _work(self) -> None:
        try:
            self.run.run()
            self.state = "done"
        except KlosetError as e:
            self.state, self.error = "error", str(e)
        except BaseException as e:
            self.state, self.error = "error", f"internal error: {type(e).__name__}: {e}"
        finally:
            self.seconds = time.monotonic() - self.started

    def cancel(self) -> None:
        self.run.cancel()

    def as_json(self) -> dict[str, Any]:
        with self._lock:
            results = [dict(r) for r in self.results]
        mark_changes(results)
        return {
            "id": self.id,
            "state": self.state,
            "error": self.error,
            "snapshots": [i.short_id for i in self.infos],
            "results": results,
            "fetched_bytes": self.run.fetched_total,
            "seconds": round(self.seconds or time.monotonic() - self.started, 3),
        }
