# The pure parts of `query` and of the run commands' argument handling, table-driven, without root:
# date bounds, choosing snapshots (on the golden fixture's real snapshot records), psql's CSV,
# rendering, the summary, and how `psql`'s arguments are split from ours.
from __future__ import annotations

import io
import json
from datetime import UTC, datetime

import pytest

from kloset_blocks.app.query import Result, parse_csv, parse_when, select_snapshots
from kloset_blocks.app.report import Printer, render_table, summary_json
from kloset_blocks.cli import build_parser
from kloset_blocks.commands.run import split_psql_args
from kloset_blocks.errors import NotFound, UsageError
from kloset_blocks.store import Store, open_store
from tests.store_helpers import PLAIN

A, B = "bf6afbae", "3b116f40"  # taken 2026-11-25 11:03:05 and 11:03:06 UTC (A first)


@pytest.fixture(scope="module")
def store() -> Store:
    return open_store(str(PLAIN))


@pytest.mark.parametrize(
    ("text", "end", "expected"),
    [
        ("2026-05-01", False, datetime(2026, 5, 1, tzinfo=UTC)),
        ("2026-05-01", True, datetime(2026, 5, 1, 23, 59, 59, 999999, tzinfo=UTC)),  # the whole day
        ("2026-05-01T14:30:00", True, datetime(2026, 5, 1, 14, 30, tzinfo=UTC)),  # a time is exact
        ("2026-05-01T14:30:00Z", False, datetime(2026, 5, 1, 14, 30, tzinfo=UTC)),
        ("2026-05-01T16:30:00+02:00", False, datetime(2026, 5, 1, 14, 30, tzinfo=UTC)),
        ("  2026-05-01 ", False, datetime(2026, 5, 1, tzinfo=UTC)),
    ],
)
def test_parse_when(text: str, end: bool, expected: datetime) -> None:
    assert parse_when(text, end=end) == expected


@pytest.mark.parametrize("text", ["yesterday", "2026-13-01", "", "01/05/2026"])
def test_parse_when_refuses(text: str) -> None:
    with pytest.raises(UsageError, match="bad date"):
        parse_when(text)


@pytest.mark.parametrize(
    ("spec", "since", "until", "oldest_first", "expected"),
    [
        ("all", None, None, False, [B, A]),  # newest first
        ("all", None, None, True, [A, B]),
        ("", None, None, False, [B, A]),
        (f"{A},{B}", None, None, False, [B, A]),  # the order is by date, not as listed
        (f"{A},{A[:5]}", None, None, False, [A]),  # one snapshot named twice counts once
        ("all", "2026-11-25T11:03:06", None, False, [B]),
        ("all", None, "2026-11-25T11:03:06", False, [A]),
        ("all", "2026-11-25", "2026-11-25", False, [B, A]),  # a bare --until date is the whole day
    ],
)
def test_select_snapshots(
    store: Store, spec: str, since: str | None, until: str | None, oldest_first: bool, expected: list[str]
) -> None:
    infos = select_snapshots(store, spec, since, until, oldest_first)
    assert [i.short_id for i in infos] == expected


@pytest.mark.parametrize(
    ("spec", "since", "until", "error", "message"),
    [
        ("ffff", None, None, NotFound, "no snapshot has prefix 'ffff'"),
        ("all", "2026-11-26", None, UsageError, "no snapshot matches the selection"),
        ("all", "2026-11-26", "2026-11-25", UsageError, "is after --until"),
    ],
)
def test_select_snapshots_refuses(
    store: Store, spec: str, since: str | None, until: str | None, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        select_snapshots(store, spec, since, until)


NULL = "<kb-null-x>"


@pytest.mark.parametrize(
    ("text", "columns", "rows"),
    [
        ("", [], []),
        ("a,b\n", ["a", "b"], []),
        ("a,b\n1,x\n", ["a", "b"], [["1", "x"]]),
        (f'a,b\n1,{NULL}\n2,""\n', ["a", "b"], [["1", None], ["2", ""]]),  # NULL and '' stay distinct
        ('a\n"line1\nline2"\n', ["a"], [["line1\nline2"]]),
        ('a,b\n"x, y","say ""hi"""\n', ["a", "b"], [["x, y", 'say "hi"']]),
    ],
)
def test_parse_csv(text: str, columns: list[str], rows: list[list[str | None]]) -> None:
    assert parse_csv(text, NULL) == (columns, rows)


@pytest.mark.parametrize(
    ("columns", "rows", "expected"),
    [
        # psql's layout: headers centered, values left-aligned, NULL empty, a newline shown as \n
        (["name"], [["customer-150"]], ["     name", "--------------", " customer-150", "(1 row)"]),
        (["id", "name"], [], [" id | name ", "----+------", "(0 rows)"]),
        (
            ["a", "b"],
            [["1", None], ["22", "x\ny"]],
            [" a  |  b", "----+------", " 1  |", " 22 | x\\ny", "(2 rows)"],
        ),
    ],
)
def test_render_table(columns: list[str], rows: list[list[str | None]], expected: list[str]) -> None:
    assert [line.rstrip() for line in render_table(columns, rows)] == [e.rstrip() for e in expected]


def test_printer_and_summary(store: Store) -> None:
    a, b = (store.find_snapshot(p) for p in (A, B))
    results = [
        Result(b, columns=["name"], rows=[]),
        Result(a, columns=["name"], rows=[["customer-150"]]),
        Result(b, error='query failed: ERROR:  relation "nope" does not exist'),
    ]
    out, err = io.StringIO(), io.StringIO()
    printer = Printer("csv", out=out, err=err, quiet=True)
    for r in results:
        printer.result(r)
    assert out.getvalue().splitlines() == ["snapshot,date,name", f"{A},2026-11-25T11:03:05Z,customer-150"]
    assert err.getvalue().count("\n") == 1 and 'relation "nope"' in err.getvalue()

    class Run:  # what summary_json reads of a finished QueryRun
        fetched_total, seconds = 1234, 1.5

    assert summary_json(Run(), results) == {  # type: ignore[arg-type]
        "with_rows": [A],
        "without_rows": [B],
        "failed": [B],
        "fetched_bytes": 1234,
        "seconds": 1.5,
    }
    assert json.loads(json.dumps(results[1].as_json()))["rows"] == [["customer-150"]]


@pytest.mark.parametrize(
    ("argv", "psql", "read_only", "quiet"),
    [
        (["psql", "S", "X"], [], False, False),
        (["psql", "S", "X", "-d", "shop", "-c", "select 1"], ["-d", "shop", "-c", "select 1"], False, False),
        (["psql", "S", "X", "--read-only", "--", "-d", "shop"], ["-d", "shop"], True, False),
        (["psql", "S", "X", "-q", "--", "-c", "x"], ["-c", "x"], False, True),
        (["psql", "--read-only", "S", "X", "--", "-l"], ["-l"], True, False),
        (["psql", "S", "X", "--", "--read-only"], ["--read-only"], False, False),  # after --: psql's
        (["psql", "S", "X", "-c", "select '--'"], ["-c", "select '--'"], False, False),
    ],
)
def test_psql_arguments_split_from_ours(
    argv: list[str], psql: list[str], read_only: bool, quiet: bool
) -> None:
    args = build_parser().parse_args(argv)
    assert split_psql_args(args) == psql
    assert (args.read_only, args.quiet) == (read_only, quiet)
