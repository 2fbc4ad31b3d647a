#!/usr/bin/env python3
# Benchmarks of the nbdkit plugin (issue 5), every comparison measured side by side in one run,
# each for nbdkit as `kloset-blocks` runs it (--threads=2, serving.nbdkit.NBDKIT_THREADS) and with nbdkit's
# default of 16 threads a connection:
#
# 1. sequential read, warm decoded-chunk cache: `nbdcopy --request-size=256K URI null:` against the
#    plugin and against nbdkit's C `file` plugin serving the same image from a local sparse file
#    written by BlockImage.write_sparse (what `kloset-blocks image` writes). Target ratio >= 0.5.
# 2. cold read from the store (fresh nbdkit, empty chunk cache; packfiles in the OS page cache):
#    the same nbdcopy, against the bare decode cost of the same chunk blobs (decrypt + decompress
#    of the encoded bytes already in memory, one thread). Target ratio >= 0.7.
# 3. 4 KiB random-read latency p50/p99 with a warm cache through libnbd, one connection and four
#    (one thread each, synchronous preads), against the file plugin as the floor.
#
# The data set is synthetic and written once into --workdir (never the repo): incompressible
# files, compressible 8 KiB "pages" and many small files, stored plaintext (LZ4) and encrypted
# (LZ4, AES-GCM-SIV, cheap KDF). Run:
#   .venv/bin/python bench/bench_plugin.py [--workdir /tmp/kloset-bench] [--rounds 5]
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import nbd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from kloset_blocks.image.snapshot import chunk_macs
from kloset_blocks.serving.nbdkit import NBDKIT_THREADS
from kloset_blocks.serving.server import Server
from kloset_blocks.store import codec as c

PLUGIN = str(REPO / "nbdplugin" / "kloset.py")
PASSPHRASE = "bench-passphrase"
MiB = 1 << 20
REQUEST = 256 * 1024


# ---- data set ------------------------------------------------------------------------------------


