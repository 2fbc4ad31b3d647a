# Statements on a snapshot's Postgres for the page, through psycopg 3 on its private Unix socket.
#
# Strategy: a fresh connection per request (a local socket connects in milliseconds; nothing a
# statement sets survives it). Every request runs inside `BEGIN READ ONLY` with our statement_timeout
# set by SET LOCAL, and ends in ROLLBACK. The page's text is sent with the extended protocol (as a
# statement with an empty parameter list), which the server accepts only as ONE statement: so
# "COMMIT; SET ..." cannot leave our transaction or lift the timeout. Rows are streamed (single-row
# mode): the run stops at the row cap, an export goes on to the end without holding the result.
# Values come back as Postgres prints them (text), so the page shows exactly what psql would.
#
# Invariants: identifiers reach SQL only through psycopg.sql.Identifier, values only as parameters;
# a table is paged by keyset (primary key, else ctid), never with OFFSET or count(*).
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import psycopg
from psycopg import sql
from psycopg.adapt import AdaptersMap, Loader

from kloset_blocks.errors import KlosetError

DEFAULT_TIMEOUT = 30.0
EXPORT_TIMEOUT = 600.0  # an export reads the whole result: one statement, so one timeout for all of it
DEFAULT_CAP = 1000
APP_NAME = "kloset-blocks ui"


class SqlError(KlosetError):
    """A statement failed on the snapshot's server (its own message)."""


class _TextLoader(Loader):
    def load(self, data: Any) -> str:
        return bytes(data).decode("utf-8", "replace")


def _text_adapters() -> AdaptersMap:
    """Every built-in type loaded as the text Postgres sends (unknown types already are)."""
    adapters = AdaptersMap(psycopg.adapters)
    for t in psycopg.adapters.types:
        for oid in (t.oid, getattr(t, "array_oid", 0)):
            if oid:
                adapters.register_loader(oid, _TextLoader)
    return adapters


TEXT = _text_adapters()


def connect(conninfo: dict[str, Any], db: str, *, text: bool = True) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(
            **conninfo,
            dbname=db,
            autocommit=True,
            connect_timeout=10,
            application_name=APP_NAME,
            context=TEXT if text else None,
        )
    except psycopg.Error as e:
        raise SqlError(_message(e)) from None


@contextlib.contextmanager
def read_only(
    conninfo: dict[str, Any], db: str, timeout: float = DEFAULT_TIMEOUT, *, text: bool = True
) -> Iterator[psycopg.Connection[Any]]:
    """A connection inside BEGIN READ ONLY with our statement_timeout; rolled back and closed after."""
    conn = connect(conninfo, db, text=text)
    try:
        conn.execute("BEGIN TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        conn.execute(
            sql.SQL("SET LOCAL statement_timeout = {}").format(sql.Literal(f"{int(timeout * 1000)}ms"))
        )
        yield conn
    except psycopg.Error as e:
        raise SqlError(_message(e)) from None
    finally:
        with contextlib.suppress(Exception):
            conn.execute("ROLLBACK")
        conn.close()


def one_statement(text: str) -> tuple[str, list[Any]]:
    """The page's text as a query with an (empty) parameter list: psycopg then uses the extended
    protocol, where the server refuses more than one statement. `%` is doubled since psycopg reads
    placeholders in a query that has parameters."""
    return text.replace("%", "%%"), []


def _message(e: psycopg.Error) -> str:
    diag = getattr(e, "diag", None)
    primary = (diag.message_primary if diag else None) or str(e).strip().splitlines()[0]
    detail = []
    if diag is not None:
        if diag.message_detail:
            detail.append(diag.message_detail)
        if diag.message_hint:
            detail.append(f"hint: {diag.message_hint}")
    sqlstate = getattr(e, "sqlstate", None)
    head = f"{primary}" + (f" (SQLSTATE {sqlstate})" if sqlstate else "")
    return " / ".join([head, *detail])


# --- running the page's statements ---------------------------------------------------------------


class Cancels:
    """The connections running a statement, by the page's run id, so that Cancel can reach them."""

    def __init__(self) -> None:
        self._conns: dict[str, psycopg.Connection[Any]] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def running(self, run_id: str | None, conn: psycopg.Connection[Any]) -> Iterator[None]:
        if run_id:
            with self._lock:
                self._conns[run_id] = conn
        try:
            yield
        finally:
            if run_id:
                with self._lock:
                    self._conns.pop(run_id, None)

    def cancel(self, run_id: str) -> bool:
        with self._lock:
            conn = self._conns.get(run_id)
        if conn is None:
            return False
        conn.cancel_safe()
        return True


