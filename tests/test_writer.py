"""The fixture writer, checked by reading its stores back through the project's reader and, for
the layout the reader does not use (packfile index and footer, states), by decoding the bytes
with codec primitives and comparing against the format spec."""

from __future__ import annotations

import io
import os
import stat
import struct
from pathlib import Path

import pytest

from kloset_blocks.errors import KlosetError, PassphraseError, UsageError
from kloset_blocks.store import codec as C
from kloset_blocks.store import open_store
from kloset_blocks.writer.chunker import entropy, iter_chunks, mac_hasher
from kloset_blocks.writer.pack import iter_state_locations
from kloset_blocks.writer.store import add_snapshot, open_existing, write_store
from tests.writer_helpers import CHEAP_KDF, TINY_CHUNKS, make_tree, rand_bytes, source_view, store_view

PASS = b"correct horse"


@pytest.fixture
def small_tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    make_tree(
        src,
        {
            b"big.bin": rand_bytes(1, 150_000),
            b"dir/text.txt": b"hello world\n" * 100,
            b"dir/sub/empty": b"",
            b"dir/sub/\xff\xfe-latin1-\xe9": rand_bytes(2, 5000),
            b"same-as-big": rand_bytes(1, 150_000),
        },
    )
    os.symlink(b"dir/text.txt", os.path.join(os.fsencode(src), b"link"))
    os.mkfifo(src / "fifo")
    os.chmod(src / "dir", 0o2750)
    os.chmod(src / "big.bin", 0o4755)
    return src


# ---------------------------------------------------------------- round trips by settings

SETTINGS = [
    # (passphrase, compression, hashing)
    (None, "LZ4", "BLAKE3"),
    (None, "GZIP", "SHA256"),
    (None, "ZSTD", "BLAKE3"),
    (None, None, "SHA256"),
    (PASS, "LZ4", "BLAKE3"),
    (PASS, "GZIP", "SHA256"),
    (PASS, "ZSTD", "SHA256"),
    (PASS, None, "BLAKE3"),
]


@pytest.mark.parametrize(("passphrase", "compression", "hashing"), SETTINGS)
def test_round_trip_by_settings(
    tmp_path: Path, small_tree: Path, passphrase: bytes | None, compression: str | None, hashing: str
) -> None:
    dest = tmp_path / "store"
    sid = write_store(
        dest,
        small_tree,
        passphrase=passphrase,
        compression=compression,
        hashing=hashing,
        seed=7,
        **TINY_CHUNKS,
        **CHEAP_KDF,
    )
    assert store_view(dest, sid[:8], passphrase) == source_view(small_tree)
    config, key = open_existing(dest, passphrase)
    assert config["Hashing"]["Algorithm"] == hashing
    assert (config["Compression"] or {}).get("Algorithm") == compression
    assert (config["Encryption"] is None) == (passphrase is None) == (key is None)
    with open_store(str(dest), None if passphrase is None else passphrase.decode()) as store:
        (info,) = store.snapshots()
        assert info.hex_id == sid
        assert info.importer_type == "fs"
        view = source_view(small_tree)
        regular = sum(v[1] for v in view.values() if stat.S_ISREG(v[0]))
        assert info.size == regular + sum(len(v[1]) for v in view.values() if stat.S_ISLNK(v[0]))


def test_wrong_or_missing_passphrase_is_refused(tmp_path: Path, small_tree: Path) -> None:
    dest = tmp_path / "store"
    write_store(dest, small_tree, passphrase=PASS, **CHEAP_KDF)
    with pytest.raises(PassphraseError, match="wrong passphrase"):
        add_snapshot(dest, small_tree, passphrase=b"nope")
    with pytest.raises(PassphraseError, match="passphrase is needed"):
        add_snapshot(dest, small_tree)


