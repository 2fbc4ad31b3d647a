# Benchmark of `kloset-blocks query` across snapshots (issue 8): "which backup still has my row?"
#
# Setup: a throwaway pgbench cluster (kloset_blocks.demo.sample, scale --scale), five
# `pg_basebackup -F tar -X fetch -c fast` backups with changes between them (pgbench TPC-B
# transactions, and the watched row updated, then deleted), written into one plaintext LZ4 store
# (write_store, then add_snapshot). The cluster is gone before any measurement.
#
# Measured, each checked against the live server's answers recorded before each backup:
# - query: the real CLI, `kloset-blocks query STORE SQL --format json` over the five snapshots
#   (one nbdkit, one chunk cache): total wall time, bytes read from the store (plugin counters),
#   and per snapshot seconds and new bytes fetched.
# - query --cache-dir, cold then warm (the second run reads its chunks from the on-disk cache).
# - restore: for each snapshot, `kloset-blocks restore` into a fresh directory, chown, Postgres
#   start (recovery) and the same query, then removal: the total wall time, bytes written.
#
# Usage (root): .venv/bin/python bench/bench_query.py [--scale 20] [--work DIR] [--results FILE]
# Appends a section to bench/RESULTS.md with --results (the numbers, machine, command and date).
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kloset_blocks import postgres
from kloset_blocks.app.teardown import teardown_run_dir
from kloset_blocks.demo import sample
from kloset_blocks.host.progress import Progress
from kloset_blocks.host.rundir import RUN_ROOT_ENV, RunDir
from kloset_blocks.store import open_store
from kloset_blocks.units import format_size
from kloset_blocks.writer.store import add_snapshot, write_store

WATCHED = 4242
SQL = f"select aid, bid, abalance from pgbench_accounts where aid = {WATCHED}"
ORACLE = (
    f"select coalesce(json_agg(json_build_array(aid::text, bid::text, abalance::text)), '[]') from ({SQL}) t"
)
CHANGES = [
    None,
    f"update pgbench_accounts set abalance = 1111 where aid = {WATCHED}",
    f"update pgbench_accounts set abalance = 2222 where aid = {WATCHED}",
    f"delete from pgbench_accounts where aid = {WATCHED}",
    None,
]


@dataclass
class Setup:
    store: Path
    ids: list[str] = field(default_factory=list)
    live: list[list[list[str]]] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    build_seconds: float = 0.0


def build(scale: int, work: Path) -> Setup:
    t0 = time.monotonic()
    s = Setup(work / "store")
    cluster = sample.make_cluster(scale)
    tars = []
    try:
        last = 0.0
        for i, change in enumerate(CHANGES):
            if i:
                sample.as_postgres(
                    [str(sample.BINDIR / "pgbench"), "-n", "-c", "2", "-t", "500", "-h", str(cluster.base),
                     "-p", str(sample.PORT), "shop"]
                )  # fmt: skip
            if change:
                cluster.psql(change, "shop")
            s.live.append(json.loads(cluster.psql(ORACLE, "shop")))
            time.sleep(max(0.0, 1.05 - (time.time() - last)))
            last = time.time()
            tars.append(cluster.basebackup(work / f"{i}.tar", wal="fetch"))
    finally:
        cluster.cleanup()
    for i, tar in enumerate(tars):
        s.ids.append((write_store if i == 0 else add_snapshot)(s.store, tar, seed=i))
        tar.unlink()
    with open_store(f"fs:{s.store}") as st:
        s.sizes = [st.find_snapshot(i).size for i in s.ids]
    s.build_seconds = time.monotonic() - t0
    return s


def env(run_root: Path) -> dict[str, str]:
    return {**os.environ, RUN_ROOT_ENV: str(run_root)}


def run_query(s: Setup, run_root: Path, *extra: str) -> tuple[float, dict]:
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-m", "kloset_blocks", "query", f"fs:{s.store}", SQL, "--db", "shop",
         "--format", "json", "-q", *extra],
        cwd=REPO, env=env(run_root), stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
    )  # fmt: skip
    seconds = time.monotonic() - t0
    if p.returncode != 0:
        raise SystemExit(f"query failed: {p.stderr}")
    doc = json.loads(p.stdout)
    got = {x["id"]: x["rows"] for x in doc["snapshots"]}
    want = {s.ids[i]: s.live[i] for i in range(len(s.ids))}
    if got != want:
        raise SystemExit(f"wrong answers: {got} != {want}")
    return seconds, doc


def allocated(path: Path) -> int:
    return sum(os.lstat(os.path.join(d, f)).st_blocks * 512 for d, _, fs in os.walk(path) for f in fs)


def run_restores(s: Setup, work: Path) -> tuple[float, int, list[float]]:
    """Five full restores + starts + the same query, one after the other."""
    t0 = time.monotonic()
    written, per = 0, []
    for i, ident in enumerate(s.ids):
        t1 = time.monotonic()
        dest = work / "restored"
        shutil.rmtree(dest, ignore_errors=True)
        subprocess.run(
            [sys.executable, "-m", "kloset_blocks", "restore", f"fs:{s.store}", ident[:12], str(dest)],
            check=True, cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True,
        )  # fmt: skip
        run = None
        try:
            run = RunDir.create(work / "runs")
            server = postgres.start_server(run, dest, read_only=True, progress=Progress(quiet=True))
            out = server.query(
                f"select coalesce(json_agg(json_build_array(aid::text, bid::text, abalance::text)), '[]') "
                f"from ({SQL}) t",
                "shop",
            )
            written += allocated(dest)
        finally:
            if run is not None:
                teardown_run_dir(run.path)
            shutil.rmtree(dest, ignore_errors=True)
        if json.loads(out) != s.live[i]:
            raise SystemExit(f"restore {i}: wrong answer {out}")
        per.append(time.monotonic() - t1)
    return time.monotonic() - t0, written, per


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return f"{os.cpu_count()} CPU ({cpu}), {format_size(mem)} RAM, Linux {platform.release()}"


