# Remote stores end to end: the first answer of a point query on a PostgreSQL backup kept in S3 or
# on an SFTP host, through the project's delaying proxy (a wide-area link: --delay-ms each way,
# --rate-mbit) and on loopback, side by side in one run, against `kloset-blocks restore` from the
# same store + Postgres start + the same query, and against the same commands on the fs store.
#
# Setup: a throwaway pgbench cluster at --scale (kloset_blocks.demo.sample), five backups, each
# after the previous one's change (CHANGES: 1 % of pgbench_accounts updated, a different predicate
# and increment each time, then a checkpoint), each written into a local plaintext LZ4 store by the
# project's writer as soon as it is taken and its tar deleted (so the disk holds the cluster, one tar
# and the store at most: what makes --scale 1000 fit). The live server's answer to SQL is recorded
# before each backup: the oracle. The cluster is gone before any measurement. The store and its
# manifest (ids, answers, build times) stay in --work; --reuse takes them instead of building.
# The store is then copied into a bucket of moto's S3 server (under waitress, keep-alive as S3) and
# into a directory served by OpenSSH's sshd (tests/remote_servers.py), both on loopback.
#
# Targets, for each backend (--backends s3 sftp) and network: wan = through scripts/delayproxy.py
# with the link's delay and rate; lo = through a second delayproxy with no delay and no rate limit,
# only to count; direct = straight to the server (bytes uncounted; --nets chooses, default wan lo).
# Variants (--variants), each on a target:
# - cold: `kloset-blocks psql LOC SNAP1 -- -c SQL` with an empty on-disk cache (XDG_CACHE_HOME
#   fresh); time from exec to the first line of psql's output (whole process).
# - warm: the same again, the on-disk cache kept.  next: the second snapshot, the cache kept.
# - landed: `psql LOC latest`, the cache kept, but the store's last view (store/view.py) without
#   the newest snapshot's state, as if the last start had run before that backup landed: the
#   start from the view is found stale and the command starts again (the newest is answered).
#   landed-id: the same with SNAP1 named: the new state only adds, SNAP1 is served as it was.
# - query-cold / query-warm: `kloset-blocks query LOC SQL --format json` over all five snapshots,
#   with a fresh on-disk cache, then again with it kept; time of the whole process.
# - restore: `kloset-blocks restore LOC SNAP1 DIR` (a fresh cache), chown, Postgres start, SQL.
# and once a round, fs-psql and fs-query: the same commands on the local fs store (the loopback
# target's reference).
# Counted by the proxy: bytes from the server and to it, connections, HTTP request lines (S3). For
# SFTP the server counts: its sftp-server logs every request (tests/remote_servers.py), here
# SFTP requests (reads of at most 32 KiB, opens, stats) and ranges (runs of contiguous reads of
# one file, about one backend read each). Every answer is checked against the live server's, and
# the bucket and the remote directory against their state before the run.
#
# Usage (root): .venv/bin/python bench/remote.py [--scale 100] [--runs 1] [--work DIR [--reuse]]
#   [--backends s3 sftp] [--nets wan lo direct] [--variants ...] [--setup-only] [--json out.json]
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kloset_blocks import postgres
from kloset_blocks.demo import sample as pc
from kloset_blocks.host.progress import Progress
from kloset_blocks.host.rundir import RUN_ROOT_ENV, RunDir
from kloset_blocks.host.teardown import teardown_run_dir
from tests.remote_servers import DelayProxy, SshServer, delay_proxy, moto_server, sshd_server

