# What the S3 client costs a process that opens an S3 store: the import of the S3 backend
# (`python -X importtime`: its cumulative time once kloset_blocks.store is imported, and the share
# of the biggest packages under it), and the whole process `kloset-blocks snapshots s3://...`
# against moto's S3 server on loopback holding golden-plain (wall time and max RSS from
# /usr/bin/time -v). Both import paths are paid twice by `psql`: in the CLI and in nbdkit's plugin.
#
# Side by side in one run: this checkout and, with --baseline DIR, another one (for example a
# worktree of the commit before the change), run alternately with the same interpreter and venv
# (PYTHONPATH puts the checkout first). Medians of --runs runs.
#
# Usage: .venv/bin/python bench/s3_client.py [--baseline DIR] [--runs 15]
from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.remote_servers import moto_server

FIXTURE = REPO.parent / "shared" / "fixtures" / "golden-plain"
WATCH = ("kloset_blocks.store.backend_s3", "minio", "urllib3", "kloset_blocks.store.s3sign")


def import_times(checkout: Path) -> dict[str, float]:
    """Cumulative import time (ms) of the backend, over the store package (imported first: every
    backend needs it), and of the watched packages under it."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    code = "import kloset_blocks.store; import kloset_blocks.store.backend_s3"
    cmd = [sys.executable, "-X", "importtime", "-c", code]
    err = subprocess.run(cmd, env=env, cwd=checkout, capture_output=True, text=True, check=True).stderr
    out: dict[str, float] = {}
    for line in err.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)$", line)
        if m and m[3] in WATCH and m[3] not in out:
            out[m[3]] = int(m[1]) / 1000
    return out


def whole_process(checkout: Path, location: str, config: Path) -> tuple[float, int]:
    """(wall seconds, max RSS KiB) of `kloset-blocks snapshots` under /usr/bin/time -v."""
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "kloset_blocks", "snapshots", location]
    r = subprocess.run(
        [*cmd, "--store-config", str(config)], env=env, cwd=checkout, capture_output=True, text=True
    )
    assert r.returncode == 0 and "bf6afbae" in r.stdout, r.stderr
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", r.stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
    assert wall and rss, r.stderr
    return int(wall[1] or 0) * 3600 + int(wall[2]) * 60 + float(wall[3]), int(rss[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", type=Path, help="another checkout, measured alternately")
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args()
    checkouts = {"this": REPO, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    imports: dict[str, list[dict[str, float]]] = {k: [] for k in checkouts}
    runs: dict[str, list[tuple[float, int]]] = {k: [] for k in checkouts}
    with moto_server() as s3, tempfile.TemporaryDirectory() as tmp:
        s3.put_tree(FIXTURE, "bench", "plain")
        config = s3.config(Path(tmp) / "s3.conf")
        for _ in range(args.runs):
            for name, checkout in checkouts.items():
                imports[name].append(import_times(checkout))
                runs[name].append(whole_process(checkout, s3.location("bench", "plain"), config))
    print(f"{platform.node()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, runs {args.runs}")
    for name in checkouts:
        med = {p: statistics.median(t.get(p, 0.0) for t in imports[name]) for p in WATCH}
        parts = ", ".join(f"{p} {v:.1f} ms" for p, v in med.items() if v)
        wall = statistics.median(w for w, _ in runs[name])
        rss = statistics.median(r for _, r in runs[name]) / 1024
        print(f"{name}: import {parts}; snapshots s3:// {wall:.3f} s, max RSS {rss:.0f} MiB")


if __name__ == "__main__":
    main()
