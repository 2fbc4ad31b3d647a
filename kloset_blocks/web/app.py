# The ui's HTTP side: FastAPI routes over Sessions (sessions.py), db.py and AcrossJob (across.py),
# plus the static page. The JSON API is described by FastAPI's OpenAPI document at
# /api/openapi.json (docs/ui.md lists it for people); the interactive docs pages are off, since
# they would load their scripts from the internet.
#
# Safety (the guard middleware, before any route):
# - Host must name this server (loopback names or the bind address, with our port): no DNS rebinding.
# - Origin, when a browser sends one, must be this server's; Sec-Fetch-Site must not be cross-site.
# - Every request carries the session cookie, got once by trading the one-time token printed on
#   stdout (`/?token=...`, then a redirect that drops it from the address bar). The cookie is
#   HttpOnly and SameSite=Strict; the token works once.
# - Responses are not cached, not framed, send no referrer; the page's scripts come from here only.
from __future__ import annotations

import csv
import hmac
import io
import json
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from kloset_blocks.app.check import check_snapshot
from kloset_blocks.app.query import select_snapshots
from kloset_blocks.errors import KlosetError
from kloset_blocks.web import db
from kloset_blocks.web.across import AcrossJob
from kloset_blocks.web.sessions import Busy, Sessions

STATIC = Path(__file__).resolve().parent / "static"
COOKIE = "kb_ui"
MAX_JOBS_KEPT = 20
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


class Guard:
    """The one-time token, the session cookie, and the names this server answers to."""

    def __init__(self, host: str, port: int) -> None:
        self.token: str | None = secrets.token_urlsafe(24)
        self.cookie = secrets.token_urlsafe(32)
        self.port = port
        names = {"127.0.0.1", "localhost", "[::1]", host if ":" not in host else f"[{host}]"}
        self.hosts = {f"{n}:{port}" for n in names}
        self.origins = {f"http://{h}" for h in self.hosts}
        self.url_host = host if ":" not in host else f"[{host}]"
        self._lock = threading.Lock()

    @property
    def first_url(self) -> str:
        return f"http://{self.url_host}:{self.port}/?token={self.token}"

    def trade(self, token: str) -> bool:
        """The printed token, once: True if it matched (and is spent now)."""
        with self._lock:
            if self.token is None or not hmac.compare_digest(token, self.token):
                return False
            self.token = None
            return True

    def refusal(self, request: Request) -> str | None:
        host = request.headers.get("host", "")
        if host not in self.hosts:
            return f"refused: Host {host!r} is not this server"
        origin = request.headers.get("origin")
        if origin is not None and origin not in self.origins:
            return f"refused: Origin {origin!r} is not this server"
        if request.headers.get("sec-fetch-site") == "cross-site":
            return "refused: cross-site request"
        return None

    def has_cookie(self, request: Request) -> bool:
        return hmac.compare_digest(request.cookies.get(COOKIE, ""), self.cookie)


# --- request bodies ------------------------------------------------------------------------------


class SqlRequest(BaseModel):
    database: str = "postgres"
    sql: str
    explain: bool = False
    run_id: str | None = Field(None, description="chosen by the page, for POST /api/cancel/{run_id}")


class AcrossRequest(BaseModel):
    database: str = "postgres"
    sql: str
    snapshots: list[str] = Field(default_factory=list, description="id prefixes; empty means all")


class DiffRequest(BaseModel):
    a: str = Field(description="the older snapshot (id prefix), open")
    b: str = Field(description="the newer snapshot (id prefix), open")
    database: str
    schema_: str = Field("public", alias="schema")
    table: str


class TakeBackRequest(BaseModel):
    table: str = Field(description="schema.table the statements name")
    columns: list[str]
    rows: list[list[str | None]]
    format: str = Field("insert", pattern="^(insert|copy)$")


# --- the app -------------------------------------------------------------------------------------


