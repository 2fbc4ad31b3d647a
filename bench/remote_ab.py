# Two checkouts side by side on a remote store: `kloset-blocks psql` of this checkout and of
# another (--against DIR, say a `git worktree` of an earlier commit, its .venv a link to this one's),
# run alternately on the same servers and link, so that both meet the same machine noise. For a
# change whose gain is a tenth of a second on a 2-core machine whose runs vary by as much.
#
# Setup: bench/remote.py's store (--work DIR from a `remote.py --setup-only` run), its servers and
# delaying proxy (25 ms each way, 200 Mbit/s by default; --net picks the link as remote.py's --nets
# does). Each checkout has its own on-disk cache.
# Variants: cold (the cache emptied before each run), warm (kept; filled once by a first run),
# next (the cache of one run on the first snapshot, then the second snapshot).
#
# Usage (root): .venv/bin/python bench/remote_ab.py --work DIR --against DIR2 [--backend sftp|s3]
#   [--variants cold warm next] [--runs 4] [--scale 100] [--net wan|lo|direct]
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import remote

THIS = remote.REPO


def one_run(t: remote.Target, s: remote.Setup, variant: str, code: Path, cache: Path) -> float:
    remote.REPO = code  # the checkout whose `python -m kloset_blocks` runs (and whose plugin)
    env = {**t.env, "XDG_CACHE_HOME": str(cache)}
    first = (s.ids[0], s.answers[0])
    if variant in ("cold", "next"):
        shutil.rmtree(cache, ignore_errors=True)
    if variant == "next" or (variant == "warm" and not cache.exists()):
        remote.psql(t.location, first[0], env, first[1])
    snap, want = (s.ids[1], s.answers[1]) if variant == "next" else first
    return float(remote.psql(t.location, snap, env, want)["seconds"])  # type: ignore[arg-type]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--against", type=Path, required=True)
    p.add_argument("--backend", choices=["s3", "sftp"], default="sftp")
    variants = ["cold", "warm", "next"]
    p.add_argument("--variants", nargs="+", choices=variants, default=variants)
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--scale", type=int, default=100)
    p.add_argument("--delay-ms", type=float, default=25)
    p.add_argument("--rate-mbit", type=float, default=200)
    p.add_argument("--net", choices=remote.NETS, default="wan", help="the link (remote.py's --nets)")
    a = p.parse_args()
    a.nets = [a.net]
    s = remote.reuse(a.work, a.scale)
    scratch = Path(tempfile.mkdtemp(prefix="ab-", dir=a.work))
    os.chmod(scratch, 0o711)
    env0 = {**os.environ, remote.RUN_ROOT_ENV: str(a.work / "run-root")}
    env0.pop("KLOSET_BLOCKS_STORE_CONFIG", None)
    env0.pop("PLAKAR_PASSPHRASE", None)
    makers = {"s3": remote.s3_targets, "sftp": remote.sftp_targets}
    codes = {"this": THIS, "against": a.against.resolve()}
    try:
        with makers[a.backend](s, scratch, a, env0) as targets:
            t = targets[0]
            for variant in a.variants:
                seconds: dict[str, list[float]] = {name: [] for name in codes}
                for _ in range(a.runs):
                    for name, code in codes.items():
                        seconds[name].append(one_run(t, s, variant, code, scratch / f"cache-{name}"))
                for name, runs in seconds.items():
                    print(
                        f"{t.name} {variant} {name} ({codes[name]}): median {statistics.median(runs):.3f} s,"
                        f" runs {', '.join(f'{x:.2f}' for x in runs)}",
                        flush=True,
                    )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
