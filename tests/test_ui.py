# `kloset-blocks ui` driven in a real browser: Debian's chromium through Playwright, against the
# golden-plain fixture store (snapshots A bf6afbae, B 3b116f40; answers from the fixtures' README,
# measured on the live server before each backup). One ui server for the module (the real command
# in a subprocess, a private run root); each snapshot is opened once and stays open across tests.
# At the end the server gets SIGTERM and the kernel and /proc must show nothing left behind.
from __future__ import annotations

import csv
import http.client
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import expect, sync_playwright

from kloset_blocks.host.procs import processes_mentioning
from kloset_blocks.web.launch import login, spawn
from tests.conftest import REPO, private_run_root

pytestmark = [pytest.mark.root, pytest.mark.slow]
if os.geteuid() != 0:
    pytest.skip("the ui opens chains: needs root", allow_module_level=True)

A, B = "bf6afbae", "3b116f40"
A_ID = "bf6afbaef15411cad49bd0cb276075c35b157f0d9b2ac15c9fad05e346641a7c"
B_ID = "3b116f400535e37b338dd8f220ffa26fe9d3c1df8f7ed35994f9df090323efa2"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
STATEMENT_TIMEOUT = "5s"


class Ui:
    def __init__(self, proc: subprocess.Popen[str], url: str, root: Path) -> None:
        self.proc, self.url, self.root = proc, url, root
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "", parts.port or 0
        self.base = f"http://{self.host}:{self.port}"


def start_ui(store: Path, root: Path, *extra: str, passphrase: str | None = None) -> Ui:
    proc, url = spawn(store, root, "--timeout", STATEMENT_TIMEOUT, "-q", *extra, passphrase=passphrase)
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/\?token=[\w-]{20,}", url), (
        url,
        proc.stderr.read() if proc.poll() else "",
    )
    return Ui(proc, url, root)


def stop_ui(ui: Ui, sig: int = signal.SIGTERM) -> None:
    ui.proc.send_signal(sig)
    try:
        rc = ui.proc.wait(timeout=120)
    finally:
        if ui.proc.poll() is None:
            ui.proc.kill()
    err = ui.proc.stderr.read() if ui.proc.stderr else ""
    assert rc == 0, err
    assert_nothing_left(ui.root)


def assert_nothing_left(root: Path) -> None:
    """The kernel's and /proc's word: no mount, loop device, process or run directory of ours."""
    mounts = Path("/proc/mounts").read_text()
    assert str(root) not in mounts
    loops = subprocess.run(["losetup", "-l", "-n", "-O", "BACK-FILE"], capture_output=True, text=True).stdout
    assert str(root) not in loops
    assert processes_mentioning(str(root) + "/") == []
    assert list(root.iterdir()) == []


def request(
    ui: Ui, method: str, path: str, *, headers: dict[str, str] | None = None, body: Any = None
) -> tuple[int, str]:
    """A raw HTTP request (http.client lets a test send a foreign Host)."""
    conn = http.client.HTTPConnection(ui.host, ui.port, timeout=60)
    hdrs = {"Host": f"{ui.host}:{ui.port}", **(headers or {})}
    data = None
    if body is not None:
        data = json.dumps(body)
        hdrs["Content-Type"] = "application/json"
    conn.request(method, path, body=data, headers=hdrs)
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    return resp.status, text


@pytest.fixture(scope="module")
def ui(fixtures_dir: Path) -> Iterator[Ui]:
    with private_run_root("ui") as root:
        u = start_ui(fixtures_dir / "golden-plain", root)
        try:
            yield u
        finally:
            stop_ui(u)


@pytest.fixture(scope="module")
def page(ui: Ui) -> Iterator[Any]:

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(accept_downloads=True, viewport={"width": 1300, "height": 900})
        context.set_default_timeout(60_000)
        pg = context.new_page()
        pg.goto(ui.url)  # the token, traded for the cookie
        assert "token" not in pg.url
        yield pg
        browser.close()


def goto(page: Any, ui: Ui, fragment: str) -> None:
    page.goto(f"{ui.base}/#{fragment}")