AID = 77770
SQL = f"select abalance from pgbench_accounts where aid = {AID}"
# Between the five backups. The first is the one the earlier figures' "next snapshot" had; the
# watched row is touched by the second and the fourth only (so the answers differ across snapshots).
CHANGES = [
    "update pgbench_accounts set abalance = abalance + 1 where aid % 100 = 0",
    "update pgbench_accounts set abalance = abalance + 2 where aid % 100 = 70",
    "update pgbench_accounts set abalance = abalance + 3 where aid % 100 = 35",
    "update pgbench_accounts set abalance = abalance + 5 where (aid / 100) % 100 = 77",
]
SNAPSHOTS = len(CHANGES) + 1
NETS = ["wan", "lo", "direct"]
VARIANTS = ["cold", "warm", "next", "landed", "landed-id", "query-cold", "query-warm", "restore"]
MANIFEST = "bench.json"
# Disk per unit of pgbench scale (at scale 100: a snapshot of 16.7 MiB per unit, the five in a store
# of 7.1 MiB per unit). Building holds the cluster, one tar and the store at most; measuring adds a
# copy of the store per backend (moto spools its objects to temporary files, sshd serves a copy) and
# one restored snapshot. A run refuses to start without MARGIN to spare beyond that.
SNAPSHOT_PER_SCALE = 17 << 20
STORE_PER_SCALE = 7 << 20
MARGIN = 15 << 30


@dataclass
class Setup:
    store: Path
    scale: int
    ids: list[str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)  # the live server's, before each backup
    sizes: list[int] = field(default_factory=list)  # logical bytes of each snapshot
    times: dict[str, float] = field(default_factory=dict)  # build steps, seconds


def build(scale: int, work: Path) -> Setup:
    from kloset_blocks.store import open_store
    from kloset_blocks.writer.store import add_snapshot, write_store

    s = Setup(work / "store", scale)
    shutil.rmtree(s.store, ignore_errors=True)
    (work / MANIFEST).unlink(missing_ok=True)
    times = dict.fromkeys(("cluster", "changes", "basebackup", "write"), 0.0)
    t = time.monotonic()
    cluster = pc.make_cluster(scale=scale)
    times["cluster"] = time.monotonic() - t
    try:
        for i in range(SNAPSHOTS):
            t = time.monotonic()
            if i:
                cluster.psql(CHANGES[i - 1] + "; checkpoint;", "shop")
            s.answers.append(cluster.psql(SQL, "shop"))
            times["changes"] += time.monotonic() - t
            t = time.monotonic()
            tar = cluster.basebackup(work / "base.tar")
            times["basebackup"] += time.monotonic() - t
            t = time.monotonic()
            write = write_store if i == 0 else add_snapshot
            s.ids.append(write(s.store, tar, hostname="kb-bench"))
            tar.unlink()
            times["write"] += time.monotonic() - t
            time.sleep(max(0.0, 1.05 - (time.monotonic() - t)))  # distinct snapshot times (1 s)
            print(f"  snapshot {i + 1}: {s.ids[-1][:12]}, answer {s.answers[-1]}", file=sys.stderr)
    finally:
        cluster.cleanup()
    s.times = {k: round(v, 1) for k, v in times.items()}
    with open_store(str(s.store)) as st:
        s.sizes = [st.find_snapshot(i[:12]).size for i in s.ids]
    doc = {"scale": scale, "ids": s.ids, "answers": s.answers, "sizes": s.sizes, "build_seconds": s.times}
    (work / (MANIFEST + ".tmp")).write_text(json.dumps(doc, indent=1))
    os.replace(work / (MANIFEST + ".tmp"), work / MANIFEST)  # last: a half-built store is never reused
    return s


def reuse(work: Path, scale: int) -> Setup:
    doc = json.loads((work / MANIFEST).read_text())
    if doc["scale"] != scale:
        raise SystemExit(f"remote.py: the store in {work} is of scale {doc['scale']}, not {scale}")
    return Setup(work / "store", scale, doc["ids"], doc["answers"], doc["sizes"], doc["build_seconds"])


def check_disk(work: Path, need: int, what: str) -> None:
    free = shutil.disk_usage(work).free
    if free < need + MARGIN:
        raise SystemExit(
            f"remote.py: {what} needs about {need >> 30} GiB and {MARGIN >> 30} GiB to spare; "
            f"{work} has {free >> 30} GiB free"
        )


