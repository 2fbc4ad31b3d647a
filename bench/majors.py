# Every major side by side: whole-process time of `kloset-blocks psql` (a point query) and of
# `kloset-blocks check` (amcheck of the whole backup), and the bytes each fetched from the store, on
# one store holding a backup of PostgreSQL 15, 16, 17 and 18 (data checksums on; scale-1 pgbench;
# tests/pg_majors.py makes them: 15 by pg_basebackup, 16-18 by the low-level API on the npm builds).
# Rounds are interleaved (every snapshot once per round, the order rotated) so that machine noise
# hits every major alike. Each answer is checked against its live server's.
#
# Usage (root, after `make deps`): .venv/bin/python bench/majors.py [--runs 3]
# Setup ~1 min (four clusters, the store); then ~40 s a round.
from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kloset_blocks.host.rundir import RUN_ROOT_ENV
from kloset_blocks.writer.store import add_snapshot, write_store
from tests.pg_majors import MAJORS, PG_BINDIR_ENV, take_backups

POINT = "select abalance from pgbench_accounts where aid = 77770"
FETCHED = re.compile(r"^fetched ([\d.]+) (B|KiB|MiB|GiB) of", re.M)
SCALE = {"B": 1 / 2**20, "KiB": 1 / 1024, "MiB": 1, "GiB": 1024}


def run(argv: list[str], env: dict[str, str]) -> tuple[float, str, str]:
    t0 = time.monotonic()
    p = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, stdin=subprocess.DEVNULL)
    took = time.monotonic() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv[3:6])}: exit {p.returncode}: {p.stderr[-500:]}")
    return took, p.stdout, p.stderr


def fetched_mib(text: str) -> float:
    m = FETCHED.search(text)
    assert m, text
    return float(m.group(1)) * SCALE[m.group(2)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kb-bench-majors-"))
    run_root = Path("/run/kloset-blocks-bench") / work.name
    run_root.mkdir(parents=True)
    os.chmod(run_root.parent, 0o711)
    os.chmod(run_root, 0o711)
    try:
        names = [f"{m}-on" for m in MAJORS]
        backups = take_backups(work, names)
        store, snaps = work / "store", {}
        for name in names:
            add = write_store if not snaps else add_snapshot
            snaps[name] = add(store, backups[name].tar, seed=len(snaps) + 1)
        env = {**os.environ, RUN_ROOT_ENV: str(run_root), "KLOSET_BLOCKS_PG_BINDIR": PG_BINDIR_ENV}
        kb = [sys.executable, "-m", "kloset_blocks"]
        psql_s: dict[str, list[float]] = {n: [] for n in names}
        check_s: dict[str, list[float]] = {n: [] for n in names}
        psql_mib: dict[str, float] = {}
        check_mib: dict[str, float] = {}
        pages: dict[str, str] = {}
        for r in range(args.runs):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                snap, b = snaps[name][:12], backups[name]
                argv = [*kb, "psql", str(store), snap, "--", "-XAtqc", POINT, "-d", "shop"]
                took, out, err = run(argv, env)
                assert out.split("|")[0].strip() == b.live["point"].split("|")[0], (name, out)
                psql_s[name].append(took)
                psql_mib[name] = fetched_mib(err)
                took, out, err = run([*kb, "check", str(store), snap, "-q"], env)
                assert out.rstrip().endswith("clean: no damage found"), out
                check_s[name].append(took)
                check_mib[name] = fetched_mib(out)
                m = re.search(r"checked (\d+) relations .*: (\d+) pages", out)
                assert m, out
                pages[name] = f"{m.group(1)} / {m.group(2)}"
        print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs; "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {args.runs} rounds")  # fmt: skip
        print("| major | psql point query, s: median (min-max) | fetched, MiB | check, s: median (min-max) "
              "| relations / pages checked | check fetched, MiB |")  # fmt: skip
        print("|---|---|---|---|---|---|")
        for name in names:
            p, c = psql_s[name], check_s[name]
            print(f"| {name.split('-')[0]} | {statistics.median(p):.2f} ({min(p):.2f}-{max(p):.2f}) "
                  f"| {psql_mib[name]:.1f} | {statistics.median(c):.2f} ({min(c):.2f}-{max(c):.2f}) "
                  f"| {pages[name]} | {check_mib[name]:.1f} |")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(run_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