@dataclass
class Outcome:
    columns: list[str] = field(default_factory=list)
    types: list[str] = field(default_factory=list)
    rows: list[list[str | None]] = field(default_factory=list)
    truncated: bool = False
    status: str = ""
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "columns": self.columns,
            "types": self.types,
            "rows": self.rows,
            "truncated": self.truncated,
            "status": self.status,
            "seconds": round(self.seconds, 3),
        }


def _closing(rows: Iterator[Any]) -> contextlib.closing[Generator[Any, None, None]]:
    """stream()'s generator, closed on the way out: psycopg then cancels what is left of the result."""
    return contextlib.closing(cast(Generator[Any, None, None], rows))


def _describe(cur: psycopg.Cursor[Any]) -> tuple[list[str], list[str]]:
    if cur.description is None:
        return [], []
    names = [c.name for c in cur.description]
    types = []
    for c in cur.description:
        info = cur.adapters.types.get(c.type_code)
        types.append(info.name if info else str(c.type_code))
    return names, types


def run(
    conninfo: dict[str, Any],
    db: str,
    text: str,
    *,
    cap: int = DEFAULT_CAP,
    timeout: float = DEFAULT_TIMEOUT,
    explain: bool = False,
    cancels: Cancels | None = None,
    run_id: str | None = None,
) -> Outcome:
    """One statement, read-only, at most `cap` rows kept (truncated says whether there were more)."""
    if not text.strip():
        raise SqlError("no statement")
    out = Outcome()
    t0 = time.monotonic()
    query, params = one_statement(("EXPLAIN " if explain else "") + text)
    with read_only(conninfo, db, timeout) as conn:
        cur = conn.cursor()
        with (cancels or Cancels()).running(run_id, conn):
            try:
                with _closing(cur.stream(query, params)) as rows:
                    for row in rows:
                        if len(out.rows) == cap:
                            out.truncated = True
                            break
                        out.rows.append(list(row))
            except psycopg.ProgrammingError:
                # stream() wants rows; a statement without any (SET, COMMIT...) ran all the same
                if cur.pgresult is None or cur.pgresult.status != psycopg.pq.ExecStatus.COMMAND_OK:
                    raise
        out.columns, out.types = _describe(cur)
        out.status = cur.statusmessage or ""
    out.seconds = time.monotonic() - t0
    return out


def stream_rows(
    conninfo: dict[str, Any], db: str, text: str, *, timeout: float = DEFAULT_TIMEOUT
) -> Iterator[tuple[list[str], Sequence[str | None]] | list[str]]:
    """The whole result of one statement, row by row, for an export: first the column names (a
    list), then (columns, row) pairs. Errors before the first row raise SqlError."""
    query, params = one_statement(text)
    with read_only(conninfo, db, timeout) as conn:
        cur = conn.cursor()
        with _closing(cur.stream(query, params)) as rows:
            first = True
            for row in rows:
                if first:
                    yield _describe(cur)[0]
                    first = False
                yield row
            if first:
                yield _describe(cur)[0]


# --- the catalog ---------------------------------------------------------------------------------

DATABASES = "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate ORDER BY datname"

TABLES = """
SELECT n.nspname, c.relname, c.relkind::text, pg_total_relation_size(c.oid)::text,
       CASE WHEN c.reltuples >= 0 THEN c.reltuples::bigint::text END
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND n.nspname <> 'information_schema'
  AND n.nspname NOT LIKE 'pg\\_%'
ORDER BY n.nspname, c.relname
"""

REL_OID = """
SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND c.relname = %s
"""

