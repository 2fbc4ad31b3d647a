# Benchmark of the pyfuse3 views against the NBD path, and of the overlayfs approach against ours.
#
#   .venv/bin/python bench/bench_fuse.py [--store fs:/path] [--snapshot PREFIX] [--skip-pg]
#
# 1. Read throughput of the same synthesized image, served two ways by fresh processes (cold
#    decoded-chunk cache; the store's packfiles warm in the OS page cache after a warm-up pass):
#    - `kloset-blocks expose` (pyfuse3 file): os.pread on the file (the kernel splits reads into
#      FUSE requests of at most 128 KiB);
#    - nbdkit's Python plugin on a Unix socket: libnbd pread, one connection, and nbdcopy to null:.
#    Sequential: the whole image (mostly zeros: per-request cost) and its data span (metadata and
#    file data: chunk fetch and decode). Random: aligned 8 KiB reads at the same seeded offsets in
#    the data span, cold then warm (FUSE page cache dropped with fadvise between passes).
# 2. Postgres after startup and the same queries, three ways: overlayfs (upper dir on ext4) over
#    `browse`, as Plakar tried; our chain with nbdkit; our chain with the FUSE-exposed file. Time from
#    launch to the first answer; then bytes written to the upper dir vs the qcow2 overlay's growth.
#
# Needs root. Prints a markdown section for bench/RESULTS.md.
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import nbd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kloset_blocks import postgres
from kloset_blocks.app.sessions import pg_session
from kloset_blocks.app.teardown import teardown_run_dir
from kloset_blocks.ext4.layout import ZERO
from kloset_blocks.fuse.chain import ExposedImage, expose_argv
from kloset_blocks.fuse.record import STATE_MOUNT, STATE_PROC
from kloset_blocks.host.backing import NbdkitBacking
from kloset_blocks.host.chain import Chain
from kloset_blocks.host.procs import proc_record
from kloset_blocks.host.progress import Progress
from kloset_blocks.host.rundir import RunDir
from kloset_blocks.image.snapshot import ImageOptions, snapshot_image
from kloset_blocks.serving.nbdkit import nbdkit_argv
from kloset_blocks.store import open_store

PYTHON = sys.executable
PLUGIN = REPO / "nbdplugin" / "kloset.py"
DEFAULT_STORE = f"fs:{REPO.parent / 'shared' / 'fixtures' / 'golden-plain'}"
MiB = 1 << 20
QUERIES = [
    ("first", "select count(*), sum(id) from customers"),
    ("scan", "select sum(abalance) from pgbench_accounts"),
    ("update", "update pgbench_accounts set abalance = abalance + 1 where aid % 1000 = 0"),
    ("checkpoint", "checkpoint"),
]


def mounted(path: Path | str) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def wait_until(cond: Callable[[], bool], proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what} did not come up")
        time.sleep(0.002)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------- servers


class Exposed:
    def __init__(self, store: str, snap: str, tmp: Path) -> None:
        self.path = tmp / "image"
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "kloset_blocks", "expose", store, snap, str(self.path), "--no-run-dir"],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=REPO,
        )
        wait_until(lambda: mounted(self.path), self.proc, "expose")
        self.fd = os.open(self.path, os.O_RDONLY)

    def pread(self, n: int, off: int) -> int:
        return len(os.pread(self.fd, n, off))

    def drop_page_cache(self) -> None:
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def random_access(self) -> None:
        # No kernel readahead around each 8 KiB read: the same bytes as the NBD client asks for.
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)

    def close(self) -> None:
        os.close(self.fd)
        stop(self.proc)


class Nbdkit:
    def __init__(self, store: str, snap: str, tmp: Path) -> None:
        self.sock = tmp / "nbd.sock"
        argv, env = nbdkit_argv(store, snap)
        argv = [argv[0], "-r", "-f", "-U", str(self.sock), *argv[1:]]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, env={**os.environ, **env})
        wait_until(self.sock.exists, self.proc, "nbdkit")
        self.h = nbd.NBD()
        self.h.connect_unix(str(self.sock))

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def pread(self, n: int, off: int) -> int:
        return len(self.h.pread(n, off))

    def drop_page_cache(self) -> None:
        pass

    def random_access(self) -> None:
        pass

    def close(self) -> None:
        self.h.shutdown()
        stop(self.proc)
        self.sock.unlink(missing_ok=True)


# ---------------------------------------------------------------- reads


def sequential(server: Exposed | Nbdkit, end: int, req: int) -> float:
    t0 = time.monotonic()
    off = 0
    while off < end:
        off += server.pread(min(req, end - off), off)
    return end / (time.monotonic() - t0) / 1e6