def make_source(root: Path, random_mib: int, pages_mib: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    (root / "random").mkdir(parents=True)
    (root / "pages").mkdir()
    (root / "small").mkdir()
    per = max(1, random_mib // 4)
    for i in range(4):
        with open(root / "random" / f"r{i}.bin", "wb") as f:
            for _ in range(per):
                f.write(rng.randbytes(MiB))
    words = [b"alpha", b"beta", b"gamma", b"delta", b"account", b"balance", b"filler", b"       "]

    def page() -> bytes:
        out = bytearray()
        while len(out) < 8192:
            out += rng.randbytes(8) + rng.choice(words) * rng.randint(1, 6) + bytes(rng.randint(0, 40))
        return bytes(out[:8192])

    pool = [page() for _ in range(512)]
    for i in range(2):
        with open(root / "pages" / f"p{i}.dat", "wb") as f:
            for _ in range(pages_mib // 2 * MiB // 8192):
                f.write(rng.choice(pool)[:4096] + page()[:4096])
    for i in range(2000):
        (root / "small" / f"f{i}").write_bytes(page()[: rng.randint(0, 8192)])


def make_stores(work: Path, random_mib: int, pages_mib: int) -> dict[str, tuple[Path, str]]:
    """{name: (store dir, snapshot id)}, written once and reused."""
    from kloset_blocks.writer.store import write_store

    marker = work / f"stores-{random_mib}-{pages_mib}.json"
    if marker.exists():
        return {k: (Path(p), s) for k, (p, s) in json.loads(marker.read_text()).items()}
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    src = work / "src"
    make_source(src, random_mib, pages_mib)
    stores = {
        "plain-lz4": (
            work / "plain",
            write_store(work / "plain", str(src), compression="LZ4", seed=1),
        ),
        "enc-lz4": (
            work / "enc",
            write_store(
                work / "enc",
                str(src),
                compression="LZ4",
                passphrase=PASSPHRASE.encode(),
                kdf_time=1,
                kdf_memory_kib=8192,
                seed=2,
            ),
        ),
    }
    shutil.rmtree(src)
    marker.write_text(json.dumps({k: (str(p), s) for k, (p, s) in stores.items()}))
    return stores


# ---- servers -------------------------------------------------------------------------------------


class Nbdkit:
    """nbdkit in the foreground on a private Unix socket; stopped with SIGTERM (runs cleanup)."""

    def __init__(self, sock: Path, *args: str) -> None:
        self.sock = sock
        sock.unlink(missing_ok=True)
        env = dict(os.environ, PLAKAR_PASSPHRASE=PASSPHRASE)
        t = time.perf_counter()
        self.proc = subprocess.Popen(["nbdkit", "-f", "-U", str(sock), *args], env=env)
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"nbdkit {' '.join(args)} exited with {self.proc.returncode}")
            if sock.exists():
                try:
                    h = self.handle()
                    h.shutdown()
                    break
                except nbd.Error:
                    pass
            time.sleep(0.01)
        self.startup = time.perf_counter() - t

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def handle(self) -> nbd.NBD:
        h = nbd.NBD()
        h.connect_uri(self.uri)
        return h

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.sock.unlink(missing_ok=True)


# (label, nbdkit options): as kloset-blocks runs it, and nbdkit's defaults.
SETUPS = (("kloset", [f"--threads={NBDKIT_THREADS}"]), ("default", []))


def plugin_server(work: Path, store: Path, snap: str, opts: list[str], stats: Path) -> Nbdkit:
    args = [*opts, "python", PLUGIN, f"store={store}", f"snapshot={snap}", "cache=2G", f"stats={stats}"]
    return Nbdkit(work / "plugin.sock", *args)


def nbdcopy(uri: str) -> float:
    t = time.perf_counter()
    subprocess.run(["nbdcopy", f"--request-size={REQUEST}", uri, "null:"], check=True)
    return time.perf_counter() - t


# ---- in-process oracle ---------------------------------------------------------------------------


@dataclass
class Dataset:
    name: str
    store: Path
    snap: str
    server: Server  # in-process, for the image, its extents and the chunk list

    @property
    def image(self):
        return self.server.exports[self.server.default_export].image

    def data_bytes(self) -> int:
        return sum(n for _, n, zero in self.image.extents(0, self.image.size) if not zero)


def open_dataset(name: str, store: Path, snap: str) -> Dataset:
    os.environ["PLAKAR_PASSPHRASE"] = PASSPHRASE
    server = Server()
    server.configure("store", str(store))
    server.configure("snapshot", snap)
    server.config_complete()
    server.get_ready()
    return Dataset(name, store, snap, server)


def decode_loop(ds: Dataset) -> tuple[float, int, int]:
    """(seconds, chunks, encoded bytes): decrypt + decompress every distinct chunk of the image
    once, from encoded bytes already in memory, on one thread."""
    store = ds.server.store
    macs = list(dict.fromkeys(chunk_macs(ds.image, 0, ds.image.size)))
    blobs = [store.read_encoded(c.RT_CHUNK, m) for m in macs]
    decode = store.codec.decode
    t = time.perf_counter()
    for b in blobs:
        decode(b)
    return time.perf_counter() - t, len(blobs), sum(map(len, blobs))


# ---- random reads --------------------------------------------------------------------------------


def random_offsets(ds: Dataset, n: int, seed: int) -> list[int]:
    """4 KiB-aligned offsets spread uniformly over the image's data (not its holes)."""
    runs = [(o, ln) for o, ln, zero in ds.image.extents(0, ds.image.size) if not zero and ln >= 4096]
    total = sum(ln // 4096 for _, ln in runs)
    rng = random.Random(seed)
    picks = sorted(rng.randrange(total) for _ in range(n))
    out, it, base = [], iter(runs), 0
    o, ln = next(it)
    for p in picks:
        while p >= base + ln // 4096:
            base += ln // 4096
            o, ln = next(it)
        out.append(o + (p - base) * 4096)
    rng.shuffle(out)
    return out


def latencies(server: Nbdkit, offsets: list[int], conns: int) -> list[float]:
    handles = [server.handle() for _ in range(conns)]
    results: list[list[float]] = [[] for _ in range(conns)]

    def run(i: int) -> None:
        h, out = handles[i], results[i]
        clock = time.perf_counter_ns
        for off in offsets[i::conns]:
            t = clock()
            h.pread(4096, off)
            out.append((clock() - t) / 1000)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for h in handles:
        h.shutdown()
    return [x for r in results for x in r]


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


# ---- the run -------------------------------------------------------------------------------------


def bench(ds: Dataset, work: Path, rounds: int, nrand: int) -> dict:
    out: dict = {"name": ds.name, "image_bytes": ds.image.size, "data_bytes": ds.data_bytes()}
    img = work / f"{ds.name}.img"
    ds.image.write_sparse(img)
    stats_file = work / f"{ds.name}-stats.json"
    out["decode_s"], out["startup_s"] = [], []
    for label, _ in SETUPS:
        out[label] = {"cold_s": [], "warm_s": [], "file_s": []}
    fsrv = Nbdkit(work / "file.sock", "file", str(img))
    try:
        nbdcopy(fsrv.uri)  # the file plugin's image in the page cache
        # 2. cold: a fresh nbdkit per round and setup, interleaved with the decode loop.
        for r in range(rounds):
            dt, nchunks, enc = decode_loop(ds)
            out["decode_s"].append(dt)
            for label, opts in SETUPS:
                res = out[label]
                srv = plugin_server(work, ds.store, ds.snap, opts, stats_file)
                out["startup_s"].append(round(srv.startup, 3))
                try:
                    res["cold_s"].append(nbdcopy(srv.uri))
                    if r == rounds - 1:
                        warm_phase(ds, srv, fsrv, rounds, nrand, res, stats_file)
                finally:
                    srv.stop()
                if r == rounds - 1:
                    res["stats"] = json.loads(stats_file.read_text())
    finally:
        fsrv.stop()
    out["chunks"], out["encoded_bytes"] = nchunks, enc
    return out


def warm_phase(
    ds: Dataset, srv: Nbdkit, fsrv: Nbdkit, rounds: int, nrand: int, res: dict, stats: Path
) -> None:
    """1. warm sequential reads interleaved with the file plugin, 3. random 4 KiB reads; on a
    server that has read the image once cold."""
    # A second pass: the cache keeps a chunk for good once it is used again (2Q, chunks.py); the
    # first pass leaves only the last 64 MiB in its first-use queue.
    nbdcopy(srv.uri)
    before = misses(srv, stats)
    for _ in range(rounds):
        res["warm_s"].append(nbdcopy(srv.uri))
        res["file_s"].append(nbdcopy(fsrv.uri))
    res["warm_misses"] = misses(srv, stats) - before  # 0: every warm byte came from the cache
    offs = random_offsets(ds, nrand, seed=3)
    lat = {}
    for conns in (1, 4):
        for label, s in (("plugin", srv), ("file", fsrv)):
            lat[f"{label}-{conns}conn"] = latencies(s, offs, conns)
    res["latency_us"] = {k: {"p50": pct(v, 50), "p99": pct(v, 99), "n": len(v)} for k, v in lat.items()}


def misses(srv: Nbdkit, stats: Path) -> int:
    """The server's chunk cache misses so far (the plugin writes stats= when a client closes)."""
    srv.handle().shutdown()
    return json.loads(stats.read_text())["misses"]


def report(results: list[dict], argv: list[str]) -> str:
    med = statistics.median
    lines = [
        f"Machine: {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()},"
        f" {nbdkit_version()}. Date: {time.strftime('%Y-%m-%d')}.",
        f"Command: `.venv/bin/python bench/bench_plugin.py {' '.join(argv)}`",
        "",
        "| store | nbdkit | data | seq warm: plugin / file (ratio) | cold: plugin / bare decode (ratio) |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        mb = r["data_bytes"] / 1e6
        dec = med(r["decode_s"])
        data = f"{mb:.0f} MB in {r['chunks']} chunks ({r['encoded_bytes'] / 1e6:.0f} MB encoded)"
        for label, opts in SETUPS:
            x = r[label]
            w, f, cold = med(x["warm_s"]), med(x["file_s"]), med(x["cold_s"])
            lines.append(
                f"| {r['name']} | {' '.join(opts) or '(defaults: 16 threads)'} | {data}"
                f" | {mb / w:.0f} / {mb / f:.0f} MB/s ({f / w:.2f})"
                f" | {mb / cold:.0f} / {mb / dec:.0f} MB/s ({dec / cold:.2f}) |"
            )
    lines += [
        "",
        "Cold rounds, s (plugin; bare decode): "
        + "; ".join(
            f"{r['name']} {label} " + " ".join(f"{x:.2f}" for x in r[label]["cold_s"])
            for r in results
            for label, _ in SETUPS
        )
        + "; decode "
        + "; ".join(f"{r['name']} " + " ".join(f"{x:.2f}" for x in r["decode_s"]) for r in results),
        "",
        "4 KiB random reads, warm cache (µs, p50 / p99; libnbd synchronous reads, one thread a connection):",
        "",
        "| store | nbdkit | plugin 1 conn | file 1 conn | plugin 4 conns | file 4 conns |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        for label, opts in SETUPS:
            lat = r[label]["latency_us"]
            cells = [
                f"{lat[k]['p50']:.0f} / {lat[k]['p99']:.0f}"
                for k in ("plugin-1conn", "file-1conn", "plugin-4conn", "file-4conn")
            ]
            lines.append(f"| {r['name']} | {' '.join(opts) or 'defaults'} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Counters (`stats=FILE`) of each last server after its runs (warm misses: during the warm rounds):",
        "",
    ]
    for r in results:
        for label, _ in SETUPS:
            x = r[label]
            lines.append(
                f"- {r['name']} {label}: warm misses {x['warm_misses']},"
                f" `{json.dumps(x['stats'], sort_keys=True)}`"
            )
    return "\n".join(lines)


def nbdkit_version() -> str:
    return subprocess.run(["nbdkit", "--version"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/kloset-bench"))
    ap.add_argument("--random-mib", type=int, default=160)
    ap.add_argument("--pages-mib", type=int, default=160)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--random-reads", type=int, default=20000)
    ap.add_argument("--only", choices=["plain-lz4", "enc-lz4"])
    ap.add_argument("--json", type=Path, help="also write the raw results here")
    args = ap.parse_args()
    stores = make_stores(args.workdir, args.random_mib, args.pages_mib)
    results = []
    for name, (store, snap) in stores.items():
        if args.only and name != args.only:
            continue
        ds = open_dataset(name, store, snap)
        results.append(bench(ds, args.workdir, args.rounds, args.random_reads))
        print(json.dumps(results[-1], indent=1), file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(report(results, sys.argv[1:]))


if __name__ == "__main__":
    main()