def cli(*argv: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "kloset_blocks", *argv],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def psql(location: str, snap: str, env: dict[str, str], want: str) -> dict[str, object]:
    t0 = time.monotonic()
    proc = cli("psql", location, snap[:12], "--", "-XAtq", "-d", "shop", "-c", SQL, env=env)
    assert proc.stdout is not None
    first = proc.stdout.readline().strip()
    seconds = time.monotonic() - t0
    _, err = proc.communicate()
    if proc.returncode != 0 or first != want:
        raise SystemExit(f"psql {location}: exit {proc.returncode}, {first!r} (want {want}): {err.strip()}")
    fetched = [line for line in err.splitlines() if line.startswith("fetched ")]
    return {"seconds": round(seconds, 3), "fetched": fetched[-1] if fetched else ""}


def landed(location: str, s: Setup, env: dict[str, str], snap: str, want: str) -> dict[str, object]:
    """psql on `snap` after the newest backup's state is taken out of the last view kept."""
    from kloset_blocks.store.location import parse_location
    from kloset_blocks.store.view import make_view, parse_view, view_path

    display = parse_location(location).display
    path = view_path(str(Path(env["XDG_CACHE_HOME"]) / "kloset-blocks"), display)
    seen = parse_view(path.read_text(), display)
    assert seen is not None, f"no last view at {path}"
    raw, listed = seen
    path.write_text(make_view(display, raw, [(i, k) for i, k in listed if i.hex() != s.ids[-1]]))
    return psql(location, snap, env, want)


def query(location: str, s: Setup, env: dict[str, str]) -> dict[str, object]:
    t0 = time.monotonic()
    proc = cli("query", location, SQL, "--db", "shop", "--format", "json", "-q", env=env)
    out, err = proc.communicate()
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"query {location}: exit {proc.returncode}: {err.strip()}")
    doc = json.loads(out)
    got = {x["id"]: x["rows"] for x in doc["snapshots"]}
    want = {ident: [[answer]] for ident, answer in zip(s.ids, s.answers, strict=True)}
    if got != want:
        raise SystemExit(f"query {location}: answers {got}, want {want}")
    return {"seconds": round(seconds, 3), "fetched_bytes": doc["summary"]["fetched_bytes"]}


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
        run = RunDir.create(runs)
        server = postgres.start_server(run, dest, progress=Progress(quiet=True))  # as psql's start
        answer = server.query(SQL, "shop")
        seconds = time.monotonic() - t0
    finally:
        if run is not None:
            teardown_run_dir(run.path)
        shutil.rmtree(dest, ignore_errors=True)
    if answer.strip() != want:
        raise SystemExit(f"restore: answer {answer!r}, want {want}")
    return {"seconds": round(seconds, 3), "restore": round(restored, 3)}


@dataclass
class Target:
    """One backend seen over one network, with what counts its traffic."""

    name: str  # e.g. s3-wan
    location: str
    env: dict[str, str]
    proxy: DelayProxy | None
    ssh: SshServer | None = None

    def counters(self) -> dict[str, int]:
        c: dict[str, int] = {}
        if self.proxy is not None:
            st = self.proxy.stats()
            c = {"bytes": st["bytes_down"], "bytes_up": st["bytes_up"], "connections": st["connections"]}
            if self.ssh is None:
                c["requests"] = st["http_requests"]
        if self.ssh is not None:
            c.update({f"sftp_{k}": v for k, v in self.ssh.sftp_requests().items()})
        return c


def measured(t: Target, name: str, fn: Callable[[], dict[str, object]], out: dict) -> None:  # type: ignore[type-arg]
    before = t.counters()
    r = fn()
    after = t.counters()
    r.update({k: after[k] - before[k] for k in after})
    out[f"{t.name}-{name}"] = r
    print(f"  {t.name}-{name}: {json.dumps(r)}", file=sys.stderr, flush=True)