def random_reads(server: Exposed | Nbdkit, offsets: list[int]) -> tuple[float, float]:
    t0 = time.monotonic()
    for off in offsets:
        server.pread(8192, off)
    dt = time.monotonic() - t0
    return len(offsets) * 8192 / dt / 1e6, dt / len(offsets) * 1e6


def nbdcopy(uri: str) -> float:
    t0 = time.monotonic()
    subprocess.run(["nbdcopy", uri, "null:"], check=True)
    return time.monotonic() - t0


def bench_reads(store: str, snap: str, tmp: Path, n_random: int) -> list[str]:
    image, _ = snapshot_image(open_store(store).open_snapshot(snap), ImageOptions())
    size = image.size
    span = max(r.start + r.length for r in image.regions if r.kind != ZERO)
    rng = random.Random(42)
    offsets = [rng.randrange(span // 8192) * 8192 for _ in range(n_random)]
    rows: dict[str, dict[str, str]] = {}
    kinds: list[tuple[str, type]] = [("FUSE file (expose)", Exposed), ("NBD (nbdkit python, libnbd)", Nbdkit)]
    # warm-up: the packfiles into the OS page cache, so both start equal
    s = Exposed(store, snap, tmp)
    sequential(s, span, MiB)
    s.close()
    for name, cls in kinds:
        r: dict[str, str] = {}
        s = cls(store, snap, tmp)
        r["seq data span, cold"] = f"{sequential(s, span, MiB):.0f} MB/s"
        s.drop_page_cache()
        r["seq data span, warm"] = f"{sequential(s, span, MiB):.0f} MB/s"
        s.drop_page_cache()
        r["seq whole image (mostly zeros)"] = f"{sequential(s, size, MiB):.0f} MB/s"
        s.close()
        s = cls(store, snap, tmp)
        s.random_access()
        mb, us = random_reads(s, offsets)
        r[f"random 8 KiB x{n_random}, cold"] = f"{mb:.1f} MB/s ({us:.0f} µs/read)"
        s.drop_page_cache()
        mb, us = random_reads(s, offsets)
        r[f"random 8 KiB x{n_random}, warm"] = f"{mb:.1f} MB/s ({us:.0f} µs/read)"
        if isinstance(s, Nbdkit):
            r["nbdcopy whole image to null: (4 conns)"] = f"{size / nbdcopy(s.uri) / 1e6:.0f} MB/s"
        s.close()
        rows[name] = r
    out = [
        f"Image: {size / MiB:.0f} MiB, data span {span / MiB:.1f} MiB. Sequential reads of 1 MiB from the "
        "client (the FUSE kernel splits them into <= 128 KiB requests); 'cold' = a fresh server process "
        "(empty chunk cache), 'warm' = second pass (FUSE page cache dropped with fadvise). Random reads on "
        "the FUSE file use POSIX_FADV_RANDOM (no kernel readahead: the same bytes the NBD client reads).",
        "",
        "| measure | " + " | ".join(rows) + " |",
        "|---|" + "---|" * len(rows),
    ]
    keys = list(dict.fromkeys(k for r in rows.values() for k in r))
    for k in keys:
        out.append(f"| {k} | " + " | ".join(r.get(k, "n/a") for r in rows.values()) + " |")
    return out


# ---------------------------------------------------------------- Postgres: overlayfs vs overlay


def du(path: Path) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of a tree."""
    apparent = allocated = 0
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            st = os.lstat(os.path.join(root, name))
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return apparent, allocated


def run_queries(server: postgres.Server, t_launch: float) -> dict[str, float]:
    times = {}
    for name, sql in QUERIES:
        t0 = time.monotonic()
        server.query(sql, db="shop")
        times[name] = time.monotonic() - t0
        if name == "first":
            times["launch to first answer"] = time.monotonic() - t_launch
    return times


def start_pg(run: RunDir, root: Path, settings: tuple[str, ...] = ()) -> postgres.Server:
    cluster = postgres.locate(root)
    uid, gid = postgres.pg_ids()
    postgres.ensure_traversable(root, cluster.datadir, uid)
    postgres.fix_ownership(cluster.datadir, uid, gid)
    postgres.prepare_datadir(cluster.datadir, Progress(quiet=True))
    server = postgres.Server(run, cluster, settings=settings)
    server.start()
    return server


def pg_overlayfs(store: str, snap: str, tmp: Path, settings: tuple[str, ...] = ()) -> dict[str, object]:
    run = RunDir.create(tmp / "runs")
    lower, upper, work, merged = (run.path / d for d in ("lower", "upper", "work", "merged"))
    for d in (upper, work, merged):
        d.mkdir()
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [PYTHON, "-m", "kloset_blocks", "browse", store, snap, str(lower), "--no-run-dir"],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
        start_new_session=True,
    )
    run.record(**{STATE_PROC: proc_record(proc.pid), STATE_MOUNT: str(lower)})
    try:
        wait_until(lambda: mounted(lower), proc, "browse")
        opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)], check=True)
        run.record(mountpoint=str(merged), mount_source="overlay")
        server = start_pg(run, merged, settings)
        times = run_queries(server, t0)
        server.stop()
        biggest = sorted(
            ((p.stat().st_size, str(p.relative_to(upper))) for p in upper.rglob("*") if p.is_file()),
            reverse=True,
        )
        return {"times": times, "bytes": du(upper), "biggest": biggest[:4], "files": len(biggest)}
    finally:
        teardown_run_dir(run.path)


def pg_chain(store: str, snap: str, tmp: Path, backend: str) -> dict[str, object]:
    t0 = time.monotonic()
    if backend == "nbd":
        chain, server = pg_session(
            NbdkitBacking(*nbdkit_argv(store, snap, owner="postgres")), run_root=tmp / "runs"
        )
    else:
        chain = Chain(ExposedImage(expose_argv(store, snap, owner="postgres")), run_root=tmp / "runs")
        chain.up()
        assert chain.run is not None and chain.mountpoint is not None
        server = start_pg(chain.run, chain.mountpoint)
    try:
        assert chain.overlay is not None
        before = chain.overlay.stat().st_blocks * 512
        times = run_queries(server, t0)
        server.stop()
        subprocess.run(["sync"], check=True)
        info = json.loads(
            subprocess.run(
                ["qemu-img", "info", "-U", "--output=json", str(chain.overlay)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        return {"times": times, "bytes": (chain.overlay.stat().st_size, info["actual-size"]), "empty": before}
    finally:
        chain.teardown()


def bench_pg(store: str, snap: str, tmp: Path) -> list[str]:
    results = {
        "overlayfs (upper on ext4) over `browse`": pg_overlayfs(store, snap, tmp),
        "overlayfs, recovery_init_sync_method=syncfs": pg_overlayfs(
            store, snap, tmp, ("recovery_init_sync_method=syncfs",)
        ),
        "ours: qcow2 overlay on nbdkit": pg_chain(store, snap, tmp, "nbd"),
        "ours: qcow2 overlay on `expose` file": pg_chain(store, snap, tmp, "fuse"),
    }
    out = [
        "Same snapshot, Postgres started on it, then in database shop: "
        + "; ".join(f"`{sql}`" for _, sql in QUERIES)
        + ". Bytes after Postgres stopped: the upper dir's files (apparent / allocated) against the qcow2 "
        "overlay file (size / allocated).",
        "",
        "| approach | launch to first answer | scan | update | checkpoint | bytes written"
        " (apparent / allocated) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        t = r["times"]
        a, b = r["bytes"]  # type: ignore[misc]
        out.append(
            f"| {name} | {t['launch to first answer']:.2f} s | {t['scan']:.2f} s | {t['update']:.2f} s | "
            f"{t['checkpoint']:.2f} s | {a / MiB:.1f} MiB / {b / MiB:.1f} MiB |"
        )
    out.append("")
    for name, r in results.items():
        if "biggest" in r:
            top = ", ".join(f"{p} ({n / MiB:.1f} MiB)" for n, p in r["biggest"])  # type: ignore[attr-defined]
            out.append(f"- {name}: {r['files']} files copied up whole; the largest: {top}.")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--store", default=DEFAULT_STORE)
    ap.add_argument("--snapshot", default="bf6afbae")
    ap.add_argument("--random", type=int, default=2000, help="random reads per pass")
    ap.add_argument("--skip-pg", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root")
    tmp = Path(tempfile.mkdtemp(prefix="bench-fuse-"))
    try:
        lines = bench_reads(args.store, args.snapshot, tmp, args.random)
        if not args.skip_pg:
            lines += ["", *bench_pg(args.store, args.snapshot, tmp)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    header = [
        "## FUSE views",
        "",
        f"Machine: {os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}, Python "
        f"{platform.python_version()}. Date: {time.strftime('%Y-%m-%d')}.",
        f"Command: `.venv/bin/python bench/bench_fuse.py` (store {args.store}, snapshot {args.snapshot}).",
        "",
    ]
    print("\n".join(header + lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
