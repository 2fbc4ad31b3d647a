# ext4 planner benchmarks: plan time and peak memory (tracemalloc) for synthetic trees of 10k and
# 100k files (sizes up to 1 MiB, 1000 files a directory), and BlockImage.pread throughput over
# metadata regions. Run: .venv/bin/python -m pytest bench/test_bench_ext4.py --benchmark-enable -s
from __future__ import annotations

import stat
import time
import tracemalloc

import pytest

from kloset_blocks.ext4 import PlanOptions, plan
from kloset_blocks.ext4.layout import BYTES
from kloset_blocks.image.block import BlockImage
from kloset_blocks.tree import Node, ReadIntoByCopy


class SizedData(ReadIntoByCopy):
    """FileData of a given size; the planner never reads it."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size

    def read(self, offset: int, length: int) -> bytes:
        return bytes(length)


def synthetic(n_files: int, per_dir: int = 1000) -> list[Node]:
    nodes = [Node(b"/", stat.S_IFDIR | 0o700, 26, 26, 0)]
    for d in range(-(-n_files // per_dir)):
        nodes.append(Node(b"/base/%06d" % d, stat.S_IFDIR | 0o700, 26, 26, 0))
        for i in range(min(per_dir, n_files - d * per_dir)):
            size = (i * 7919) % (1 << 20)
            path = b"/base/%06d/%d" % (d, 16384 + i)
            nodes.append(Node(path, stat.S_IFREG | 0o600, 26, 26, 10**18, size=size, data=SizedData(size)))
    return nodes


@pytest.mark.parametrize("n_files", [10_000, 100_000])
def test_plan(benchmark, n_files):
    nodes = synthetic(n_files)
    tracemalloc.start()
    t = time.perf_counter()
    kept = plan(nodes, PlanOptions())
    traced_s = time.perf_counter() - t
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del kept
    layout = benchmark.pedantic(plan, args=(nodes, PlanOptions()), rounds=3, iterations=1)
    benchmark.extra_info.update(
        files=n_files,
        peak_bytes_per_node=round(peak / len(nodes)),
        retained_bytes_per_node=round(current / len(nodes)),
        traced_seconds=round(traced_s, 2),
        regions=len(layout.regions),
    )
    print(
        f"\n{n_files} files: peak {peak / len(nodes):.0f} B/node, retained {current / len(nodes):.0f} B/node"
    )
    assert benchmark.stats["mean"] < 5 * n_files / 100_000 + 1


@pytest.mark.parametrize("chunk", [4096, 65536])
def test_pread_metadata(benchmark, chunk):
    layout = plan(synthetic(10_000), PlanOptions())
    img = BlockImage(layout)
    meta = [r for r in layout.regions if r.kind == BYTES]
    start, end = meta[0].start, meta[-1].start + meta[-1].length
    buf = bytearray(chunk)
    offsets = list(range(start, end - chunk, chunk))

    def sweep() -> int:
        for off in offsets:
            img.readinto(buf, off)
        return len(offsets) * chunk

    nbytes = benchmark(sweep)
    benchmark.extra_info.update(
        bytes_per_round=nbytes, mib_per_s=round(nbytes / benchmark.stats["mean"] / 2**20)
    )
    per_call = benchmark.stats["mean"] / len(offsets) * 1e6
    rate = nbytes / benchmark.stats["mean"] / 2**20
    print(f"\npread {chunk} B over metadata: {rate:.0f} MiB/s, {per_call:.1f} us/call")
