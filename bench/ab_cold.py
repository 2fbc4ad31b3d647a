#!/usr/bin/env python3
# Interleaved A/B of the plugin's cold sequential read: for each round, each configuration gets a
# fresh nbdkit (empty chunk cache) and one `nbdcopy --request-size=256K URI null:`; prints the
# median and every round. A configuration is "label|ENV=v ...|nbdkit options|plugin args", and
# ENV may hold REPO=DIR to serve with another checkout's plugin (a `git worktree` of an older
# commit, say), which is how the before/after rows of bench/RESULTS.md ("Cold read at target")
# were measured. Uses bench_plugin.py's data set (run that once first).
#
#   .venv/bin/python bench/ab_cold.py 5 'head|||' 'base|REPO=/tmp/base||' 't16|||' 't2||--threads=2|'
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORK = Path("/tmp/kloset-bench")
SOCK = WORK / "ab.sock"


def cold_copy(repo: str, env: dict[str, str], opts: list[str], plugin_args: list[str]) -> float:
    stores = json.loads((WORK / "stores-160-160.json").read_text())
    store, snap = stores["plain-lz4"]
    uri = f"nbd+unix:///?socket={SOCK}"
    SOCK.unlink(missing_ok=True)
    args = [f"store={store}", f"snapshot={snap}", "cache=2G", *plugin_args]
    proc = subprocess.Popen(
        ["nbdkit", "-f", "-U", str(SOCK), *opts, "python", f"{repo}/nbdplugin/kloset.py", *args], env=env
    )
    try:
        while subprocess.run(["nbdinfo", "--size", uri], capture_output=True).returncode:
            if proc.poll() is not None:
                sys.exit(f"nbdkit exited with {proc.returncode}")
            time.sleep(0.02)
        t = time.perf_counter()
        subprocess.run(["nbdcopy", "--request-size=262144", uri, "null:"], check=True)
        return time.perf_counter() - t
    finally:
        proc.terminate()
        proc.wait()


def main(argv: list[str]) -> None:
    rounds = int(argv[0])
    configs = [spec.split("|") for spec in argv[1:]]
    times: dict[str, list[float]] = {c[0]: [] for c in configs}
    for _ in range(rounds):
        for label, env_spec, opts, plugin_args in configs:
            env = dict(os.environ, **dict(kv.split("=", 1) for kv in env_spec.split()))
            repo = env.pop("REPO", str(REPO))
            times[label].append(cold_copy(repo, env, opts.split(), plugin_args.split()))
    for label, values in times.items():
        rounds_s = " ".join(f"{x:.2f}" for x in values)
        print(f"{label:20s} median {statistics.median(values):.3f} s   {rounds_s}")


if __name__ == "__main__":
    main(sys.argv[1:])
