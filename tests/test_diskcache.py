# The on-disk chunk cache (kloset_blocks/store/diskcache.py) on real stores: the golden fixtures, written
# by Kloset's own code. Oracle: the store's own read_chunk (MAC-checked). Every damaged entry must be
# ignored, counted and refetched; never wrong bytes.
from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kloset_blocks.store import Store
from kloset_blocks.store import codec as c
from kloset_blocks.store.diskcache import MAGIC, DiskCache
from tests.store_helpers import enc_store, plain_store


def some_chunk_macs(store: Store, n: int) -> list[bytes]:
    snap = store.open_snapshot(store.snapshots()[0].hex_id)
    macs: list[bytes] = []
    for _, entry in snap.walk(b"/"):
        if entry.is_reg and entry.size > 0:
            macs += [m for m in snap.open_file(_).macs if m not in macs]
        if len(macs) >= n:
            break
    return macs[:n]


class Counting:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.calls = 0

    def __call__(self, mac: bytes) -> bytes:
        self.calls += 1
        return self.store.read_chunk(mac)


def make(store: Store, root: Path, max_bytes: int = 1 << 30) -> DiskCache:
    return DiskCache(root, store.codec, bytes(store.config.get("RepositoryID") or b""), max_bytes)


@pytest.mark.parametrize("which", ["plain", "enc"])
def test_second_cache_instance_fetches_nothing(tmp_path: Path, which: str) -> None:
    store = plain_store() if which == "plain" else enc_store()
    macs = some_chunk_macs(store, 4)
    src = Counting(store)
    first = make(store, tmp_path)
    fetch = first.wrap(src)
    want = [fetch(m) for m in macs]
    first.flush()
    assert src.calls == 4 and first.stats.disk_written == 4
    second = make(store, tmp_path)  # a new process would start like this
    fetch2 = second.wrap(src)
    assert [fetch2(m) for m in macs] == want == [store.read_chunk(m) for m in macs]
    assert src.calls == 4 and second.stats.disk_hits == 4
    for m in macs:
        raw = Path(second.path(m)).read_bytes()
        assert raw.startswith(MAGIC) and m in raw[:64]
        assert oct(Path(second.path(m)).stat().st_mode & 0o777) == "0o600"
        if which == "enc":
            # An encrypted store's chunks never sit in the clear: no 64-byte run of plaintext.
            plain = store.read_chunk(m)
            assert all(plain[i : i + 64] not in raw for i in range(0, len(plain) - 64, 4096))


def flip_payload(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[-10] ^= 0xFF
    p.write_bytes(bytes(b))


def set_mac_field(p: Path) -> None:
    b = bytearray(p.read_bytes())
    b[len(MAGIC) + 1] ^= 1
    p.write_bytes(bytes(b))


DAMAGE: list[tuple[str, Callable[[Path], None]]] = [
    ("flipped payload byte", flip_payload),
    ("truncated", lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])),
    ("empty", lambda p: p.write_bytes(b"")),
    ("bad magic", lambda p: p.write_bytes(b"XXXXXXXX" + p.read_bytes()[8:])),
    ("MAC field altered", set_mac_field),
]


@pytest.mark.parametrize(("name", "damage"), DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damaged_entry_is_ignored_and_refetched(tmp_path: Path, name: str, damage: Callable) -> None:
    store = plain_store()
    (m,) = some_chunk_macs(store, 1)
    cache = make(store, tmp_path)
    cache.save(m, store.read_chunk(m))
    damage(Path(cache.path(m)))
    src = Counting(store)
    assert cache.wrap(src)(m) == store.read_chunk(m)
    assert (src.calls, cache.stats.disk_corrupt, cache.stats.disk_hits) == (1, 1, 0)
    cache.flush()
    assert cache.load(m) == store.read_chunk(m)  # rewritten after the refetch


def test_entry_holding_another_chunk_is_rejected(tmp_path: Path) -> None:
    store = plain_store()
    a, b = some_chunk_macs(store, 2)
    cache = make(store, tmp_path)
    cache.save(b, store.read_chunk(b))
    Path(cache.path(a)).parent.mkdir(exist_ok=True)
    # Same layout, but the MAC field says `a` while the content is `b`'s: only the recomputed MAC
    # catches it.
    entry = Path(cache.path(b)).read_bytes()
    forged = entry[: len(MAGIC) + 1] + a + entry[len(MAGIC) + 1 + len(a) :]
    Path(cache.path(a)).write_bytes(forged)
    assert cache.load(a) is None and cache.stats.disk_corrupt == 1
    assert not Path(cache.path(a)).exists()


def test_size_is_bounded_and_oldest_go_first(tmp_path: Path) -> None:
    store = plain_store()
    macs = some_chunk_macs(store, 8)
    sizes = [len(make(store, tmp_path / "probe").encode(m, store.read_chunk(m))) for m in macs]
    bound = sum(sizes[:4]) + 1
    cache = make(store, tmp_path / "c", max_bytes=bound)
    now = time.time()
    for i, m in enumerate(macs):
        cache.save(m, store.read_chunk(m))
        os.utime(cache.path(m), (now - 1000 + i, now - 1000 + i))  # strictly increasing ages
    total = sum(p.stat().st_size for p in (tmp_path / "c").rglob("*") if p.is_file())
    assert total <= bound
    present = [os.path.exists(cache.path(m)) for m in macs]
    assert present[-1] and not present[0] and cache.stats.disk_evicted >= 4
    assert present == sorted(present)  # the survivors are the most recent ones


def test_stores_do_not_share_entries(tmp_path: Path) -> None:
    a, b = plain_store(), enc_store()
    ca, cb = make(a, tmp_path), make(b, tmp_path)
    assert ca.dir != cb.dir and ca.dir.parent == cb.dir.parent
    assert c.RT_CHUNK  # the store's chunk type is what both cache


def test_metadata_reads_come_from_disk_the_second_time(tmp_path: Path) -> None:
    """wrap_store: a walk of a snapshot's tree and its chunk lists reads the store once; a second
    Store (a new process) with the same cache directory reads only the snapshot header."""
    from kloset_blocks.store import open_store
    from tests.store_helpers import PLAIN, SNAP_A_PLAIN

    def walk(store: Store) -> list[tuple[bytes, int, list[bytes]]]:
        snap = store.open_snapshot(SNAP_A_PLAIN)
        return [(p, e.size, snap.open_file(p).macs if e.is_reg else []) for p, e in snap.walk(b"/")]

    first = open_store(f"fs:{PLAIN}")
    cache1 = make(first, tmp_path)
    cache1.wrap_store(first)
    want = walk(first)
    cache1.flush()
    cold = first.stats()["store_bytes_read"]
    second = open_store(f"fs:{PLAIN}")
    cache2 = make(second, tmp_path)
    cache2.wrap_store(second)
    assert walk(second) == want == walk(plain_store())
    warm = second.stats()["store_bytes_read"]
    assert cache2.stats.disk_hits > 1000 and cache2.stats.disk_misses == 0
    assert warm < cold / 100, (warm, cold)  # the snapshot header only