def run_sql(page: Any, sql: str) -> None:
    editor = page.get_by_role("textbox", name="SQL")
    editor.fill(sql)
    page.get_by_role("button", name="Run", exact=True).click()


def open_snapshot(page: Any, ui: Ui, snap: str) -> None:
    goto(page, ui, "/")
    page.get_by_role("link", name=snap, exact=True).click()
    page.get_by_label("Database").wait_for()


def table_rows(page: Any, scope: Any = None) -> tuple[list[str], list[list[str]]]:
    """The first results table's header cells and data rows as the browser shows them."""
    t = (scope or page).locator("table").last
    heads = [x.strip() for x in t.locator("thead th").all_inner_texts()]
    rows = [[c.strip() for c in r.locator("td").all_inner_texts()] for r in t.locator("tbody tr").all()]
    return heads, rows


# --- safety ---------------------------------------------------------------------------------------


def test_token_less_request_is_refused(ui: Ui, page: Any) -> None:
    status, _ = request(ui, "GET", "/api/snapshots")
    assert status == 401
    status, _ = request(ui, "GET", "/")
    assert status == 401
    token = ui.url.split("token=", 1)[1]
    status, _ = request(ui, "GET", f"/?token={token}")  # spent by the browser already
    assert status == 403


def test_foreign_host_and_origin_are_refused(ui: Ui, page: Any) -> None:
    cookie = page.context.cookies()[0]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    auth = {"Cookie": f"{cookie['name']}={cookie['value']}"}
    assert request(ui, "GET", "/api/snapshots", headers=auth)[0] == 200
    assert (
        request(ui, "GET", "/api/snapshots", headers={**auth, "Host": f"rebind.example:{ui.port}"})[0] == 403
    )
    status, _ = request(
        ui, "POST", f"/api/snapshots/{A}/open", headers={**auth, "Origin": "http://evil.example"}, body={}
    )
    assert status == 403


# --- the page -------------------------------------------------------------------------------------


def test_backups_newest_first_with_ids_as_links(ui: Ui, page: Any) -> None:
    goto(page, ui, "/")
    links = page.locator("main table a")
    links.first.wait_for()
    assert links.all_inner_texts() == [B, A]  # B was taken after A
    heads, rows = table_rows(page)
    assert heads[:4] == ["Snapshot", "Date", "Size", "PostgreSQL"]
    assert all(r[3] == "PostgreSQL 15" for r in rows)


def test_open_snapshot_and_browse_a_table(ui: Ui, page: Any) -> None:
    open_snapshot(page, ui, A)
    phases = page.get_by_label("Phases").inner_text()
    for name in ("open", "serve", "overlay", "attach", "mount", "recovery", "ready"):
        assert name in phases
    page.get_by_role("link", name="customers", exact=True).click()
    page.get_by_role("button", name="Next page").wait_for()
    assert "CREATE UNIQUE INDEX customers_pkey" in page.locator("main").inner_text()
    heads, rows = table_rows(page)
    assert heads == ["Select", "id", "name", "email"]
    assert rows[0][1:] == ["1", "customer-1", "customer1@example.com"] and len(rows) == 100
    page.get_by_role("button", name="Next page").click()
    page.get_by_text("rows 101\N{EN DASH}200").wait_for()
    _, rows = table_rows(page)
    assert [r[1] for r in rows] == [str(i) for i in range(101, 201)]
    page.get_by_label("Select row 50").check()  # id 150
    page.get_by_role("button", name="Selected rows as INSERT").click()
    expect(page.get_by_label("Take it back", exact=True)).to_have_value(
        'INSERT INTO "public"."customers" ("id", "name", "email") '
        "VALUES ('150', 'customer-150', 'customer150@example.com');\n"
    )


