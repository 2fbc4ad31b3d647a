# The ui's pure parts: durations, SQL quoting for take-it-back, COPY text escapes, the marks of what
# changed between snapshots, the Host/Origin guard. (The browser tests in test_ui.py check the same
# quoting against the snapshot's own Postgres.)
from __future__ import annotations

from typing import Any

import pytest

from kloset_blocks.commands.ui import parse_duration
from kloset_blocks.errors import UsageError
from kloset_blocks.web.across import mark_changes
from kloset_blocks.web.app import Guard
from kloset_blocks.web.db import copy_text, insert_statements, one_statement, quote_literal, table_name


@pytest.mark.parametrize(
    ("text", "seconds"), [("10m", 600), ("30s", 30), ("1h", 3600), ("250ms", 0.25), ("7", 7)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten", "5 d", "-1s"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(UsageError):
        parse_duration(text)


def test_quote_literal() -> None:
    assert quote_literal(None) == "NULL"
    assert quote_literal("it's") == "'it''s'"
    assert quote_literal("a\\b") == "E'a\\\\b'"


def test_table_name_quotes_each_part() -> None:
    assert table_name("public.Customers") == '"public"."Customers"'
    assert table_name('x"y') == '"x""y"'


def test_insert_and_copy() -> None:
    rows = [["1", None, "tab\there\nline \\ end"]]
    assert insert_statements("t", ["a", "b", "c"], rows) == (
        'INSERT INTO "t" ("a", "b", "c") VALUES (\'1\', NULL, E\'tab\there\nline \\\\ end\');\n'
    )
    assert copy_text("s.t", ["a", "b", "c"], rows) == (
        'COPY "s"."t" ("a", "b", "c") FROM stdin;\n1\t\\N\ttab\\there\\nline \\\\ end\n\\.\n'
    )


def test_one_statement_doubles_percent() -> None:
    assert one_statement("select '100%' like 'a%'") == ("select '100%%' like 'a%%'", [])


def result(rows: list[list[str]], error: str | None = None) -> dict[str, Any]:
    return {"rows": rows, "error": error}


def test_mark_changes_against_the_next_older_answer() -> None:
    results = [result([["1", "x"], ["2", "new"]]), result([], "boom"), result([["1", "x"], ["3", "gone"]])]
    mark_changes(results)
    assert results[0]["changed"] == [False, True] and results[0]["gone"] == 1
    assert results[1]["changed"] == []
    assert results[2]["changed"] == [False, False]  # the oldest: nothing to compare with


class Req:
    def __init__(self, **headers: str) -> None:
        self.headers = headers


def test_guard_refuses_foreign_host_origin_and_cross_site() -> None:
    g = Guard("127.0.0.1", 8080)
    assert g.refusal(Req(host="127.0.0.1:8080")) is None  # type: ignore[arg-type]
    assert g.refusal(Req(host="localhost:8080", origin="http://localhost:8080")) is None  # type: ignore[arg-type]
    assert g.refusal(Req(host="evil.example:8080")) is not None  # type: ignore[arg-type]
    assert g.refusal(Req(host="127.0.0.1:8081")) is not None  # type: ignore[arg-type]
    assert g.refusal(Req(host="127.0.0.1:8080", origin="http://evil.example")) is not None  # type: ignore[arg-type]
    assert g.refusal(Req(host="127.0.0.1:8080", **{"sec-fetch-site": "cross-site"})) is not None  # type: ignore[arg-type]


def test_token_works_once() -> None:
    g = Guard("127.0.0.1", 8080)
    token = g.first_url.split("token=", 1)[1]
    assert not g.trade("wrong")
    assert g.trade(token)
    assert not g.trade(token)
