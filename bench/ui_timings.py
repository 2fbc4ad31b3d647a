"""`kloset-blocks ui` end to end, through its JSON API as the page calls it (wall clock per step).

    sudo .venv/bin/python bench/ui_timings.py [STORE] [--rounds N]

Per round: a fresh `kloset-blocks ui` process (private run root); then
  open -> table list: POST open, poll the session every 50 ms until ready, GET databases, GET tables
  first page: GET the first 100 rows of the largest table (by the catalog's size)
  across: POST /api/across with one statement over every snapshot of the store, poll until done
then SIGTERM (every chain torn down). Prints one line per round and the medians.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kloset_blocks.web.launch import REPO, login, spawn


class Client:
    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "", parts.port or 0
        self.cookie = login(url)
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=600)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        headers = {"Cookie": self.cookie}
        data = None
        if method == "POST":
            data = json.dumps(body or {})
            headers["Content-Type"] = "application/json"
        self.conn.request(method, path, body=data, headers=headers)
        resp = self.conn.getresponse()
        text = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{method} {path}: {resp.status} {text[:200]!r}")
        return json.loads(text)


def one_round(store: str, sql: str, database: str) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix="kb-ui-bench-", dir="/run"))
    os.chmod(root, 0o711)
    proc, url = spawn(store, root, "-q")
    try:
        c = Client(url)
        snaps = c.call("GET", "/api/snapshots")["snapshots"]
        snap = snaps[0]["id"]  # the newest
        t0 = time.monotonic()
        s = c.call("POST", f"/api/snapshots/{snap}/open")
        while s["state"] == "opening":
            time.sleep(0.05)
            s = c.call("GET", f"/api/snapshots/{snap}/session")
        assert s["state"] == "ready", s
        dbs = c.call("GET", f"/api/snapshots/{snap}/databases")["databases"]
        db = database if database in dbs else dbs[0]
        tables = c.call("GET", f"/api/snapshots/{snap}/tables?database={db}")["tables"]
        t_open = time.monotonic() - t0
        big = max(tables, key=lambda t: t["bytes"])
        t0 = time.monotonic()
        page = c.call(
            "GET", f"/api/snapshots/{snap}/tables/{big['schema']}/{big['name']}?database={db}&limit=100"
        )
        t_page = time.monotonic() - t0
        assert len(page["rows"]) == min(100, big["estimated_rows"] or 100)
        t0 = time.monotonic()
        job = c.call("POST", "/api/across", {"database": db, "sql": sql, "snapshots": []})
        while job["state"] == "running":
            time.sleep(0.05)
            job = c.call("GET", f"/api/across/{job['id']}")
        t_across = time.monotonic() - t0
        assert job["state"] == "done" and not any(r["error"] for r in job["results"]), job
        return {"open_to_tables": t_open, "first_page": t_page, "across": t_across, "snapshots": len(snaps),
                "largest": f"{big['schema']}.{big['name']}"}  # fmt: skip
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        os.rmdir(root)  # empty: the teardown left nothing


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("store", nargs="?", default=str(REPO.parent / "shared" / "fixtures" / "golden-plain"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--database", default="shop")
    ap.add_argument("--sql", default="select id, name from customers where id = 150")
    args = ap.parse_args()
    rounds = []
    for i in range(args.rounds):
        r = one_round(args.store, args.sql, args.database)
        rounds.append(r)
        print(
            f"round {i + 1}: open->tables {r['open_to_tables']:.2f} s, first page of {r['largest']} "
            f"{r['first_page'] * 1000:.0f} ms, across {r['snapshots']} snapshots {r['across']:.2f} s",
            flush=True,
        )
    for key in ("open_to_tables", "first_page", "across"):
        print(f"median {key}: {statistics.median(r[key] for r in rounds):.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
