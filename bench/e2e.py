# THE end-to-end benchmark: time to the first answer of a point query on a PostgreSQL backup, and the
# bytes each way costs, for three ways of getting there, side by side on the same snapshots:
#
# - ours: `app.check.prepare` (open the store, check the snapshot) + nbdkit with the real plugin (fresh
#   process each run, so an empty chunk cache) + qcow2 overlay + attach + mount + Postgres recovery +
#   the query, i.e. what `kloset-blocks psql` does (`pg_session`, in-process); bytes read from the
#   store's packfiles come from the plugin's `stats=` counters; overlay size after the query.
# - ours-ra0: the same as ours with the plugin's sequential readahead off (readahead=0).
# - ours-cli: the real `kloset-blocks psql STORE SNAP -- -c SQL` in a child process, from its exec to
#   the first line of psql's output (adds the interpreter start and imports).
# - ceiling (references §3.4): the same chain over a plain ext4 image of the same backup (mke2fs -d),
#   served by nbdkit's C `file` plugin with the `stats` filter (bytes read from the backing).
# - ours-kept / ceiling-kept (on request, --variants): a restart on an overlay kept from the first
#   (warm-up) start, so no recovery.
# - restore: `kloset-blocks restore` of the snapshot into a fresh directory, chown to postgres, the
#   same Postgres start (recovery) and query; bytes written = allocated size of the directory after.
#
# For each pgbench scale: a throwaway cluster (kloset_blocks.demo.sample), `pg_basebackup -F tar -X fetch`,
# written into a plaintext LZ4 store by the project's writer and into the ext4 stand-in image; the
# cluster is gone before any measurement. Then N rounds; each round runs every variant once, first
# with the OS page cache dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before each run, then
# warm, interleaved (the order rotated each round) so that machine noise hits all variants alike.
# Every answer is checked against the live server's value (the setup sets abalance = aid % 97 on
# every tenth row).
#
# Usage (root): .venv/bin/python bench/e2e.py [--scales 1 20 100] [--runs 5] [--json out.json]
#   [--work DIR [--reuse]] [--variants ...] [--plugin-arg key=value]; --report out.json re-prints tables.
# Setup ~30 s at scale 1 and 20, ~3 min at scale 100 (pgbench -i, basebackup, store write, image);
# then ~25 s a round at scale 100 (the restore dominates), ~10 s at the smaller scales. Work files
# (~4 GB at scale 100) under --work, kept for --reuse; default: a temporary directory, removed.
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kloset_blocks import postgres
from kloset_blocks.app.check import prepare
from kloset_blocks.app.sessions import pg_session
from kloset_blocks.app.teardown import teardown_run_dir
from kloset_blocks.demo import sample as pc
from kloset_blocks.host.backing import NbdkitBacking
from kloset_blocks.host.progress import Progress
from kloset_blocks.host.rundir import RunDir

MiB = 1 << 20
REPO = Path(__file__).resolve().parent.parent
VARIANTS = ("ours", "ours-cli", "ours-ra0", "ceiling", "restore")
MORE_VARIANTS = ("ours-kept", "ceiling-kept")
PLUGIN_ARGS: list[str] = []  # extra key=value for the plugin in `ours` (--plugin-arg), for profiling


@dataclass
class Backup:
    scale: int
    store: Path
    snap: str
    logical: int  # Store.snapshots() size: the snapshot's bytes
    store_bytes: int  # on disk
    image: Path
    aid: int

    @property
    def sql(self) -> str:
        return f"select abalance from pgbench_accounts where aid = {self.aid}"

    @property
    def expected(self) -> str:
        return str(self.aid % 97 if self.aid % 10 == 0 else 0)


@dataclass
class Sample:
    seconds: float
    bytes: int  # read from the store/backing (ours, ceiling) or written (restore)
    overlay: int = 0  # allocated bytes of the qcow2 overlay right after the query
    overlay_end: int = 0  # ... after Postgres' shutdown checkpoint and teardown
    phases: dict[str, float] = field(default_factory=dict)
    extra: dict[str, int] = field(default_factory=dict)


