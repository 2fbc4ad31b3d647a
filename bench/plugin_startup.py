# Interleaved A/B timing of whole commands (nbdkit plugin startup: `nbdkit -U - ... --run true`):
# every round runs each variant once, in the same order, so load from other work on the machine
# hits all variants alike. Prints the median wall time and the median CPU time (user+sys of the
# child, less sensitive to load than wall time).
#
#   bench/plugin_startup.py 12 "file=nbdkit -U - file /tmp/f.img --run true" \
#       "ours=nbdkit -U - python nbdplugin/kloset.py store=STORE snapshot=ID --run true"
from __future__ import annotations

import resource
import statistics
import subprocess
import sys
import time


def run_once(cmd: list[str]) -> tuple[float, float]:
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)}: exit status {p.returncode}")
    return wall, r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime


def main(argv: list[str]) -> None:
    rounds = int(argv[0])
    variants = {name: cmd.split() for name, cmd in (spec.split("=", 1) for spec in argv[1:])}
    walls: dict[str, list[float]] = {name: [] for name in variants}
    cpus: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, cmd in variants.items():
            wall, cpu = run_once(cmd)
            walls[name].append(wall)
            cpus[name].append(cpu)
    for name in variants:
        w, c = walls[name], cpus[name]
        print(
            f"{name:10s} wall median {statistics.median(w):.3f} (min {min(w):.3f} max {max(w):.3f})"
            f"  cpu median {statistics.median(c):.3f} (min {min(c):.3f})"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
