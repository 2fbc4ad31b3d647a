# The plugin's counters (`stats=FILE`): the store's count of encoded bytes read from packfiles, the
# chunk cache's hits / misses / prefetches / decoded bytes, as written by a real nbdkit at exit.
# The oracles are independent of the counters: the packfile locations of the blobs read (their
# encoded lengths), the decoded chunk sizes from the snapshot's chunk lists, and the fact that a
# second read of one file needs no fetch at all.
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kloset_blocks.image.snapshot import chunk_macs
from kloset_blocks.serving.server import Server
from kloset_blocks.store import codec as c
from kloset_blocks.store import open_store
from tests.conftest import REPO, server_for

PLUGIN = str(REPO / "nbdplugin" / "kloset.py")
SNAP_A = "bf6afbae"


@pytest.fixture(scope="module")
def store(fixtures_dir: Path) -> Path:
    return fixtures_dir / "golden-plain"


def image_of(server: Server):
    return server.exports[server.default_export].image


def distinct_chunks(server: Server) -> list[bytes]:
    image = image_of(server)
    return list(dict.fromkeys(chunk_macs(image, 0, image.size)))


def run_nbdkit(store: Path, stats: Path, client: str, *params: str) -> dict[str, int]:
    """nbdkit captive around `client` (a shell command using "$uri"); the stats it wrote at exit."""
    subprocess.run(
        ["nbdkit", "-U", "-", "python", PLUGIN, f"store={store}", f"snapshot={SNAP_A}", f"stats={stats}",
         *params, "--run", client],
        check=True,
        timeout=120,
    )  # fmt: skip
    return json.loads(stats.read_text())


# ---- the store's counter -------------------------------------------------------------------------


def test_store_counts_encoded_bytes_of_each_pread(store: Path) -> None:
    with open_store(str(store)) as st:
        macs = list(dict.fromkeys(chunk_macs(image_of(server_for(store)), 0, 64 << 20)))[:20]
        assert macs
        before = st.stats()
        for mac in macs:
            st.read_chunk(mac)
        after = st.stats()
        expected = sum(st.locate(c.RT_CHUNK, m).length for m in macs)
        assert after["store_bytes_read"] - before["store_bytes_read"] == expected
        assert after["store_preads"] - before["store_preads"] == len(macs)


def test_store_counter_is_exact_under_threads(store: Path) -> None:
    with open_store(str(store)) as st:
        mac = distinct_chunks(server_for(store))[0]
        length = st.locate(c.RT_CHUNK, mac).length
        before = st.stats()["store_bytes_read"]

        def work() -> None:
            for _ in range(50):
                st.read_chunk(mac)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert st.stats()["store_bytes_read"] - before == 8 * 50 * length


# ---- in-process Server ---------------------------------------------------------------------------


def largest_file_region(server: Server):
    files = (r for r in image_of(server).regions if getattr(r.source, "macs", None))
    return max(files, key=lambda r: r.src_len)


def test_reading_a_file_twice_second_time_all_hits(store: Path) -> None:
    server = server_for(store, "readahead=0")
    export = server.open("")
    region = largest_file_region(server)
    data = region.source
    buf = memoryview(bytearray(region.src_len))
    server.pread(export, buf, region.start)
    first = server.stats()
    assert first["misses"] == len(set(data.macs)) > 1
    server.pread(export, buf, region.start)
    second = server.stats()
    assert second["misses"] == first["misses"]
    assert second["hits"] - first["hits"] == len(list(data.chunk_ranges(0, data.size)))
    assert second["store_bytes_read"] == first["store_bytes_read"]
    assert second["bytes_decoded"] == first["bytes_decoded"]


def drain(server: Server) -> None:
    """Wait for the readahead planner and then for every fetch it started."""
    server.settle()


def test_random_reads_do_not_prefetch(store: Path) -> None:
    server = server_for(store)
    export = server.open("")
    region = largest_file_region(server)
    buf = memoryview(bytearray(4096))
    # Backwards, a chunk apart: never where the previous read ended.
    for off in range(region.start + region.src_len - 4096, region.start, -(1 << 20)):
        server.pread(export, buf, off)
    drain(server)
    assert server.stats()["prefetched"] == 0