def allocated(path: Path) -> int:
    if path.is_file():
        return path.stat().st_blocks * 512
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(d, f)).st_blocks * 512
    return total


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def check(answer: str, b: Backup, what: str) -> None:
    if answer.strip() != b.expected:
        raise SystemExit(f"{what}: wrong answer {answer!r} (live server: {b.expected})")


# --- setup ----------------------------------------------------------------------------------------


def build(scale: int, work: Path) -> Backup:
    from kloset_blocks.store import open_store
    from kloset_blocks.writer.store import write_store

    t0 = time.monotonic()
    cluster = pc.make_cluster(scale=scale)
    try:
        tar = cluster.basebackup(work / "base.tar")
    finally:
        cluster.cleanup()
    t1 = time.monotonic()
    store = work / "store"
    snap = write_store(store, tar, passphrase=None, hostname="kloset-blocks-bench")
    t2 = time.monotonic()
    src = pc.extract_for_image(tar, work / "x")
    image = pc.make_ext4_image(src, work / "base.img")
    shutil.rmtree(src)
    tar.unlink()
    with open_store(str(store)) as st:
        logical = next(i.size for i in st.snapshots() if i.hex_id == snap)
    aid = (scale * 100000 * 7 // 9) // 10 * 10  # a row the setup updated, in the last third
    print(
        f"scale {scale}: cluster+basebackup {t1 - t0:.0f} s, store write {t2 - t1:.0f} s, image "
        f"{time.monotonic() - t2:.0f} s; snapshot {snap[:8]} {logical / MiB:.0f} MiB, store "
        f"{allocated(store) / MiB:.0f} MiB, image {image.stat().st_size / MiB:.0f} MiB "
        f"({allocated(image) / MiB:.0f} MiB allocated)",
        flush=True,
    )
    return Backup(scale, store, snap, logical, allocated(store), image, aid)


# --- the variants ---------------------------------------------------------------------------------


def overlay_for(work: Path, kept: str | None) -> Path:
    """A fresh overlay, or (kept) the one the first start left: later starts need no recovery."""
    if kept is None:
        ov = work / "ov.qcow2"
        ov.unlink(missing_ok=True)
        return ov
    return work / f"ov-kept-{kept}.qcow2"


def run_ours(b: Backup, work: Path, extra: tuple[str, ...] = (), kept: bool = False) -> Sample:
    stats, ov = work / "plugin-stats.json", overlay_for(work, "ours" if kept else None)
    stats.unlink(missing_ok=True)
    progress = Progress(quiet=True)
    t0 = time.monotonic()
    served = prepare(f"fs:{b.store}", b.snap, pgdata=True, owner=postgres.PG_USER, progress=progress)
    argv = (
        [f"stats={stats}" if a.startswith("stats=") else a for a in served.backing.argv]
        + PLUGIN_ARGS
        + list(extra)
    )
    chain, server = pg_session(NbdkitBacking(argv, served.backing.env), overlay=ov, progress=progress)
    try:
        answer = server.query(b.sql, "shop")
        seconds = time.monotonic() - t0
        overlay = allocated(ov)
        keep_log(server.log, work / "last-ours-postgres.log")
    finally:
        chain.teardown()
    check(answer, b, "ours")
    counters = json.loads(stats.read_text())
    return Sample(
        seconds, int(counters["store_bytes_read"]), overlay, allocated(ov), dict(progress.times), counters
    )


def run_cli(b: Backup, work: Path) -> Sample:
    argv = [sys.executable, "-m", "kloset_blocks", "psql", f"fs:{b.store}", b.snap[:12], "--"]
    argv += ["-XAtq", "-d", "shop", "-c", b.sql]
    t0 = time.monotonic()
    proc = subprocess.Popen(
        argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    seconds = time.monotonic() - t0
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"kloset-blocks psql exited {proc.returncode}: {err.strip()}")
    check(first, b, "ours-cli")
    phases = {m[0]: float(m[1]) for m in re.findall(r"^(\w[\w ]*?) ([\d.]+) s$", err, re.M)}
    return Sample(seconds, 0, phases=phases)


def run_ceiling(b: Backup, work: Path, kept: bool = False) -> Sample:
    stats, ov = work / "filter-stats.txt", overlay_for(work, "ceiling" if kept else None)
    stats.unlink(missing_ok=True)
    argv = ["nbdkit", "--filter=stats", "file", f"file={b.image}", f"statsfile={stats}"]
    progress = Progress(quiet=True)
    t0 = time.monotonic()
    chain, server = pg_session(NbdkitBacking(argv), overlay=ov, progress=progress)
    try:
        answer = server.query(b.sql, "shop")
        seconds = time.monotonic() - t0
        overlay = allocated(ov)
    finally:
        chain.teardown()
    check(answer, b, "ceiling")
    return Sample(seconds, filter_read_bytes(stats), overlay, allocated(ov), dict(progress.times))


def filter_read_bytes(stats: Path) -> int:
    text = stats.read_text() if stats.exists() else ""
    m = re.search(r"read: \d+ ops, [\d.]+ s, ([\d.]+) (\w+)", text)
    unit = {"bytes": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    return int(float(m.group(1)) * unit.get(m.group(2), 1)) if m else -1


def run_restore(b: Backup, work: Path) -> Sample:
    dest, runs = work / "restored", work / "runs"
    shutil.rmtree(dest, ignore_errors=True)
    phases: dict[str, float] = {}
    t0 = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "kloset_blocks", "restore", f"fs:{b.store}", b.snap[:12], str(dest)],
        check=True, cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True,
    )  # fmt: skip
    phases["restore"] = time.monotonic() - t0
    run = None
    try:
        t1 = time.monotonic()
        cluster = postgres.locate(dest)
        uid, gid = postgres.pg_ids()
        postgres.fix_ownership(cluster.datadir, uid, gid)  # chown -R postgres, data directory 0700
        postgres.prepare_datadir(cluster.datadir, Progress(quiet=True))
        phases["chown"] = time.monotonic() - t1
        run = RunDir.create(runs)
        server = postgres.Server(run, cluster, progress=Progress(quiet=True))
        t2 = time.monotonic()
        server.start()
        phases["start"] = time.monotonic() - t2
        answer = server.query(b.sql, "shop")
        seconds = time.monotonic() - t0
        written = allocated(dest)
    finally:
        if run is not None:
            teardown_run_dir(run.path)
        shutil.rmtree(dest, ignore_errors=True)
    check(answer, b, "restore")
    return Sample(seconds, written, phases=phases)


