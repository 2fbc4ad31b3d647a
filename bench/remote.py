# Remote stores end to end: the first answer of a point query on a PostgreSQL backup kept in S3, through
# the project's delaying proxy (a wide-area link: --delay-ms each way, --rate-mbit) and on loopback,
# side by side in one run, against `kloset-blocks restore` from the same bucket + Postgres start + the
# same query, and against the same psql on the fs store.
#
# Setup: a throwaway pgbench cluster at --scale (kloset_blocks.demo.sample), two backups (the second
# after an update of 1 % of pgbench_accounts and a checkpoint: "the next snapshot"), written into a
# local plaintext LZ4 store by the project's writer, then copied into a bucket of moto's S3 server
# (under waitress, keep-alive as S3) on loopback. The cluster is gone before any measurement.
#
# Variants, for each network (wan = through the proxy, lo = straight to the server):
# - cold: `kloset-blocks psql s3://... SNAP1 -- -c SQL` with an empty on-disk cache (XDG_CACHE_HOME
#   fresh); time from exec to the first line of psql's output (whole process).
# - warm: the same again, the on-disk cache kept.
# - next: the second snapshot, the cache kept from the runs on the first.
# - restore: `kloset-blocks restore s3://... SNAP1 DIR`, chown, the same Postgres start and query.
# and once, `fs`: the same psql on the local fs store (the loopback target's reference).
# Bytes and HTTP requests are counted by the proxy (wan only: bytes on the wire, HTTP included).
# Every answer is checked against the live server's.
#
# Usage (root): .venv/bin/python bench/remote.py [--scale 100] [--runs 1] [--work DIR [--reuse]]
#   [--json out.json]
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kloset_blocks import postgres
from kloset_blocks.demo import sample as pc
from kloset_blocks.host.progress import Progress
from kloset_blocks.host.rundir import RUN_ROOT_ENV, RunDir
from kloset_blocks.host.teardown import teardown_run_dir
from tests.remote_servers import delay_proxy, moto_server

AID = 77770
SQL = f"select abalance from pgbench_accounts where aid = {AID}"
NEXT_SQL = "update pgbench_accounts set abalance = abalance + 1 where aid % 100 = 0; checkpoint;"


def expected(next_snapshot: bool) -> str:
    base = AID % 97 if AID % 10 == 0 else 0
    return str(base + (1 if next_snapshot and AID % 100 == 0 else 0))


def build(scale: int, work: Path) -> tuple[Path, list[str], int]:
    from kloset_blocks.store import open_store
    from kloset_blocks.writer.store import add_snapshot, write_store

    cluster = pc.make_cluster(scale=scale)
    try:
        tar1 = cluster.basebackup(work / "base1.tar")
        cluster.psql(NEXT_SQL, "shop")
        tar2 = cluster.basebackup(work / "base2.tar")
    finally:
        cluster.cleanup()
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    snaps = [write_store(store, tar1, passphrase=None, hostname="kb-bench")]
    snaps.append(add_snapshot(store, tar2, hostname="kb-bench"))
    tar1.unlink()
    tar2.unlink()
    with open_store(str(store)) as st:
        logical = st.find_snapshot(snaps[0][:12]).size
    return store, snaps, logical


def reuse(store: Path) -> tuple[Path, list[str], int]:
    from kloset_blocks.store import open_store

    with open_store(str(store)) as st:
        infos = st.snapshots()  # oldest first: the backup, then the next one
        return store, [i.hex_id for i in infos], infos[0].size


def psql(location: str, snap: str, env: dict[str, str], want: str) -> dict[str, object]:
    argv = [sys.executable, "-m", "kloset_blocks", "psql", location, snap[:12], "--", "-XAtq", "-d", "shop"]
    argv += ["-c", SQL]
    t0 = time.monotonic()
    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline().strip()
    seconds = time.monotonic() - t0
    _, err = proc.communicate()
    if proc.returncode != 0 or first != want:
        raise SystemExit(
            f"psql {location}: exit {proc.returncode}, answer {first!r} (want {want}): {err.strip()}"
        )
    fetched = [line for line in err.splitlines() if line.startswith("fetched ")]
    return {"seconds": seconds, "fetched": fetched[-1] if fetched else ""}