def one_round(targets: list[Target], s: Setup, work: Path, variants: list[str]) -> dict[str, dict]:  # type: ignore[type-arg]
    out: dict[str, dict[str, object]] = {}
    want0, want1 = s.answers[0], s.answers[1]
    for t in targets:
        caches = {k: work / f"cache-{t.name}-{k}" for k in ("psql", "query", "restore")}
        for c in caches.values():
            shutil.rmtree(c, ignore_errors=True)
        env = {k: {**t.env, "XDG_CACHE_HOME": str(c)} for k, c in caches.items()}
        loc = t.location
        runs: dict[str, Callable[[], dict[str, object]]] = {
            "cold": lambda: psql(loc, s.ids[0], env["psql"], want0),  # noqa: B023
            "warm": lambda: psql(loc, s.ids[0], env["psql"], want0),  # noqa: B023
            "next": lambda: psql(loc, s.ids[1], env["psql"], want1),  # noqa: B023
            "landed": lambda: landed(loc, s, env["psql"], "latest", s.answers[-1]),  # noqa: B023
            "landed-id": lambda: landed(loc, s, env["psql"], s.ids[0], want0),  # noqa: B023
            "query-cold": lambda: query(loc, s, env["query"]),  # noqa: B023
            "query-warm": lambda: query(loc, s, env["query"]),  # noqa: B023
            "restore": lambda: restore(loc, s.ids[0], env["restore"], work, want0),  # noqa: B023
        }
        for name in VARIANTS:
            if name in variants:
                measured(t, name, runs[name], out)
    return out


def fs_round(s: Setup, env: dict[str, str], variants: list[str]) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    if {"cold", "warm", "next"} & set(variants):
        out["fs-psql"] = psql(f"fs:{s.store}", s.ids[0], env, s.answers[0])
    if {"query-cold", "query-warm"} & set(variants):
        out["fs-query"] = query(f"fs:{s.store}", s, env)
    for k, v in out.items():
        print(f"  {k}: {json.dumps(v)}", file=sys.stderr, flush=True)
    return out


def tree_state(root: Path) -> list[tuple[str, int, int]]:
    return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


def networks(
    stack: contextlib.ExitStack, port: int, work: Path, a: argparse.Namespace
) -> list[tuple[str, DelayProxy | None, int]]:
    """(name, proxy, port to connect to) for each of --nets, the proxies started on `stack`."""
    out: list[tuple[str, DelayProxy | None, int]] = []
    for net in a.nets:
        if net == "direct":
            out.append((net, None, port))
            continue
        delay, rate = (a.delay_ms, a.rate_mbit) if net == "wan" else (0.0, 0.0)
        proxy = stack.enter_context(delay_proxy(port, work, delay, rate))
        out.append((net, proxy, proxy.port))
    return out


@contextlib.contextmanager
def s3_targets(s: Setup, work: Path, a: argparse.Namespace, env0: dict[str, str]) -> Iterator[list[Target]]:
    with moto_server() as s3, contextlib.ExitStack() as stack:
        t = time.monotonic()
        s3.put_tree(s.store, "bench", "pg")
        print(f"s3 upload {time.monotonic() - t:.0f} s", file=sys.stderr, flush=True)
        before = s3.listing("bench")
        env = {**env0, "KLOSET_BLOCKS_STORE_CONFIG": str(s3.config(work / "s3.conf"))}
        yield [
            Target(f"s3-{net}", s3.location("bench", "pg", port=port), env, proxy)
            for net, proxy, port in networks(stack, s3.port, work, a)
        ]
        if s3.listing("bench") != before:
            raise SystemExit("remote.py: the bucket changed during the run")