def keep_log(src: Path, dest: Path) -> None:
    with contextlib.suppress(OSError):
        shutil.copyfile(src, dest)


RUNNERS: dict[str, Callable[[Backup, Path], Sample]] = {
    "ours": run_ours,
    "ours-cli": run_cli,
    # the plugin's sequential readahead off: what the prefetch costs and buys on this workload
    "ours-ra0": lambda b, work: run_ours(b, work, ("readahead=0",)),
    # restart on a kept overlay (no recovery; the warm-up run made it): not in the default set
    "ours-kept": lambda b, work: run_ours(b, work, kept=True),
    "ceiling-kept": lambda b, work: run_ceiling(b, work, kept=True),
    "ceiling": run_ceiling,
    "restore": run_restore,
}


# --- driver and report ----------------------------------------------------------------------------


def rounds(b: Backup, work: Path, runs: int, variants: list[str]) -> dict[str, dict[str, list[Sample]]]:
    # table order = the given order
    results: dict[str, dict[str, list[Sample]]] = {c: {v: [] for v in variants} for c in ("dropped", "warm")}
    for v in variants:  # warm-up (not kept): binaries, Python modules, first-run effects
        RUNNERS[v](b, work)
    for r in range(runs):
        for cache in ("dropped", "warm"):
            k = r % len(variants)
            for v in variants[k:] + variants[:k]:
                if cache == "dropped":
                    drop_caches()
                s = RUNNERS[v](b, work)
                results[cache][v].append(s)
                print(
                    f"  round {r + 1} {cache:7} {v:8} {s.seconds:6.2f} s  {s.bytes / MiB:9.2f} MiB",
                    flush=True,
                )
    return results


def spread(xs: list[float], fmt: str = "{:.2f}") -> str:
    lo, hi = fmt.format(min(xs)), fmt.format(max(xs))
    return f"{fmt.format(statistics.median(xs))} ({lo}-{hi})"