def test_run_a_statement(ui: Ui, page: Any) -> None:
    open_snapshot(page, ui, A)
    run_sql(page, "select count(*), sum(id) from customers")
    page.get_by_text("1 row(s)").wait_for()
    assert table_rows(page) == (["count", "sum"], [["5000", "12502500"]])
    page.get_by_role("button", name="EXPLAIN").click()
    page.get_by_role("columnheader", name="QUERY PLAN").wait_for()
    assert "Aggregate" in page.locator("main table").last.inner_text()
    assert "select count(*), sum(id) from customers" in page.get_by_label("History").inner_text()
    markup = '<b id="xss">bold</b><img src=x onerror="document.title=1">'
    run_sql(page, f"select '{markup}' as v")
    page.get_by_role("cell", name=markup).wait_for()  # shown as text, never parsed as HTML
    assert page.locator("#xss").count() == 0 and page.title() == "kloset-blocks ui"


def test_row_cap_and_streamed_export(ui: Ui, page: Any) -> None:
    open_snapshot(page, ui, A)
    sql = "select aid, abalance from pgbench_accounts order by aid"
    run_sql(page, sql)
    page.get_by_text("1000 row(s) (first 1000").wait_for()
    with page.expect_download() as dl:
        page.get_by_role("button", name="Export CSV").click()
    assert dl.value.failure() is None
    text = Path(dl.value.path()).read_text()
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["aid", "abalance"] and len(rows) == 1 + 200000  # the whole result, not the cap
    assert rows[1] == ["1", "0"] and rows[-1] == ["200000", "0"]
    resp = page.request.get(
        f"{ui.base}/api/snapshots/{A}/export",
        params={
            "database": "shop",
            "sql": "select id, name from customers where id in (1, 150)",
            "format": "json",
        },
    )
    assert resp.ok
    assert resp.json() == {"columns": ["id", "name"], "rows": [["1", "customer-1"], ["150", "customer-150"]]}


def test_write_is_refused(ui: Ui, page: Any) -> None:
    open_snapshot(page, ui, A)
    for sql in ("delete from customers where id = 1", "commit; delete from customers where id = 1"):
        run_sql(page, sql)
        alert = page.get_by_role("alert").filter(has_text=re.compile(r"read-only|multiple commands"))
        alert.wait_for()
    run_sql(page, "select count(*) from customers where id = 1")
    page.get_by_text("1 row(s)").wait_for()
    assert table_rows(page)[1] == [["1"]]


def test_pg_sleep_is_cut_by_the_statement_timeout(ui: Ui, page: Any) -> None:
    open_snapshot(page, ui, A)
    t0 = time.monotonic()
    run_sql(page, "select pg_sleep(60)")
    page.get_by_role("alert").filter(has_text="statement timeout").wait_for()
    assert time.monotonic() - t0 < 60  # cut, not finished (the timeout itself is 5 s)
    run_sql(page, "set statement_timeout = 0")  # one statement, one transaction: nothing carries over
    run_sql(page, "select pg_sleep(60)")
    page.get_by_role("alert").filter(has_text="statement timeout").wait_for()


def test_cancel_stops_a_running_statement(ui: Ui, page: Any) -> None:
    open_snapshot(page, ui, A)
    run_sql(page, "select pg_sleep(60), 'cancel-me'")
    probe = "select count(*) from pg_stat_activity where query like '%cancel-me%' and state = 'active'"
    for _ in range(200):  # until the server runs it (its own word), then Cancel
        got = page.request.post(f"{ui.base}/api/snapshots/{A}/sql", data={"database": "shop", "sql": probe})
        if got.json()["rows"] == [["2"]]:  # the sleeper and this probe
            break
    page.get_by_role("button", name="Cancel", exact=True).click()
    page.get_by_role("alert").filter(has_text="canceling statement due to user request").wait_for()


def test_take_rows_back_as_insert_and_copy(ui: Ui, page: Any) -> None:
    open_snapshot(page, ui, A)
    run_sql(page, "select id, name, email from customers where id = 150")
    page.get_by_text("1 row(s)").wait_for()
    page.get_by_role("button", name="as INSERT").click()
    out = page.get_by_label("Take it back", exact=True)
    out.wait_for()
    assert out.input_value() == (
        'INSERT INTO "public"."restored" ("id", "name", "email") '
        "VALUES ('150', 'customer-150', 'customer150@example.com');\n"
    )
    page.get_by_role("button", name="as COPY").click()
    expect(out).to_have_value(re.compile(r"^COPY"))
    assert out.input_value() == (
        'COPY "public"."restored" ("id", "name", "email") FROM stdin;\n'
        "150\tcustomer-150\tcustomer150@example.com\n\\.\n"
    )