def commit() -> str:
    p = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return p.stdout.strip()


def per_snapshot_table(doc: dict, sizes: dict[str, int]) -> list[str]:
    lines = ["| snapshot | seconds | new bytes fetched | of its size |", "|---|---|---|---|"]
    for x in doc["snapshots"]:
        size = sizes[x["id"]]
        f = x["fetched_bytes"] or 0
        lines.append(f"| {x['short_id']} | {x['seconds']:.2f} | {format_size(f)} | {100 * f / size:.2f} % |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description="kloset-blocks query across five snapshots vs five restores")
    ap.add_argument("--scale", type=int, default=20)
    ap.add_argument("--work", type=Path)
    ap.add_argument("--results", type=Path, help="append the report to this file (bench/RESULTS.md)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    work = args.work or Path(tempfile.mkdtemp(prefix="kb-bench-query-"))
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o711)  # postgres must reach the restored data directory and its run directory
    run_root = Path("/run/kloset-blocks-bench") / f"query-{os.getpid()}"
    run_root.mkdir(parents=True, exist_ok=True)
    os.chmod(run_root.parent, 0o711)
    os.chmod(run_root, 0o711)
    try:
        s = build(args.scale, work)
        print(f"setup {s.build_seconds:.0f} s, sizes {[format_size(x) for x in s.sizes]}", file=sys.stderr)
        sizes = dict(zip(s.ids, s.sizes, strict=True))
        t_query, doc = run_query(s, run_root)
        print(f"query {t_query:.1f} s", file=sys.stderr)
        t_jobs, doc_jobs = run_query(s, run_root, "--jobs", "2")
        cache = work / "cache"
        t_cold, doc_cold = run_query(s, run_root, "--cache-dir", str(cache))
        t_warm, doc_warm = run_query(s, run_root, "--cache-dir", str(cache))
        print(f"cache cold {t_cold:.1f} s, warm {t_warm:.1f} s", file=sys.stderr)
        t_restore, written, per_restore = run_restores(s, work)
        print(f"restores {t_restore:.1f} s", file=sys.stderr)
        total = sum(s.sizes)
        f_query = doc["summary"]["fetched_bytes"]
        later = doc["snapshots"][1:]
        later_max_s = max(x["seconds"] for x in later)
        later_max_pct = max(100 * (x["fetched_bytes"] or 0) / sizes[x["id"]] for x in later)
        warm_pct = 100 * doc_warm["summary"]["fetched_bytes"] / max(1, doc_cold["summary"]["fetched_bytes"])
        header = ["", "## query across snapshots"]
        if args.results and args.results.exists() and header[1] in args.results.read_text():
            header = []  # append only: one section, a subsection per run
        report = [
            *header,
            "",
            f"### pgbench scale {args.scale}",
            "",
            f"{time.strftime('%Y-%m-%d %H:%M %Z')}, commit {commit()}, {machine()}.",
            f"Command: `.venv/bin/python bench/bench_query.py --scale {args.scale}` (root). Five",
            f"`pg_basebackup -F tar -X fetch` backups of a pgbench scale {args.scale} database, 500 TPC-B",
            "transactions x 2 clients between backups, the watched row updated twice then deleted;",
            f"plaintext LZ4 store; snapshot sizes {', '.join(format_size(x) for x in s.sizes)}",
            f"(total {format_size(total)}). Query `{SQL}`, every answer checked against the live",
            "server's. One run each (the same page cache state for all: warm, no drop_caches).",
            "",
            "| what | wall time | bytes read from the store | bytes written |",
            "|---|---|---|---|",
            f"| `query` over 5 (one nbdkit, shared cache) | {t_query:.1f} s | {format_size(f_query)} | |",
            f"| `query --jobs 2` | {t_jobs:.1f} s | {format_size(doc_jobs['summary']['fetched_bytes'])} | |",
            f"| `query --cache-dir`, first run | {t_cold:.1f} s | "
            f"{format_size(doc_cold['summary']['fetched_bytes'])} | |",
            f"| `query --cache-dir`, second run | {t_warm:.1f} s | "
            f"{format_size(doc_warm['summary']['fetched_bytes'])} | |",
            f"| 5 x (`restore` + start + query) | {t_restore:.1f} s | {format_size(total)} (all) | "
            f"{format_size(written)} |",
            "",
            f"Speed-up vs restores: {t_restore / t_query:.1f}x. Per restore: "
            f"{', '.join(f'{x:.1f}' for x in per_restore)} s.",
            f"Second cached run fetched {warm_pct:.3f} % of the first's.",
            f"Snapshots after the first: at most {later_max_s:.2f} s and {later_max_pct:.2f} % of their"
            " size in new fetches (targets: < 1 s, < 1 %). Per snapshot, `query` (newest first; the first"
            " pays for the shared metadata and WAL/catalog chunks):",
            "",
            *per_snapshot_table(doc, sizes),
            "",
        ]  # fmt: skip
        text = "\n".join(report)
        print(text)
        if args.results:
            with open(args.results, "a") as f:
                f.write(text)
    finally:
        shutil.rmtree(run_root, ignore_errors=True)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
