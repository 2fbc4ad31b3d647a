# Time to first query on the attach chain with a stand-in backing (the ceiling of references §3.4):
# a real cluster at pgbench scale S, pg_basebackup tar -X fetch, an ext4 image by mke2fs -d, served by
# nbdkit's C file plugin with the stats filter (bytes read from the backing), then N cold runs of
# `pg_session` + one query, and N restarts on a kept overlay (no recovery).
#
# Usage: .venv/bin/python bench/e2e.py [--scale 1] [--runs 5]   (root; about 10 s at scale 1)
from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from kloset_blocks import sample as pc
from kloset_blocks.commands.run import pg_session

QUERY = ("shop", "select abalance from pgbench_accounts where aid = 77770")  # a point query


def one_run(image: Path, stats: Path, overlay: Path | None) -> tuple[float, float, dict[str, float]]:
    argv = ["nbdkit", "--filter=stats", "file", f"file={image}", f"statsfile={stats}"]
    t0 = time.monotonic()
    chain, server = pg_session((argv, {}), overlay=overlay)
    try:
        server.query(QUERY[1], QUERY[0])
        ttfq = time.monotonic() - t0
        phases = dict(chain.progress.times) | dict(server.progress.times)
    finally:
        chain.teardown()
    text = stats.read_text() if stats.exists() else ""
    m = re.search(r"read: \d+ ops, [\d.]+ s, ([\d.]+) (\w+)", text)
    unit = {"bytes": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    read_mib = float(m.group(1)) * unit.get(m.group(2), 1) / (1 << 20) if m else float("nan")
    return ttfq, read_mib, phases


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kb-bench-"))
    try:
        cluster = pc.make_cluster(scale=args.scale)
        try:
            tar = cluster.basebackup(work / "b.tar")
        finally:
            cluster.cleanup()
        src = pc.extract_for_image(tar, work / "x")
        image = pc.make_ext4_image(src, work / "b.img")
        shutil.rmtree(src)
        size_mib = image.stat().st_blocks * 512 / (1 << 20)
        print(f"scale {args.scale}: image {image.stat().st_size >> 20} MiB ({size_mib:.0f} MiB allocated)")
        for label, overlay in (("cold (recovery)", None), ("kept overlay (restart)", work / "ov.qcow2")):
            if overlay is not None:
                one_run(image, work / "stats", overlay)  # first start: recovery, then clean stop
            times, reads = [], []
            for _ in range(args.runs):
                ttfq, read, phases = one_run(image, work / "stats", overlay)
                times.append(ttfq)
                reads.append(read)
            print(
                f"{label:24} first query {min(times):.2f}-{max(times):.2f} s "
                f"(median {statistics.median(times):.2f}); read from backing "
                f"{min(reads):.2f}-{max(reads):.2f} MiB; phases: "
                + " ".join(f"{k} {v:.2f}" for k, v in phases.items())
            )
            if overlay is not None:
                print(f"{'':24} overlay size {overlay.stat().st_blocks * 512 / (1 << 20):.1f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