def test_refuses_a_non_empty_destination(tmp_path: Path, small_tree: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_bytes(b"x")
    with pytest.raises(UsageError, match="not an empty directory"):
        write_store(tmp_path / "busy", small_tree)
    empty = tmp_path / "empty"
    empty.mkdir()
    write_store(empty, small_tree)  # an empty directory is fine, as for `plakar create`
    assert (empty / "CONFIG").is_file()


def test_failed_write_leaves_nothing_visible(tmp_path: Path) -> None:
    class Broken(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, b: bytearray) -> int:
            raise OSError(5, "Input/output error")

    with pytest.raises(KlosetError):
        write_store(tmp_path / "store", Broken())
    assert sorted(os.listdir(tmp_path)) == []


def test_failed_add_snapshot_publishes_no_state(tmp_path: Path, small_tree: Path) -> None:
    dest = tmp_path / "store"
    write_store(dest, small_tree)
    states_before = sorted(dest.glob("states/*/*"))

    def items():  # a tar stream that breaks after its first member
        import tarfile

        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo("a")
            info.size = 100_000
            tar.addfile(info, io.BytesIO(rand_bytes(3, 100_000)))
        return io.BytesIO(buf.getvalue()[:50_000])

    with pytest.raises(KlosetError, match="cannot read /a"):
        add_snapshot(dest, items())
    assert sorted(dest.glob("states/*/*")) == states_before
    assert not list(dest.glob("packfiles/tmp.*"))
    with open_store(str(dest)) as store:
        assert len(store.snapshots()) == 1


# ---------------------------------------------------------------- layout the reader does not check


def _decode_packfile(path: Path, codec: C.Codec) -> list[tuple[int, bytes, int, int]]:
    """Independent decode of one packfile (§5.1): trailer, name, footer, index, index MAC."""
    raw = path.read_bytes()
    version, payload = C.unwrap(raw, C.RT_PACKFILE, codec.mac, str(path))
    assert version == C.pack_version(1, 0, 0)
    assert codec.mac(payload) == bytes.fromhex(path.name)  # name = MAC(payload), §5.4
    (flen,) = struct.unpack("<I", payload[-4:])
    footer = codec.decode(payload[-4 - flen : -4])
    assert len(footer) == 56
    _ts, count, index_offset, index_mac, flags = struct.unpack("<qIQ32sI", footer)
    assert flags == 0
    index = codec.decode(payload[index_offset : -4 - flen])
    assert len(index) == 56 * count
    assert codec.mac(index) == index_mac
    records = []
    for i in range(count):
        rtype, ver, mac, off, length, rflags = struct.unpack_from("<II32sQII", index, 56 * i)
        assert (ver, rflags) == (C.pack_version(1, 0, 0), 0)
        assert off + length <= index_offset
        if rtype in C.CONTENT_ADDRESSED:
            assert codec.mac(codec.decode(payload[off : off + length])) == mac
        records.append((rtype, mac, off, length))
    return records


def _decode_state(path: Path, codec: C.Codec) -> tuple[bytes, list[tuple], list[bytes]]:
    version, payload = C.unwrap(path.read_bytes(), C.RT_STATE, codec.mac, str(path))
    assert version == C.pack_version(1, 1, 0)
    stream = codec.decode(payload)
    parent, pos, locs, packs = stream[:32], 32, [], []
    while stream[pos] != 1:
        etype, length = struct.unpack_from("<BI", stream, pos)
        body = stream[pos + 5 : pos + 5 + length]
        if etype == 2:
            assert length == 85
            rtype, _ver, mac, pack, off, ln, _fl = struct.unpack("<BI32s32sQII", body)
            locs.append((rtype, mac, pack, off, ln))
        elif etype == 4:
            assert length == 72
            assert body[32:64] == bytes.fromhex(path.name)  # StateID
            packs.append(body[:32])
        pos += 5 + length
    assert len(stream) == pos + 1 + 4 + 8 + 16  # METADATA terminator, no length field
    return parent, locs, packs


@pytest.mark.parametrize("passphrase", [None, PASS])
def test_packfiles_and_state_layout(tmp_path: Path, small_tree: Path, passphrase: bytes | None) -> None:
    dest = tmp_path / "store"
    sid = write_store(
        dest, small_tree, passphrase=passphrase, packfile_max=20_000, **TINY_CHUNKS, **CHEAP_KDF
    )
    config, key = open_existing(dest, passphrase)
    codec = C.Codec(config, key)
    packs = {p.name: _decode_packfile(p, codec) for p in dest.glob("packfiles/*/*")}
    assert len(packs) > 3  # flushed at packfile_max, plus the metadata packfile
    for records in packs.values():
        assert records[0][0] == C.RT_RANDOM and records[0][2] == 0  # padding first, at offset 0
        assert records[-1][0] == C.RT_RANDOM
    (state,) = dest.glob("states/*/*")
    assert state.name == sid
    parent, locs, live = _decode_state(state, codec)
    assert parent == bytes(32)
    assert sorted(p.hex() for p in live) == sorted(packs)
    from_index = {(t, m, bytes.fromhex(name), o, n) for name, recs in packs.items() for t, m, o, n in recs}
    assert set(locs) == from_index
    assert len(locs) == len(from_index)  # no blob written twice
    types = {t for t, *_ in locs}
    assert {C.RT_SNAPSHOT, C.RT_VFS_BTREE, C.RT_ERROR_BTREE, C.RT_XATTR_BTREE, C.RT_CHUNK} <= types


def test_empty_xattr_and_error_trees(tmp_path: Path, small_tree: Path) -> None:
    dest = tmp_path / "store"
    write_store(dest, small_tree)
    with open_store(str(dest)) as store:
        src = store.snapshots()[0].header["sources"][0]["root"]
        assert src["errors"] == src["xattrs"]  # same bytes, so same MAC, stored under both types
        for root_t, node_t in ((C.RT_ERROR_BTREE, C.RT_ERROR_NODE), (C.RT_XATTR_BTREE, C.RT_XATTR_NODE)):
            root = store.read_record(root_t, src["errors"])
            assert root == {"Version": 0, "Order": 50, "Count": 0, "Root": root["Root"]}
            assert store.read_record(node_t, root["Root"]) == {
                "version": 0,
                "keys": None,
                "pointers": None,
                "values": None,
            }


# ---------------------------------------------------------------- B+tree shape


def _depth(store, mac: bytes) -> tuple[int, int]:
    """(depth, max keys per node) of the VFS tree below node `mac`."""
    node = store.read_record(C.RT_VFS_NODE, mac)
    most = len(node["keys"] or [])
    if not node["pointers"]:
        return 1, most
    assert len(node["pointers"]) == len(node["keys"]) + 1
    below = [_depth(store, p) for p in node["pointers"]]
    assert len({d for d, _ in below}) == 1  # balanced
    return below[0][0] + 1, max(most, *(m for _, m in below))


@pytest.mark.parametrize(("order", "paths", "min_depth"), [(3, 400, 6), (4, 120, 3), (50, 2000, 2)])
def test_btree_orders_read_back(tmp_path: Path, order: int, paths: int, min_depth: int) -> None:
    src = tmp_path / "src"
    make_tree(src, {f"d{i % 7}/e{i % 3}/f{i:05d}".encode(): str(i).encode() for i in range(paths)})
    dest = tmp_path / "store"
    write_store(dest, src, btree_order=order)
    want = source_view(src)
    assert store_view(dest) == want
    with open_store(str(dest)) as store:
        info = store.snapshots()[0]
        root = store.read_record(C.RT_VFS_BTREE, info.vfs_root)
        assert root["Order"] == order
        depth, most = _depth(store, root["Root"])
        assert depth >= min_depth
        assert most <= order - 1
        snap = store.open_snapshot()
        for path in want:  # every lookup descends the internal nodes
            assert snap.lookup(path).path == path
        with pytest.raises(KlosetError):
            snap.lookup("/d0/e0/missing")


# ---------------------------------------------------------------- chunker


@pytest.mark.parametrize(
    ("size", "sizes"),
    [
        (0, (64, 512, 2048)),
        (1, (64, 512, 2048)),
        (200_000, (64, 512, 2048)),
        (3_000_000, (4096, 65536, 262144)),
    ],
)
def test_chunker_splits_and_varies(size: int, sizes: tuple[int, int, int]) -> None:
    data = rand_bytes(size, size)
    chunks = list(iter_chunks(io.BytesIO(data), *sizes))
    assert b"".join(chunks) == data
    assert chunks == list(iter_chunks(io.BytesIO(data), *sizes))  # deterministic
    if size == 0:
        assert chunks == [b""]
        return
    assert all(0 < len(c) <= sizes[2] for c in chunks)
    assert all(len(c) >= sizes[0] for c in chunks[:-1])
    if size > 100 * sizes[1]:
        lengths = [len(c) for c in chunks]
        assert len(set(lengths)) > len(lengths) // 2  # sizes vary
        assert sum(1 for n in lengths if n % 4096 == 0) < len(lengths) // 10  # not 4 KiB aligned
        assert 0.5 * sizes[1] < size / len(chunks) < 1.5 * sizes[1]  # average near avg


def test_chunker_reads_in_bounded_pieces() -> None:
    class Stream(io.RawIOBase):
        largest = 0
        left = 5_000_000

        def readable(self) -> bool:
            return True

        def read(self, n: int = -1) -> bytes:
            assert n > 0  # never "read everything"
            Stream.largest = max(Stream.largest, n)
            n = min(n, Stream.left)
            Stream.left -= n
            return b"\x01" * n

    total = sum(len(c) for c in iter_chunks(Stream(), 1000, 8000, 30_000))
    assert total == 5_000_000
    assert Stream.largest <= 64 * 1024


@pytest.mark.parametrize(
    ("data", "want"), [(b"", 0.0), (b"aaaa", 0.0), (b"ab" * 10, 1.0), (bytes(range(256)), 8.0)]
)
def test_entropy(data: bytes, want: float) -> None:
    assert entropy(data) == pytest.approx(want)


@pytest.mark.parametrize("hashing", ["BLAKE3", "SHA256"])
def test_mac_hasher_matches_codec_mac(hashing: str) -> None:
    codec = C.Codec({"Hashing": {"Algorithm": hashing}, "RepositoryID": b"r" * 16}, None)
    h = mac_hasher(codec)
    for piece in (b"abc", b"", b"x" * 100_000):
        h.update(piece)
    assert h.digest() == codec.mac(b"abc" + b"x" * 100_000)


# ---------------------------------------------------------------- deduplication across snapshots


def _chunk_macs(store, snapshot: str) -> set[bytes]:
    snap = store.open_snapshot(snapshot)
    macs: set[bytes] = set()
    for _, entry in snap.walk():
        if entry.is_reg:
            macs.update(snap.chunk_list(entry)[0])
    return macs


@pytest.mark.parametrize("passphrase", [None, PASS])
def test_second_snapshot_adds_only_new_chunks(tmp_path: Path, passphrase: bytes | None) -> None:
    src = tmp_path / "src"
    big = rand_bytes(11, 400_000)
    make_tree(src, {b"base/1/1259": big, b"base/1/2600": rand_bytes(12, 50_000), b"PG_VERSION": b"15\n"})
    dest = tmp_path / "store"
    first = write_store(dest, src, passphrase=passphrase, **TINY_CHUNKS, **CHEAP_KDF)
    view_a = source_view(src)
    # change one 8 KiB page in place, add a file, delete a file
    changed = big[:200_000] + b"\x42" * 8192 + big[208_192:]
    make_tree(src, {b"base/1/1259": changed, b"base/1/new": rand_bytes(13, 30_000)})
    (src / "base/1/2600").unlink()
    second = add_snapshot(dest, src, passphrase=passphrase)
    assert store_view(dest, first, passphrase) == view_a
    assert store_view(dest, second, passphrase) == source_view(src)

    config, key = open_existing(dest, passphrase)
    codec = C.Codec(config, key)
    state = dest / "states" / second[:2] / second
    parent, locs, _ = _decode_state(state, codec)
    assert parent == bytes(32)
    added = {m for t, m, *_ in locs if t == C.RT_CHUNK}
    with open_store(str(dest), None if passphrase is None else passphrase.decode()) as store:
        old, new = _chunk_macs(store, first), _chunk_macs(store, second)
    assert added == new - old  # exactly the chunks the first snapshot lacks
    assert 0 < len(added) < len(new) // 5
    first_state = dest / "states" / first[:2] / first
    assert not {(t, m) for t, m, *_ in locs} & set(
        iter_state_locations(
            codec.decode(C.unwrap(first_state.read_bytes(), C.RT_STATE, None, "")[1]), 0x10100
        )
    )
