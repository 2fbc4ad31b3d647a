# What it costs `kloset-blocks query` to survive one of its chains dying (bench/nbdkit_client_death.py:
# nbdkit 1.32.5 aborts when a client dies with replies in flight and more than one thread a
# connection). The options, side by side, interleaved, on the same store:
#   t2          one shared nbdkit, --threads=2 (what query did before)
#   t1          one shared nbdkit, --threads=1
#   noparallel  one shared nbdkit, --threads=2 behind nbdkit's noparallel filter (serialize=requests)
#   per-chain   one nbdkit per snapshot over a shared on-disk cache, approximated by one `query` run
#               per snapshot with the same --cache-dir (so it also pays a CLI start and a store
#               open per snapshot: an upper bound)
# Every run starts cold (no on-disk cache; the page cache is not dropped, the store is small).
#
#   .venv/bin/python bench/query_nbdkit_options.py --store ../shared/fixtures/golden-plain --rounds 3
#   .venv/bin/python bench/query_nbdkit_options.py --build-scale 10 --work /var/tmp/kb-opt --rounds 2
# (the second builds bench_query.py's five pgbench snapshots once, in --work, and scans a table)
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SQL = "select count(*), sum(id) from customers"

# The CLI with nbdkit's command line adjusted for one option (the module global is read per call).
DRIVER = r"""
import sys
from kloset_blocks.serving import nbdkit
from kloset_blocks import cli
mode = sys.argv[1]
real = nbdkit.nbdkit_argv
def argv(*a, **k):
    args, env = real(*a, **k)
    if mode == "t1":
        args[1] = "--threads=1"
    elif mode == "noparallel":
        args.insert(2, "--filter=noparallel")
        args.append("serialize=requests")
    return args, env
nbdkit.nbdkit_argv = argv
sys.exit(cli.main(sys.argv[2:]))
"""


def query(mode: str, store: str, extra: list[str], run_root: Path, sql: str) -> tuple[float, str]:
    env = {**os.environ, "KLOSET_BLOCKS_RUN_ROOT": str(run_root), "PYTHONPATH": str(REPO)}
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-c", DRIVER, mode, "query", store, "--db", "shop", "--format", "json", "-q",
         *extra, sql],
        capture_output=True, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    seconds = time.monotonic() - t0
    if p.returncode != 0:
        raise SystemExit(f"{mode}: query failed: {p.stderr[-800:]}")
    return seconds, p.stdout


def one(mode: str, store: str, snaps: list[str], jobs: int, run_root: Path, sql: str) -> tuple[float, str]:
    with tempfile.TemporaryDirectory(prefix="kb-optcache-") as cache:
        if mode == "per-chain":
            total, outs = 0.0, []
            for s in snaps:
                sec, out = query("t2", store, ["--snapshots", s, "--cache-dir", cache], run_root, sql)
                total += sec
                outs.append(out)
            return total, json.dumps(outs, sort_keys=True)
        sec, out = query(mode, store, ["--snapshots", ",".join(snaps), "-j", str(jobs)], run_root, sql)
        return sec, json.dumps(out, sort_keys=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--store")
    ap.add_argument("--snapshots", default="bf6afbae,3b116f40")
    ap.add_argument("--sql", default=SQL)
    ap.add_argument("--build-scale", type=int, help="build bench_query.py's store at this scale in --work")
    ap.add_argument("--work", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--modes", default="t2,t1,noparallel,per-chain")
    args = ap.parse_args()
    snaps = args.snapshots.split(",")
    if args.build_scale:
        sys.path.insert(0, str(REPO / "bench"))
        import bench_query

        store = args.work / "store"
        if not store.exists():
            args.work.mkdir(parents=True, exist_ok=True)
            os.chmod(args.work, 0o711)
            bench_query.build(args.build_scale, args.work)
        from kloset_blocks.store import open_store

        with open_store(f"fs:{store}") as st:
            snaps = [i.hex_id for i in st.snapshots()]
        args.store = str(store)
    modes = args.modes.split(",")
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="kb-optroot-", dir="/run") as root:
        os.chmod(root, 0o711)
        for r in range(args.rounds):
            for jobs in (1, 2):
                for mode in modes:
                    if mode == "per-chain" and jobs == 2:
                        continue
                    sec, _ = one(mode, args.store, snaps, jobs, Path(root), args.sql)
                    times.setdefault(f"{mode} -j{jobs}", []).append(sec)
                    print(f"round {r + 1} {mode} -j{jobs}: {sec:.2f} s", flush=True)
    print("\nmedian wall seconds, `kloset-blocks query` over", len(snaps), "snapshots:")
    for key, vals in times.items():
        print(f"  {key:16s} {statistics.median(vals):6.2f}  (runs: {', '.join(f'{v:.2f}' for v in vals)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