COLUMNS = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), (NOT a.attnotnull)::text, a.attcollation <> 0
FROM pg_attribute a WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum
"""

PRIMARY_KEY = """
SELECT a.attname FROM pg_index i
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
WHERE i.indrelid = %s AND i.indisprimary ORDER BY array_position(i.indkey::int2[], a.attnum)
"""

INDEXES = """
SELECT ci.relname, pg_get_indexdef(i.indexrelid) FROM pg_index i JOIN pg_class ci ON ci.oid = i.indexrelid
WHERE i.indrelid = %s ORDER BY ci.relname
"""


def databases(conninfo: dict[str, Any], timeout: float = DEFAULT_TIMEOUT) -> list[str]:
    with read_only(conninfo, "postgres", timeout) as conn:
        return [r[0] for r in conn.execute(DATABASES)]


def tables(conninfo: dict[str, Any], db: str, timeout: float = DEFAULT_TIMEOUT) -> list[dict[str, Any]]:
    kinds = {
        "r": "table",
        "p": "partitioned table",
        "v": "view",
        "m": "materialized view",
        "f": "foreign table",
    }
    with read_only(conninfo, db, timeout) as conn:
        return [
            {
                "schema": s,
                "name": n,
                "kind": kinds.get(k, k),
                "bytes": int(b),
                "estimated_rows": None if r is None else int(r),
            }
            for s, n, k, b, r in conn.execute(TABLES)
        ]


@dataclass
class Relation:
    oid: int
    schema: str
    name: str
    columns: list[dict[str, Any]]
    primary_key: list[str]
    indexes: list[dict[str, str]]

    @property
    def ident(self) -> sql.Composable:
        return sql.Identifier(self.schema, self.name)

    def as_json(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "name": self.name,
            "columns": [{k: v for k, v in c.items() if k != "collatable"} for c in self.columns],
            "primary_key": self.primary_key,
            "indexes": self.indexes,
        }


def relation(conn: psycopg.Connection[Any], schema: str, name: str) -> Relation:
    row = conn.execute(REL_OID, [schema, name]).fetchone()
    if row is None:
        raise SqlError(f"no table {schema}.{name}")
    oid = int(row[0])
    cols = [
        {"name": n, "type": t, "nullable": nullable == "true", "collatable": coll in (True, "t", "true")}
        for n, t, nullable, coll in conn.execute(COLUMNS, [oid])
    ]
    pk = [r[0] for r in conn.execute(PRIMARY_KEY, [oid])]
    idx = [{"name": n, "definition": d} for n, d in conn.execute(INDEXES, [oid])]
    return Relation(oid, schema, name, cols, pk, idx)


def describe(conninfo: dict[str, Any], db: str, schema: str, name: str) -> Relation:
    with read_only(conninfo, db) as conn:
        return relation(conn, schema, name)


def page(
    conninfo: dict[str, Any],
    db: str,
    schema: str,
    name: str,
    *,
    after: Sequence[str] | None = None,
    limit: int = 100,
    timeout: float = DEFAULT_TIMEOUT,
) -> dict[str, Any]:
    """Rows in key order after the key `after` (the primary key's values as text, else a ctid):
    the next page and the key to ask for the one after it (None at the end)."""
    limit = max(1, min(limit, DEFAULT_CAP))
    with read_only(conninfo, db, timeout) as conn:
        rel = relation(conn, schema, name)
        keys: list[sql.Composable] = [sql.Identifier(k) for k in rel.primary_key] or [sql.SQL("ctid")]
        nk = len(keys)
        key_list = sql.SQL(", ").join(keys)
        where: sql.Composable = sql.SQL("")
        params: list[Any] = []
        if after:
            if len(after) != nk:
                raise SqlError(f"the page key has {len(after)} value(s), the table's key {nk}")
            where = sql.SQL(" WHERE ({}) > ({})").format(
                key_list, sql.SQL(", ").join([sql.Placeholder()] * nk)
            )
            params = list(after)
        q = sql.SQL("SELECT {keys}, t.* FROM {rel} AS t{where} ORDER BY {keys} LIMIT {n}").format(
            keys=sql.SQL(", ").join(sql.SQL("t.{}").format(k) for k in keys),
            rel=rel.ident,
            where=where,
            n=sql.Literal(limit + 1),
        )
        cur = conn.execute(q, params)
        got = cur.fetchall()
        columns = _describe(cur)[0][nk:]
    more = len(got) > limit
    got = got[:limit]
    return {
        "table": rel.as_json(),
        "columns": columns,
        "rows": [list(r[nk:]) for r in got],
        "keys": [list(r[:nk]) for r in got],
        "next": list(got[-1][:nk]) if more and got else None,
        "key": rel.primary_key or ["ctid"],
    }


# --- diff ----------------------------------------------------------------------------------------


def diff(
    a: dict[str, Any],
    b: dict[str, Any],
    db: str,
    schema: str,
    name: str,
    *,
    cap: int = DEFAULT_CAP,
    timeout: float = DEFAULT_TIMEOUT,
) -> dict[str, Any]:
    """Rows added, removed and changed from snapshot a to snapshot b, matched by primary key.

    Both sides are read in key order (the primary key's index; collatable keys in "C" order so that
    Python's comparison of the strings agrees), and merged: memory is one batch a side, whatever
    the table's size. At most `cap` differences are kept; the counts cover the whole table."""
    with read_only(a, db, timeout, text=False) as ca, read_only(b, db, timeout, text=False) as cb:
        ra, rb = relation(ca, schema, name), relation(cb, schema, name)
        if not ra.primary_key:
            raise SqlError(f"{schema}.{name} has no primary key: a diff matches rows by it")
        if [c["name"] for c in ra.columns] != [
            c["name"] for c in rb.columns
        ] or ra.primary_key != rb.primary_key:
            raise SqlError(f"{schema}.{name} has different columns or keys in the two snapshots")
        out: dict[str, Any] = {
            "columns": [c["name"] for c in ra.columns],
            "key": ra.primary_key,
            "added": [],
            "removed": [],
            "changed": [],
            "counts": {"added": 0, "removed": 0, "changed": 0, "same": 0},
            "truncated": False,
        }
        ia, ib = _keyed_rows(ca, ra), _keyed_rows(cb, rb)
        _merge(ia, ib, out, cap)
    return out


def _keyed_rows(
    conn: psycopg.Connection[Any], rel: Relation
) -> Iterator[tuple[tuple[Any, ...], list[str | None]]]:
    collatable = {c["name"] for c in rel.columns if c["collatable"]}
    order = sql.SQL(", ").join(
        sql.SQL('t.{} COLLATE "C"').format(sql.Identifier(k))
        if k in collatable
        else sql.SQL("t.{}").format(sql.Identifier(k))
        for k in rel.primary_key
    )
    q = sql.SQL("SELECT {keys}, {vals} FROM {rel} AS t ORDER BY {order}").format(
        keys=sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(k)) for k in rel.primary_key),
        vals=sql.SQL(", ").join(sql.SQL("t.{}::text").format(sql.Identifier(c["name"])) for c in rel.columns),
        rel=rel.ident,
        order=order,
    )
    nk = len(rel.primary_key)
    with conn.cursor(name="kb_diff") as cur:
        cur.itersize = 2000
        cur.execute(q)
        for row in cur:
            yield tuple(row[:nk]), list(row[nk:])