def create_app(
    sessions: Sessions,
    guard: Guard,
    *,
    timeout: float = db.DEFAULT_TIMEOUT,
    export_timeout: float = db.EXPORT_TIMEOUT,
    cap: int = db.DEFAULT_CAP,
) -> FastAPI:
    app = FastAPI(
        title="kloset-blocks ui",
        summary="SQL on the PostgreSQL backups of a Kloset store, nothing restored",
        openapi_url="/api/openapi.json",
        docs_url=None,
        redoc_url=None,
    )
    app.state.jobs = {}
    cancels = db.Cancels()
    store = sessions.store
    versions: dict[str, Any] = {}

    @app.middleware("http")
    async def guard_requests(request: Request, call_next: Any) -> Response:
        why = guard.refusal(request)
        if why is not None:
            return PlainTextResponse(why, status_code=403)
        token = request.query_params.get("token")
        if request.url.path == "/" and token is not None:
            if not guard.trade(token):
                return PlainTextResponse("refused: that token is not valid (it works once)", status_code=403)
            resp: Response = RedirectResponse("/", status_code=303)
            resp.set_cookie(COOKIE, guard.cookie, httponly=True, samesite="strict", path="/")
        elif not guard.has_cookie(request):
            return PlainTextResponse(
                "refused: no session; open the URL with ?token= that `kloset-blocks ui` printed",
                status_code=401,
            )
        else:
            resp = await call_next(request)
        resp.headers["Cache-Control"] = "no-store"
        resp.headers["Content-Security-Policy"] = CSP
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "no-referrer"
        return resp

    @app.exception_handler(KlosetError)
    async def kloset_error(request: Request, exc: KlosetError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=409 if isinstance(exc, Busy) else 400)

    def info_for(ref: str) -> Any:
        with sessions.store_lock:
            return store.find_snapshot(ref)

    def version_of(info: Any) -> dict[str, Any]:
        """The snapshot's PostgreSQL major (or why it cannot be served), checked once."""
        if info.hex_id not in versions:
            try:
                with sessions.store_lock:
                    major = check_snapshot(store.open_snapshot(info.hex_id), pgdata=True).pg_major
                versions[info.hex_id] = {"pg_major": major, "problem": None}
            except KlosetError as e:
                versions[info.hex_id] = {"pg_major": None, "problem": str(e)}
        return versions[info.hex_id]

    # ---- the page ----------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # ---- backups -----------------------------------------------------------------------------

    @app.get("/api/snapshots", summary="The store's snapshots, newest first")
    def snapshots(since: str | None = None, until: str | None = None) -> dict[str, Any]:
        try:
            with sessions.store_lock:
                infos = select_snapshots(store, "all", since, until)
        except KlosetError as e:
            if "no snapshot matches" not in str(e):
                raise
            infos = []
        out = []
        for i in infos:
            s = sessions.get(i.hex_id)
            out.append(
                {
                    "id": i.hex_id,
                    "short_id": i.short_id,
                    "date": i.timestamp.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "size": i.size,
                    "name": i.name,
                    "source": f"{i.importer_type}://{i.importer_origin}{i.importer_directory}",
                    **version_of(i),
                    "state": s.state if s else None,
                }
            )
        return {"snapshots": out, "notices": sessions.notices[-20:]}

    @app.post("/api/snapshots/{ref}/open", summary="Open a snapshot (chain + read-only Postgres)")
    def open_snapshot(ref: str) -> dict[str, Any]:
        return sessions.open(info_for(ref)).as_json()

    @app.get("/api/snapshots/{ref}/session", summary="An opened snapshot: state and phases")
    def session(ref: str) -> dict[str, Any]:
        s = sessions.get(info_for(ref).hex_id)
        if s is None:
            raise KlosetError(f"snapshot {ref} is not open")
        return s.as_json()

    @app.post("/api/snapshots/{ref}/close", summary="Close an opened snapshot (tear its chain down)")
    def close_snapshot(ref: str) -> dict[str, Any]:
        s = sessions.get(info_for(ref).hex_id)
        if s is not None:
            sessions.close(s)
        return {"closed": s is not None}

    @app.get("/api/notices", summary="What the server did on its own (idle or --max-open closes)")
    def notices(after: int = 0) -> dict[str, Any]:
        return {"notices": [n for n in sessions.notices if n["n"] > after]}

    # ---- inside a snapshot -------------------------------------------------------------------

    @app.get("/api/snapshots/{ref}/databases", summary="The databases of an open snapshot")
    def databases(ref: str) -> dict[str, Any]:
        with sessions.use(info_for(ref).hex_id) as s:
            return {"databases": db.databases(s.conninfo(), timeout)}

    @app.get("/api/snapshots/{ref}/tables", summary="Schemas and tables with size and estimated rows")
    def tables(ref: str, database: str) -> dict[str, Any]:
        with sessions.use(info_for(ref).hex_id) as s:
            return {"tables": db.tables(s.conninfo(), database, timeout)}

    @app.get(
        "/api/snapshots/{ref}/tables/{schema}/{table}",
        summary="A table's columns, indexes and one page of rows (keyset: `after` is the last key, JSON)",
    )
    def table_page(
        ref: str,
        schema: str,
        table: str,
        database: str,
        after: str | None = None,
        limit: int = Query(100, le=1000),
    ) -> dict[str, Any]:
        key = json.loads(after) if after else None
        if key is not None and not (isinstance(key, list) and all(isinstance(k, str) for k in key)):
            raise KlosetError("after must be a JSON list of strings")
        with sessions.use(info_for(ref).hex_id) as s:
            return db.page(s.conninfo(), database, schema, table, after=key, limit=limit, timeout=timeout)

    @app.post("/api/snapshots/{ref}/sql", summary="Run one statement read-only (row cap, timeout)")
    def run_sql(ref: str, body: SqlRequest) -> dict[str, Any]:
        with sessions.use(info_for(ref).hex_id) as s:
            out = db.run(
                s.conninfo(), body.database, body.sql, cap=cap, timeout=timeout, explain=body.explain,
                cancels=cancels, run_id=body.run_id,
            )  # fmt: skip
        return {**out.as_json(), "cap": cap}

    @app.post("/api/cancel/{run_id}", summary="Cancel a running statement")
    def cancel(run_id: str) -> dict[str, Any]:
        return {"cancelled": cancels.cancel(run_id)}

    @app.get("/api/snapshots/{ref}/export", summary="The full result of one statement, streamed (csv | json)")
    def export(
        ref: str, database: str, sql: str, format: str = Query("csv", pattern="^(csv|json)$")
    ) -> Response:
        hex_id = info_for(ref).hex_id

        def produce() -> Iterator[Any]:
            with sessions.use(hex_id) as s:  # kept from the reaper until the download ends
                yield from db.stream_rows(s.conninfo(), database, sql, timeout=export_timeout)

        rows = produce()
        columns = next(rows)  # errors before the first row are a 400, not a broken download
        body = _csv(columns, rows) if format == "csv" else _json(columns, rows)
        media = "text/csv; charset=utf-8" if format == "csv" else "application/json"
        name = f"{hex_id[:8]}-result.{format}"
        return StreamingResponse(
            body, media_type=media, headers={"Content-Disposition": f'attachment; filename="{name}"'}
        )

    # ---- across backups, diff, take it back ---------------------------------------------------

    @app.post("/api/across", summary="Run one statement on several snapshots (the query engine)")
    def across(body: AcrossRequest) -> dict[str, Any]:
        with sessions.store_lock:
            infos = select_snapshots(store, ",".join(body.snapshots) or "all")
        job = AcrossJob(
            sessions.location, store, infos, body.sql, body.database,
            run_root=None if sessions.run_root is None else str(sessions.run_root), cap=cap, timeout=timeout,
        )  # fmt: skip
        for old in [j for j in app.state.jobs.values() if j.state != "running"][:-MAX_JOBS_KEPT]:
            del app.state.jobs[old.id]  # finished jobs keep their rows for the page: a few at most
        app.state.jobs[job.id] = job
        job.start()
        return job.as_json()

    @app.get("/api/across/{job_id}", summary="An across-backups job: results so far")
    def across_job(job_id: str) -> dict[str, Any]:
        return _job(app, job_id).as_json()

    @app.post("/api/across/{job_id}/cancel", summary="Stop an across-backups job")
    def across_cancel(job_id: str) -> dict[str, Any]:
        _job(app, job_id).cancel()
        return {"cancelled": True}

    @app.post("/api/diff", summary="A table between two open snapshots: rows added, removed, changed")
    def diff(body: DiffRequest) -> dict[str, Any]:
        with sessions.use(info_for(body.a).hex_id) as a, sessions.use(info_for(body.b).hex_id) as b:
            return db.diff(
                a.conninfo(), b.conninfo(), body.database, body.schema_, body.table, cap=cap, timeout=timeout
            )

    @app.post(
        "/api/takeback", summary="Rows as INSERT statements or COPY text", response_class=PlainTextResponse
    )
    def takeback(body: TakeBackRequest) -> PlainTextResponse:
        render = db.insert_statements if body.format == "insert" else db.copy_text
        return PlainTextResponse(render(body.table, body.columns, body.rows))

    return app


def _job(app: FastAPI, job_id: str) -> AcrossJob:
    job = app.state.jobs.get(job_id)
    if job is None:
        raise KlosetError(f"no across-backups job {job_id}")
    return job


def _csv(columns: list[str], rows: Iterator[Any]) -> Iterator[str]:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for n, row in enumerate(rows, 1):
        w.writerow(["" if v is None else v for v in row])
        if n % 500 == 0:
            yield buf.getvalue()
            buf.seek(0)
            buf.truncate()
    yield buf.getvalue()


def _json(columns: list[str], rows: Iterator[Any]) -> Iterator[str]:
    yield '{"columns": ' + json.dumps(columns) + ', "rows": ['
    sep = "\n"
    for row in rows:
        yield sep + json.dumps(list(row))
        sep = ",\n"
    yield "\n]}\n"