def med(ss: list[Sample], attr: str) -> float:
    return statistics.median(getattr(s, attr) for s in ss)


HEADER = (
    "| page cache | variant | first answer, s: median (min-max) | / ceiling | restore / this "
    "| read from store or backing, MiB | of snapshot | of store on disk | overlay after query (at end), MiB |"
)


def row(b: Backup, cache: str, v: str, by: dict[str, list[Sample]]) -> str:
    ss = by[v]
    t = med(ss, "seconds")
    vs_ceiling = f"{t / med(by['ceiling'], 'seconds'):.2f}x" if "ceiling" in by else ""
    vs_restore = f"{med(by['restore'], 'seconds') / t:.1f}x" if "restore" in by and v != "restore" else ""
    mib = [s.bytes / MiB for s in ss]
    if v == "restore":
        byts, share, share_store = (
            f"written {spread(mib, '{:.0f}')}",
            f"{100 * med(ss, 'bytes') / b.logical:.0f} %",
            "",
        )
    elif v == "ours-cli":  # the same server as `ours`
        byts, share, share_store = "(as ours)", "", ""
    else:
        byts, share = spread(mib), f"{100 * med(ss, 'bytes') / b.logical:.2f} %"
        share_store = f"{100 * med(ss, 'bytes') / b.store_bytes:.1f} %" if v.startswith("ours") else ""
    ov = ""
    if v not in ("ours-cli", "restore"):
        ov = f"{spread([s.overlay / MiB for s in ss], '{:.1f}')} ({med(ss, 'overlay_end') / MiB:.1f})"
    cells = [cache, v, spread([s.seconds for s in ss]), vs_ceiling, vs_restore, byts, share, share_store, ov]
    return "| " + " | ".join(cells) + " |"


COUNTERS = ("store_bytes_read", "store_preads", "misses", "hits", "prefetched", "bytes_decoded")