def _merge(ia: Iterator[Any], ib: Iterator[Any], out: dict[str, Any], cap: int) -> None:
    counts = out["counts"]
    shown = 0

    def keep(kind: str, item: Any) -> None:
        nonlocal shown
        counts[kind] += 1
        if shown < cap:
            out[kind].append(item)
            shown += 1
        else:
            out["truncated"] = True

    end: Any = object()
    a: Any = next(ia, end)
    b: Any = next(ib, end)
    while a is not end or b is not end:
        if b is end or (a is not end and a[0] < b[0]):
            keep("removed", a[1])
            a = next(ia, end)
        elif a is end or b[0] < a[0]:
            keep("added", b[1])
            b = next(ib, end)
        else:
            if a[1] == b[1]:
                counts["same"] += 1
            else:
                cols = [out["columns"][i] for i, (x, y) in enumerate(zip(a[1], b[1], strict=True)) if x != y]
                keep("changed", {"before": a[1], "after": b[1], "columns": cols})
            a, b = next(ia, end), next(ib, end)


# --- take it back --------------------------------------------------------------------------------


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str | None) -> str:
    """A standard-conforming string constant (Postgres casts it to the column's type)."""
    if value is None:
        return "NULL"
    if "\\" in value:
        return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"
    return "'" + value.replace("'", "''") + "'"


def table_name(qualified: str) -> str:
    """`schema.table` or `table`, each part quoted."""
    parts = qualified.split(".", 1) if qualified.strip() else ["restored"]
    return ".".join(quote_ident(p.strip()) for p in parts)


def insert_statements(table: str, columns: Sequence[str], rows: Sequence[Sequence[str | None]]) -> str:
    head = f"INSERT INTO {table_name(table)} ({', '.join(quote_ident(c) for c in columns)}) VALUES "
    return "".join(f"{head}({', '.join(quote_literal(v) for v in row)});\n" for row in rows)


def _copy_field(value: str | None) -> str:
    if value is None:
        return "\\N"
    return value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def copy_text(table: str, columns: Sequence[str], rows: Sequence[Sequence[str | None]]) -> str:
    """COPY ... FROM stdin in text format, as psql pastes it (ends with `\\.`)."""
    lines = [f"COPY {table_name(table)} ({', '.join(quote_ident(c) for c in columns)}) FROM stdin;"]
    lines += ["\t".join(_copy_field(v) for v in row) for row in rows]
    lines.append("\\.")
    return "\n".join(lines) + "\n"