def test_take_back_literals_round_trip_through_postgres(ui: Ui, page: Any) -> None:
    """The INSERT's literals, read back by the snapshot's own server, are the values themselves."""
    values = ["it's", "back\\slash", "tab\there", "new\nline", None, "x' OR '1'='1"]
    api = page.request
    text = api.post(
        f"{ui.base}/api/takeback",
        data={
            "table": "t",
            "columns": [f"c{i}" for i in range(len(values))],
            "rows": [values],
            "format": "insert",
        },
    ).text()
    literals = text.split(" VALUES ", 1)[1].rstrip(";\n")
    got = api.post(
        f"{ui.base}/api/snapshots/{A}/sql", data={"database": "shop", "sql": f"select {literals[1:-1]}"}
    )
    assert got.ok, got.text()
    assert got.json()["rows"] == [values]


def test_across_backups_finds_the_backup_that_has_the_row(ui: Ui, page: Any) -> None:
    goto(page, ui, "/across")
    page.get_by_label("Database").fill("shop")
    run_sql(page, "select id, name from customers where id = 150")
    page.get_by_text("2 of 2 snapshot(s)").wait_for(timeout=120_000)
    page.get_by_role("button", name="Run", exact=True).wait_for()
    expect(page.locator("main p[role=status]")).not_to_contain_text("running")
    a = page.get_by_role("region", name=f"Snapshot {A}")
    b = page.get_by_role("region", name=f"Snapshot {B}")
    assert "1 row(s)" in a.inner_text() and "0 row(s)" in b.inner_text()
    assert "1 gone since the older snapshot" in b.inner_text()
    assert table_rows(page, a) == (["id", "name"], [["150", "customer-150"]])
    links = page.locator("main section h3 a").all_inner_texts()
    assert links == [B, A]  # newest first


def test_diff_between_two_snapshots(ui: Ui, page: Any) -> None:
    goto(page, ui, "/diff")
    page.get_by_label("From").select_option(A_ID)
    page.get_by_label("to", exact=True).select_option(B_ID)
    page.get_by_label("Database").fill("shop")
    page.get_by_label("Table").fill("public.customers")
    page.get_by_role("button", name="Compare").click()
    page.get_by_text("0 added, 100 removed, 0 changed, 4900 unchanged").wait_for(timeout=120_000)
    heads, rows = table_rows(page, page.locator("main .scroll").first)
    assert heads == ["id", "name", "email"]
    assert [r[0] for r in rows] == [str(i) for i in range(100, 200)]
    page.get_by_label("Table").fill("pgbench_accounts")
    page.get_by_role("button", name="Compare").click()
    page.get_by_text("0 added, 0 removed, 10 changed, 199990 unchanged").wait_for(timeout=120_000)
    bold = page.locator("td.cell-changed").all_inner_texts()
    assert bold == ["42"] * 10


# --- --max-open and --idle: a second server, API only --------------------------------------------