def report(b: Backup, res: dict[str, dict[str, list[Sample]]]) -> str:
    lines = [
        f"### pgbench scale {b.scale}: snapshot {b.logical / MiB:.0f} MiB "
        f"(store {b.store_bytes / MiB:.0f} MiB on disk), `{b.sql}`",
        "",
        HEADER,
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [row(b, cache, v, by) for cache, by in res.items() for v in by]
    lines.append("")
    for cache, by in res.items():
        for v, ss in by.items():
            ph = ", ".join(
                f"{k} {statistics.median(s.phases.get(k, 0.0) for s in ss):.2f}" for k in ss[-1].phases
            )
            lines.append(f"- phases ({cache}, {v}; medians, s): {ph}")
    for cache, by in res.items():
        for v in ("ours", "ours-ra0", "ours-kept"):
            if v in by:
                c = by[v][-1].extra
                shown = ", ".join(f"{k} {c[k]}" for k in COUNTERS if k in c)
                lines.append(f"- plugin counters (last {cache} run of {v}): {shown}")
    return "\n".join(lines) + "\n"


def summary(all_res: list[tuple[Backup, dict[str, dict[str, list[Sample]]]]]) -> str:
    """The headline tables across scales: times side by side, then bytes."""
    names = [v for v in VARIANTS + MORE_VARIANTS if any(v in res["dropped"] for _, res in all_res)]
    lines = [
        "| scale | page cache | " + " | ".join(names) + " | ours / ceiling | restore / ours |",
        "|---|---|" + "---|" * (len(names) + 2),
    ]
    for b, res in all_res:
        for cache, by in res.items():
            t = {v: med(ss, "seconds") for v, ss in by.items()}
            cells = [spread([s.seconds for s in by[v]]) for v in names]
            r1 = f"{t['ours'] / t['ceiling']:.2f}x" if {"ours", "ceiling"} <= t.keys() else ""
            r2 = f"{t['restore'] / t['ours']:.1f}x" if {"ours", "restore"} <= t.keys() else ""
            lines.append(f"| {b.scale} | {cache} | " + " | ".join(cells) + f" | {r1} | {r2} |")
    lines += [
        "",
        "| scale | snapshot | store on disk | ours: read from store (of snapshot) | ours-ra0: read from "
        "store | ceiling: read from backing | restore: written | overlay after query (after teardown) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [bytes_row(b, res["dropped"]) for b, res in all_res]
    return "\n".join(lines) + "\n"


def bytes_row(b: Backup, by: dict[str, list[Sample]]) -> str:
    def mib(v: str, attr: str = "bytes") -> str:
        return f"{med(by[v], attr) / MiB:.2f} MiB" if v in by else ""

    def share(v: str) -> str:
        return f"{mib(v)} ({100 * med(by[v], 'bytes') / b.logical:.2f} %)" if v in by else ""

    ov = f"{mib('ours', 'overlay')} ({mib('ours', 'overlay_end')})" if "ours" in by else ""
    cells = [
        f"{b.logical / MiB:.0f} MiB", f"{b.store_bytes / MiB:.0f} MiB", share("ours"), share("ours-ra0"),
        share("ceiling"), f"{med(by['restore'], 'bytes') / MiB:.0f} MiB" if "restore" in by else "", ov,
    ]  # fmt: skip
    return f"| {b.scale} | " + " | ".join(cells) + " |"


def load_json(path: Path) -> list[tuple[Backup, dict[str, dict[str, list[Sample]]]]]:
    out = []
    for scale, d in json.loads(path.read_text()).items():
        b = Backup(int(scale), Path(), d["snapshot"], d["logical"], d["store_bytes"], Path(), d["aid"])
        res = {c: {v: [Sample(**s) for s in ss] for v, ss in by.items()} for c, by in d["samples"].items()}
        out.append((b, res))
    return out


def from_json(path: Path) -> str:
    """Render the tables again from a --json file."""
    all_res = load_json(path)
    return summary(all_res) + "\n" + "\n".join(report(b, res) for b, res in all_res)


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    return f"{os.cpu_count()} cores, {mem:.0f} GiB, {platform.platform()}, Python {platform.python_version()}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 20, 100])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS + MORE_VARIANTS)
    ap.add_argument("--plugin-arg", action="append", default=[], help="e.g. readahead=0 (ours only)")
    ap.add_argument("--reuse", action="store_true", help="reuse the backups (store, image) left in --work")
    ap.add_argument("--work", type=Path, help="work directory (kept); default: a temporary one, removed")
    ap.add_argument("--json", type=Path, help="write every sample here")
    ap.add_argument("--report", type=Path, metavar="JSON", help="only print the tables of a --json file")
    args = ap.parse_args()
    PLUGIN_ARGS.extend(args.plugin_arg)
    if args.report:
        print(from_json(args.report))
        return 0
    if os.geteuid() != 0:
        raise SystemExit("run as root (mount, losetup, drop_caches)")
    base = args.work or Path(tempfile.mkdtemp(prefix="kb-e2e-"))
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o755)  # the postgres user must reach the restored directory under it
    print(f"# {machine()}; {time.strftime('%Y-%m-%d %H:%M')}; runs {args.runs}", flush=True)
    out: list[str] = []
    raw: dict[str, object] = {}
    all_res = []
    try:
        for scale in args.scales:
            work = base / f"s{scale}"
            if args.reuse and (work / "backup.json").exists():
                b = Backup(**json.loads((work / "backup.json").read_text()))
                b.store, b.image = Path(b.store), Path(b.image)
            else:
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir(parents=True)
                b = build(scale, work)
                fields = b.__dict__ | {"store": str(b.store), "image": str(b.image)}
                (work / "backup.json").write_text(json.dumps(fields))
            res = rounds(b, work, args.runs, args.variants)
            all_res.append((b, res))
            text = report(b, res)
            print(text, flush=True)
            out.append(text)
            samples = {c: {v: [s.__dict__ for s in ss] for v, ss in by.items()} for c, by in res.items()}
            raw[str(scale)] = {
                "snapshot": b.snap, "logical": b.logical, "store_bytes": b.store_bytes, "aid": b.aid,
                "samples": samples,
            }  # fmt: skip
            if args.json:
                args.json.write_text(json.dumps(raw, indent=1))
            if not args.work:
                shutil.rmtree(work, ignore_errors=True)
    finally:
        if not args.work:
            shutil.rmtree(base, ignore_errors=True)
    print(summary(all_res))
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