def restore(location: str, snap: str, env: dict[str, str], work: Path, want: str) -> dict[str, object]:
    dest, runs = work / "restored", work / "runs"
    shutil.rmtree(dest, ignore_errors=True)
    t0 = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "kloset_blocks", "restore", location, snap[:12], str(dest)],
        check=True, cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True,
    )  # fmt: skip
    restored = time.monotonic() - t0
    run = None
    try:
        cluster = postgres.locate(dest)
        uid, gid = postgres.pg_ids()
        postgres.fix_ownership(cluster.datadir, uid, gid)
        postgres.prepare_datadir(cluster.datadir, Progress(quiet=True))
        run = RunDir.create(runs)
        server = postgres.Server(run, cluster, progress=Progress(quiet=True))
        server.start()
        answer = server.query(SQL, "shop")
        seconds = time.monotonic() - t0
    finally:
        if run is not None:
            teardown_run_dir(run.path)
        shutil.rmtree(dest, ignore_errors=True)
    if answer.strip() != want:
        raise SystemExit(f"restore: answer {answer!r}, want {want}")
    return {"seconds": seconds, "restore": restored}


def one_round(
    s3_loc: dict[str, str], env: dict[str, str], snaps: list[str], work: Path, proxy, variants
) -> dict:  # type: ignore[no-untyped-def]
    out: dict[str, dict[str, object]] = {}
    for net, location in s3_loc.items():
        cache = work / f"cache-{net}"
        shutil.rmtree(cache, ignore_errors=True)
        e = {**env, "XDG_CACHE_HOME": str(cache)}

        def counted(name: str, fn, net: str = net):  # type: ignore[no-untyped-def]
            before = proxy.stats() if net == "wan" else None
            r = fn()
            if before is not None:
                after = proxy.stats()
                r["bytes"] = after["bytes_down"] - before["bytes_down"]
                r["requests"] = after["http_requests"] - before["http_requests"]
            out[f"{net}-{name}"] = r
            print(f"  {net}-{name}: {json.dumps(r)}", file=sys.stderr, flush=True)

        runs = {
            "cold": lambda: psql(location, snaps[0], e, expected(False)),  # noqa: B023
            "warm": lambda: psql(location, snaps[0], e, expected(False)),  # noqa: B023
            "next": lambda: psql(location, snaps[1], e, expected(True)),  # noqa: B023
            "restore": lambda: restore(location, snaps[0], e, work, expected(False)),  # noqa: B023
        }
        for name, run in runs.items():
            if name in variants:
                counted(name, run)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--scale", type=int, default=100)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--delay-ms", type=float, default=25)
    p.add_argument("--rate-mbit", type=float, default=200)
    p.add_argument("--work", type=Path)
    p.add_argument("--json", type=Path)
    p.add_argument("--reuse", action="store_true", help="reuse the store an earlier run left in --work")
    p.add_argument("--variants", nargs="+", default=["cold", "warm", "next", "restore"])
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="kb-remote-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    run_root = work / "run-root"
    run_root.mkdir(exist_ok=True)
    os.chmod(work, 0o711)
    os.chmod(run_root, 0o711)
    t0 = time.monotonic()
    if args.reuse and (work / "store" / "CONFIG").exists():
        store, snaps, logical = reuse(work / "store")
    else:
        store, snaps, logical = build(args.scale, work)
    store_bytes = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    print(f"setup {time.monotonic() - t0:.0f} s: {logical >> 20} MiB snapshot, store {store_bytes >> 20} MiB")
    results: dict[str, object] = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cpus, {platform.release()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "scale": args.scale,
        "logical": logical,
        "store_bytes": store_bytes,
        "link": f"{args.delay_ms} ms each way, {args.rate_mbit} Mbit/s",
        "rounds": [],
    }
    with moto_server() as s3:
        t1 = time.monotonic()
        s3.put_tree(store, "bench", "pg")
        print(f"upload {time.monotonic() - t1:.0f} s", file=sys.stderr)
        with delay_proxy(s3.port, work, args.delay_ms, args.rate_mbit) as proxy:
            config = s3.config(work / "s3.conf")
            env = {**os.environ, RUN_ROOT_ENV: str(run_root), "KLOSET_BLOCKS_STORE_CONFIG": str(config)}
            env.pop("PLAKAR_PASSPHRASE", None)
            locs = {"wan": s3.location("bench", "pg", port=proxy.port), "lo": s3.location("bench", "pg")}
            for _ in range(args.runs):
                rnd = one_round(locs, env, snaps, work, proxy, args.variants)
                rnd["fs"] = psql(f"fs:{store}", snaps[0], env, expected(False))
                print(f"  fs: {json.dumps(rnd['fs'])}", file=sys.stderr, flush=True)
                results["rounds"].append(rnd)  # type: ignore[union-attr]
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