def test_max_open_closes_the_oldest_idle_and_idle_closes(fixtures_dir: Path) -> None:
    with private_run_root("ui-limits") as root:
        ui = start_ui(fixtures_dir / "golden-plain", root, "--max-open", "1", "--idle", "4s")
        try:
            cookie = {"Cookie": login(ui.url)}

            def api(method: str, path: str) -> Any:
                status, text = request(
                    ui, method, path, headers=cookie, body={} if method == "POST" else None
                )
                assert status == 200, text
                return json.loads(text)

            def wait_state(snap: str, want: str) -> None:
                for _ in range(600):
                    if api("GET", f"/api/snapshots/{snap}/session")["state"] == want:
                        return
                    time.sleep(0.1)
                raise AssertionError(f"{snap} never {want}")

            api("POST", f"/api/snapshots/{A}/open")
            wait_state(A, "ready")
            api("POST", f"/api/snapshots/{B}/open")  # one at a time: A (idle) makes room
            assert api("GET", f"/api/snapshots/{A}/session")["state"] == "closed"
            wait_state(B, "ready")
            assert len(list(root.iterdir())) == 1  # A's chain is gone, B's is up
            wait_state(B, "closed")  # unused for 4 s
            texts = [n["text"] for n in api("GET", "/api/notices")["notices"]]
            assert texts == [
                f"closed snapshot {A} to make room (--max-open 1)",
                f"closed snapshot {B}: idle for more than 4 s",
            ]
            assert list(root.iterdir()) == []
        finally:
            stop_ui(ui)


# --- other stores: encrypted, not PostgreSQL, a wrong passphrase -----------------------------------


def api_session(ui: Ui) -> dict[str, str]:
    return {"Cookie": login(ui.url)}


def test_encrypted_store_and_ctrl_c_while_a_snapshot_opens(fixtures_dir: Path) -> None:
    """The passphrase from the environment; then Ctrl-C (SIGINT) as soon as a chain is on its way
    up: the open under way finishes and is torn down with the rest."""
    with private_run_root("ui-enc") as root:
        ui = start_ui(fixtures_dir / "golden-enc", root, passphrase="correct horse battery staple")
        try:
            assert "correct" not in ui.url
            auth = api_session(ui)
            status, text = request(ui, "GET", "/api/snapshots", headers=auth)
            assert status == 200, text
            snaps = json.loads(text)["snapshots"]
            assert [(s["short_id"], s["pg_major"]) for s in snaps] == [("0b3eff1d", "15")]
            request(ui, "POST", "/api/snapshots/0b3eff1d/open", headers=auth, body={})
            for _ in range(600):  # until the chain has a run directory
                if list(root.iterdir()):
                    break
                time.sleep(0.01)
            assert list(root.iterdir())
        finally:
            stop_ui(ui, signal.SIGINT)


def test_wrong_passphrase_is_one_line_and_nothing_starts(fixtures_dir: Path) -> None:
    env = {**os.environ, "PLAKAR_PASSPHRASE": "wrong"}
    p = subprocess.run(
        [sys.executable, "-m", "kloset_blocks", "ui", str(fixtures_dir / "golden-enc")],
        capture_output=True, text=True, env=env, cwd=REPO, stdin=subprocess.DEVNULL, timeout=120,
    )  # fmt: skip
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.startswith("kloset-blocks: ") and len(p.stderr.strip().splitlines()) == 1


def test_a_snapshot_that_is_not_postgresql_says_so(tmp_path: Path) -> None:
    src = tmp_path / "files"
    src.mkdir()
    (src / "hello.txt").write_text("not a database\n")
    store = tmp_path / "store"
    subprocess.run(
        [sys.executable, "-m", "kloset_blocks", "mkstore", str(store), "--from-dir", str(src), "--plaintext"],
        check=True, capture_output=True, cwd=REPO,
    )  # fmt: skip
    with private_run_root("ui-nopg") as root:
        ui = start_ui(store, root)
        try:
            auth = api_session(ui)
            snaps = json.loads(request(ui, "GET", "/api/snapshots", headers=auth)[1])["snapshots"]
            assert snaps[0]["pg_major"] is None and "PostgreSQL" in snaps[0]["problem"]
            ref = snaps[0]["short_id"]
            request(ui, "POST", f"/api/snapshots/{ref}/open", headers=auth, body={})
            for _ in range(100):
                s = json.loads(request(ui, "GET", f"/api/snapshots/{ref}/session", headers=auth)[1])
                if s["state"] != "opening":
                    break
                time.sleep(0.1)
            assert s["state"] == "error" and "PostgreSQL" in s["error"]
            assert request(ui, "GET", "/api/snapshots", headers=auth)[0] == 200  # the rest keeps working
        finally:
            stop_ui(ui)
