# How `kloset-blocks query` shows its results: each snapshot's rows as they come (a psql-like table,
# CSV with the snapshot and date first, or one JSON document at the end), progress lines on stderr,
# and the summary of which snapshots returned rows. Pure formatting: no I/O beyond the given streams.
from __future__ import annotations

import csv
import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from kloset_blocks.app.query import STATUS_EMPTY, STATUS_ERROR, STATUS_ROWS, QueryRun, Result
from kloset_blocks.names import escape_name, visible
from kloset_blocks.units import format_size

# --- output --------------------------------------------------------------------------------------


def render_table(columns: Sequence[str], rows: Sequence[Sequence[str | None]]) -> list[str]:
    """psql-like aligned table (NULL shown empty, as psql does); multi-line values on one line, and
    no control character of a value reaches the terminal raw (names are data)."""

    def cell(v: str | None) -> str:
        return "" if v is None else visible(v)

    columns = [visible(c) for c in columns]
    cells = [[cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells if i < len(r)]) for i, c in enumerate(columns)]
    out = [" " + " | ".join(c.center(w) for c, w in zip(columns, widths, strict=True))]
    out.append("-" + "-+-".join("-" * w for w in widths) + "-")
    for r in cells:
        out.append(" " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=False)))
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return out


class Printer:
    """Prints each result as it is ready: table (human), csv (snapshot, date, columns...), or json
    (one document at the end)."""

    def __init__(
        self, fmt: str, out: TextIO | None = None, err: TextIO | None = None, quiet: bool = False
    ) -> None:
        self.fmt = fmt
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.quiet = quiet
        self._csv = csv.writer(self.out, lineterminator="\n")
        self._header: list[str] | None = None

    def result(self, r: Result) -> None:
        if not self.quiet:
            print(progress_line(r), file=self.err, flush=True)
        if r.error is not None:
            print(f"kloset-blocks: query: snapshot {r.info.short_id}: {r.error}", file=self.err, flush=True)
        if self.fmt == "table":
            self._table(r)
        elif self.fmt == "csv" and r.error is None:
            header = ["snapshot", "date", *r.columns]
            if header != self._header:  # a schema change between snapshots: a new header
                self._csv.writerow(header)
                self._header = header
            for row in r.rows:
                self._csv.writerow([r.info.short_id, r.date, *["" if v is None else v for v in row]])
        self.out.flush()

    def _table(self, r: Result) -> None:
        title = f"snapshot {r.info.short_id}  {r.date}"
        if r.info.name:
            title += f"  {escape_name(r.info.name)}"
        print(f"== {title}", file=self.out)
        if r.error is not None:
            print(f"error: {r.error}", file=self.out)
        else:
            for line in render_table(r.columns, r.rows):
                print(line, file=self.out)
        print(file=self.out)

    def finish(self, run: QueryRun, results: Sequence[Result]) -> None:
        if self.fmt == "json":
            doc = {
                "query": run.options.sql,
                "database": run.options.db,
                "snapshots": [r.as_json() for r in results],
                "summary": summary_json(run, results),
            }
            json.dump(doc, self.out, indent=1)
            self.out.write("\n")
            self.out.flush()
        dest = self.out if self.fmt == "table" else self.err
        if self.fmt == "table" or not self.quiet:
            for line in summary_lines(run, results):
                print(line, file=dest, flush=True)


def progress_line(r: Result) -> str:
    t = r.times
    up = sum(t.get(k, 0.0) for k in ("overlay", "attach", "mount"))
    pgt = sum(t.get(k, 0.0) for k in ("prepare", "start", "recovery"))
    parts = [f"{r.info.short_id}: {r.status}"]
    if r.error is None:
        parts[0] += f" ({len(r.rows)})"
    parts.append(
        f"{r.seconds:.2f} s (attach {up:.2f}, postgres {pgt:.2f}, query {t.get('query', 0):.2f}, "
        f"down {t.get('down', 0):.2f})"
    )
    if r.fetched is not None:
        parts.append(f"fetched {format_size(r.fetched)}")
    return ", ".join(parts)


def summary_json(run: QueryRun, results: Sequence[Result]) -> dict[str, Any]:
    def ids(status: str) -> list[str]:
        return [r.info.short_id for r in results if r.status == status]

    return {
        "with_rows": ids(STATUS_ROWS),
        "without_rows": ids(STATUS_EMPTY),
        "failed": ids(STATUS_ERROR),
        "fetched_bytes": run.fetched_total,
        "seconds": round(run.seconds, 3),
    }


def summary_lines(run: QueryRun, results: Sequence[Result]) -> list[str]:
    s = summary_json(run, results)
    lines = [f"summary: {len(results)} snapshot(s) queried in {run.seconds:.1f} s"]
    for key, label in (("with_rows", "with rows"), ("without_rows", "without rows"), ("failed", "failed")):
        if s[key]:
            lines.append(f"  {label}: {' '.join(s[key])}")
    if run.fetched_total is not None:
        lines.append(f"  fetched {format_size(run.fetched_total)} from the store")
    return lines