@contextlib.contextmanager
def sftp_targets(s: Setup, work: Path, a: argparse.Namespace, env0: dict[str, str]) -> Iterator[list[Target]]:
    base = Path(tempfile.mkdtemp(prefix="sftp-", dir=work))
    try:
        remote = base / "remote" / "store"
        t = time.monotonic()
        shutil.copytree(s.store, remote)
        print(f"sftp copy {time.monotonic() - t:.0f} s", file=sys.stderr, flush=True)
        before = tree_state(remote)
        with sshd_server(base, count_requests=True) as ssh, contextlib.ExitStack() as stack:
            targets = []
            for net, proxy, port in networks(stack, ssh.port, work, a):
                known = ssh.known_hosts_for(port) if proxy else ssh.known_hosts
                config = ssh.config(base / f"sftp-{net}.conf", known_hosts=str(known))
                env = {**env0, "KLOSET_BLOCKS_STORE_CONFIG": str(config)}
                targets.append(Target(f"sftp-{net}", ssh.location(remote, port=port), env, proxy, ssh))
            yield targets
        if tree_state(remote) != before:
            raise SystemExit("remote.py: the remote directory changed during the run")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def table(results: dict[str, object]) -> str:
    """The rounds side by side: one line per target and variant (seconds of each round, counters
    of the first)."""
    rounds: list[dict[str, dict[str, object]]] = results["rounds"]  # type: ignore[assignment]
    lines = ["| run | seconds | bytes down | requests (S3) / SFTP requests, ranges |", "|---|---|---|---|"]
    for key, first in rounds[0].items():
        secs = ", ".join(f"{r[key]['seconds']:.2f}" for r in rounds if key in r)
        mib = f"{first['bytes'] / (1 << 20):.2f} MiB" if "bytes" in first else ""
        if "sftp_requests" in first:
            req = f"{first['sftp_requests']}, {first['sftp_ranges']}"
        else:
            req = str(first.get("requests", ""))
        lines.append(f"| {key} | {secs} | {mib} | {req} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--scale", type=int, default=100)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--delay-ms", type=float, default=25)
    p.add_argument("--rate-mbit", type=float, default=200)
    p.add_argument("--work", type=Path)
    p.add_argument("--json", type=Path)
    p.add_argument("--reuse", action="store_true", help="reuse the store an earlier run built in --work")
    p.add_argument("--setup-only", action="store_true", help="build (or check) the store, measure nothing")
    p.add_argument("--backends", nargs="+", choices=["s3", "sftp"], default=["s3", "sftp"])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    p.add_argument(
        "--nets",
        nargs="+",
        choices=NETS,
        default=["wan", "lo"],
        help="wan: the delayed link; lo: a proxy with no delay, to count; direct: straight to the server",
    )
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="kb-remote-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    run_root = work / "run-root"
    run_root.mkdir(exist_ok=True)
    os.chmod(work, 0o711)
    os.chmod(run_root, 0o711)
    t0 = time.monotonic()
    if args.reuse and (work / MANIFEST).exists():
        s = reuse(work, args.scale)
    else:
        check_disk(work, args.scale * (2 * SNAPSHOT_PER_SCALE + STORE_PER_SCALE), "building the store")
        s = build(args.scale, work)
    store_bytes = sum(f.stat().st_size for f in s.store.rglob("*") if f.is_file())
    print(
        f"setup {time.monotonic() - t0:.0f} s (build {s.times}): {s.sizes[0] >> 20} MiB snapshot, "
        f"store {store_bytes >> 20} MiB, answers {s.answers}",
        file=sys.stderr,
        flush=True,
    )
    if args.setup_only:
        return 0
    restored = args.scale * SNAPSHOT_PER_SCALE if "restore" in args.variants else 0
    check_disk(work, len(args.backends) * store_bytes + restored, "measuring")
    results: dict[str, object] = {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cpus, {platform.release()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load": os.getloadavg()[0],
        "scale": args.scale,
        "logical": s.sizes[0],
        "store_bytes": store_bytes,
        "build_seconds": s.times,
        "link": f"{args.delay_ms} ms each way, {args.rate_mbit} Mbit/s",
        "nets": args.nets,
        "rounds": [],
    }
    env = {**os.environ, RUN_ROOT_ENV: str(run_root)}
    env.pop("PLAKAR_PASSPHRASE", None)
    env.pop("KLOSET_BLOCKS_STORE_CONFIG", None)
    makers = {"s3": s3_targets, "sftp": sftp_targets}
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=work))  # caches, copies, proxies' counters
    os.chmod(scratch, 0o711)  # the restored data directory in it is Postgres'
    try:
        with contextlib.ExitStack() as stack:
            targets: list[Target] = []
            for backend in args.backends:
                targets += stack.enter_context(makers[backend](s, scratch, args, env))
            for _ in range(args.runs):
                rnd = one_round(targets, s, scratch, args.variants)
                rnd.update(fs_round(s, {**env, "XDG_CACHE_HOME": str(scratch / "cache-fs")}, args.variants))
                results["rounds"].append(rnd)  # type: ignore[union-attr]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    text = json.dumps(results, indent=1)
    print(text)
    print(table(results), file=sys.stderr)
    if args.json:
        args.json.write_text(text)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