def test_sequential_reads_prefetch_ahead_and_plan_each_block_once(store: Path) -> None:
    server = server_for(store, "readahead=4M")
    export = server.open("")
    region = largest_file_region(server)
    step = 64 << 10
    buf = memoryview(bytearray(step))
    for off in range(region.start, region.start + min(region.src_len, 2 << 20) - step, step):
        server.pread(export, buf, off)
    drain(server)
    stats = server.stats()
    assert stats["prefetched"] > 0
    # Every chunk fetched once: misses and prefetches never overlap, nothing decoded twice.
    fetched = stats["misses"] + stats["prefetched"]
    assert stats["bytes_decoded"] == sum(len(server.store.read_chunk(m)) for m in server.cache.cached_macs())
    assert fetched == len(server.cache.cached_macs())


def test_cache_hint_prefetches_so_the_read_misses_nothing(store: Path) -> None:
    server = server_for(store, "readahead=0")
    export = server.open("")
    region = largest_file_region(server)
    server.prefetch(export, region.start, region.src_len)
    drain(server)
    assert server.stats()["prefetched"] == len(set(region.source.macs))
    server.pread(export, memoryview(bytearray(region.src_len)), region.start)
    assert server.stats()["misses"] == 0


# ---- through nbdkit ------------------------------------------------------------------------------


def test_sequential_nbdcopy_prefetches_and_counts_every_chunk_once(store: Path, tmp_path: Path) -> None:
    server = server_for(store)
    macs = distinct_chunks(server)
    decoded = sum(len(server.store.read_chunk(m)) for m in macs)
    with open_store(str(store)) as st:
        encoded = sum(st.locate(c.RT_CHUNK, m).length for m in macs)
    stats = run_nbdkit(store, tmp_path / "stats.json", 'nbdcopy --request-size=262144 "$uri" null:')
    assert stats["prefetched"] > 0
    # Every chunk decoded exactly once (the cache holds them all), none failed.
    assert stats["bytes_decoded"] == decoded
    assert stats["misses"] + stats["prefetched"] == len(macs)
    assert stats["fetch_errors"] == 0
    # Chunks plus the metadata read while building the image (snapshot header, B-tree nodes, objects).
    assert encoded <= stats["store_bytes_read"] < encoded + (4 << 20)


def test_no_readahead_means_no_prefetch(store: Path, tmp_path: Path) -> None:
    stats = run_nbdkit(store, tmp_path / "stats.json", 'nbdcopy "$uri" null:', "readahead=0")
    assert stats["prefetched"] == 0
    assert stats["misses"] > 0


def test_second_read_of_a_file_through_nbdkit_is_all_hits(store: Path, tmp_path: Path) -> None:
    region = largest_file_region(server_for(store))
    script = tmp_path / "twice.py"
    out = tmp_path / "twice.json"
    script.write_text(
        "import json, os, nbd\n"
        "h = nbd.NBD(); h.connect_uri(os.environ['uri'])\n"
        f"a = h.pread({region.src_len}, {region.start})\n"
        f"b = h.pread({region.src_len}, {region.start})\n"
        f"json.dump({{'same': a == b, 'len': len(a)}}, open({str(out)!r}, 'w'))\n"
    )
    client = f'uri="$uri" {sys.executable} {script}'
    stats = run_nbdkit(store, tmp_path / "stats.json", client, "readahead=0")
    assert json.loads(out.read_text()) == {"same": True, "len": region.src_len}
    chunks = region.source.macs
    # First read: one miss per distinct chunk; second read: hits only.
    assert stats["misses"] == len(set(chunks))
    assert stats["hits"] >= len(chunks)
    assert stats["store_bytes_read"] > 0


def test_stats_file_written_even_without_reads(store: Path, tmp_path: Path) -> None:
    stats = run_nbdkit(store, tmp_path / "stats.json", "true")
    assert stats["hits"] == stats["misses"] == stats["bytes_decoded"] == 0
    # Building the image read metadata from the store.
    assert stats["store_bytes_read"] > 0 and stats["store_preads"] > 0


def test_stats_are_logged_with_nbdkit_debug(store: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        ["nbdkit", "-v", "-U", "-", "python", PLUGIN, f"store={store}", f"snapshot={SNAP_A}",
         "--run", 'nbdcopy "$uri" null:'],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    lines = [ln for ln in proc.stderr.splitlines() if "kloset: stats" in ln]
    assert lines, proc.stderr[-2000:]
    assert "misses" in lines[-1] and "store_bytes_read" in lines[-1]
