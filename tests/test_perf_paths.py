"""The fast decode path of MAC-checked blobs (Codec.decode(..., mac_checked=True): AES-GCM-SIV
segments decrypted into one buffer, LZ4 frames decoded block by block with liblz4) against the
reference path (python-lz4's frame decoder, per-segment decrypt + join): same bytes on Go-written
fixtures, on writer-made stores with every compression, on LZ4 frames of every shape; damaged or
truncated input is a CorruptionError, never a crash nor wrong bytes."""

from __future__ import annotations

import os
import random
from pathlib import Path

import lz4.frame
import pytest

from kloset_blocks.errors import CorruptionError
from kloset_blocks.store import Store, open_store
from kloset_blocks.store import codec as c
from kloset_blocks.writer.store import write_store
from tests.store_helpers import enc_store, plain_store
from tests.writer_helpers import rand_bytes

MiB = 1 << 20


def _every_blob(store: Store) -> list[tuple[int, bytes]]:
    return [(k[0], k[1:]) for k in store.index._loc if k[0] in c.CONTENT_ADDRESSED]


def _check_store(store: Store) -> int:
    """Every content-addressed blob: fast decode == reference decode, and its MAC matches.
    Returns the most LZ4 blocks seen in one plaintext frame."""
    blobs = _every_blob(store)
    assert blobs
    most = 0
    for rtype, mac in blobs:
        encoded = store.read_encoded(rtype, mac)
        if store.codec.compression == "LZ4" and not store.codec.encrypted:
            parsed = c._lz4_blocks(encoded)
            most = max(most, len(parsed[2]) if parsed else 0)
        ref = store.codec.decode(encoded)
        fast = store.codec.decode(encoded, mac_checked=True)
        # bytes, or a buffer the fast path did not copy (a view of a stored block, a trimmed bytearray)
        assert isinstance(fast, (bytes, bytearray, memoryview))
        assert bytes(fast) == ref
        assert store.codec.mac(fast) == mac
        assert store.read_blob(rtype, mac) == ref
    return most


@pytest.mark.parametrize("opener", [plain_store, enc_store], ids=["golden-plain", "golden-enc"])
def test_golden_fixtures_decode_the_same(opener) -> None:
    _check_store(opener())  # a shared, cached Store: not closed here


def _source(root: Path) -> dict[str, bytes]:
    files = {
        "empty": b"",
        "small": b"hello kloset\n" * 3,
        "random-9M": rand_bytes(1, 9 * MiB),  # > 4 MiB: multi-block frames of stored blocks
        "pages-6M": (b"\x00" * 4000 + rand_bytes(2, 96)) * (6 * MiB // 4096),  # compressed blocks
        "mixed": rand_bytes(3, 300_000) + b"abc" * 200_000,
    }
    root.mkdir()
    for name, data in files.items():
        (root / name).write_bytes(data)
    return files


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "enc"])
@pytest.mark.parametrize("compression", ["LZ4", "GZIP", "ZSTD", None])
def test_writer_stores_decode_the_same(tmp_path: Path, compression: str | None, encrypted: bool) -> None:
    files = _source(tmp_path / "src")
    kw = {"passphrase": b"pw", "kdf_time": 1, "kdf_memory_kib": 8192} if encrypted else {}
    # Big chunks so that LZ4 frames span several 4 MiB blocks.
    write_store(
        tmp_path / "store",
        str(tmp_path / "src"),
        compression=compression,
        chunk_min=1 * MiB,
        chunk_avg=6 * MiB,
        chunk_max=12 * MiB,
        **kw,
    )
    with open_store(f"fs://{tmp_path / 'store'}", "pw" if encrypted else None) as store:
        most = _check_store(store)
        if compression == "LZ4" and not encrypted:
            assert most >= 2  # frames of several 4 MiB blocks were exercised
        snap = store.open_snapshot()
        paths = {os.path.basename(p): p for p, _ in snap.walk()}
        for name, data in files.items():
            f = snap.open_file(paths[name.encode()])
            assert f.read(0, f.size) == data, name


# ---- LZ4 frames of every shape -------------------------------------------------------------------

_DATA = {
    "empty": b"",
    "one": b"x",
    "text": b"the quick brown fox " * 5000,
    "random": rand_bytes(4, 300_000),
    "mixed-5M": (rand_bytes(5, 70_000) + bytes(200_000)) * 19,
}
_FRAMES = [
    {"block_size": bs, "block_linked": ln, "content_checksum": cc, "block_checksum": bc, "store_size": ss}
    for bs in (lz4.frame.BLOCKSIZE_MAX64KB, lz4.frame.BLOCKSIZE_MAX4MB)
    for ln in (False, True)
    for cc in (False, True)
    for bc in (False, True)
    for ss in (False, True)
]


@pytest.mark.parametrize("name", list(_DATA))
def test_lz4_frames_of_every_shape(name: str) -> None:
    data = _DATA[name]
    for params in _FRAMES:
        frame = lz4.frame.compress(data, **params)
        assert c._lz4_decompress_fast(frame) == data, params
        assert c._lz4_decompress_fast(bytearray(frame)) == data, params
    # A frame written with uncompressed (stored) blocks only.
    frame = lz4.frame.compress(data, block_size=lz4.frame.BLOCKSIZE_MAX64KB, compression_level=-1)
    assert c._lz4_decompress_fast(frame) == data


def test_lz4_go_frames_use_liblz4() -> None:
    # The fast path is live on this machine (liblz4 from deps), not silently the fallback.
    assert c._LIBLZ4 is not None
    frame = c._lz4_compress(_DATA["mixed-5M"])
    assert c._lz4_blocks(frame) is not None


def test_lz4_unusual_frames_fall_back() -> None:
    data = _DATA["text"]
    frame = c._lz4_compress(data)
    # Trailing bytes after the frame: left to the frame decoder (which ignores them, as before).
    assert c._lz4_blocks(frame + b"junk") is None
    assert c._lz4_decompress_fast(frame + b"junk") == c._lz4_decompress(frame + b"junk")
    # Not a frame at all.
    assert c._lz4_blocks(b"not an lz4 frame") is None


def _codec(compression: str | None = "LZ4", encrypted: bool = False) -> c.Codec:
    config: dict = {"RepositoryID": b"r" * 16, "Hashing": {"Algorithm": "BLAKE3"}}
    if compression:
        config["Compression"] = {"Algorithm": compression}
    if encrypted:
        config["Encryption"] = {"DataAlgorithm": "AES256-GCM-SIV", "SubKeyAlgorithm": "AES256-KW"}
    return c.Codec(config, os.urandom(32) if encrypted else None)


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "enc"])
def test_truncated_or_damaged_blobs_are_corruption_errors(encrypted: bool) -> None:
    codec = _codec("LZ4", encrypted)
    data = _DATA["mixed-5M"][: 3 * MiB] + b"tail" * 1000
    blob = codec.encode(data)
    rng = random.Random(9)
    cuts = sorted(
        {0, 1, 5, 6, 7, 11, len(blob) - 1, len(blob) - 4} | {rng.randrange(len(blob)) for _ in range(40)}
    )
    for cut in cuts:
        with pytest.raises(CorruptionError):
            codec.decode(blob[:cut], "blob", mac_checked=True)
    for _ in range(60):
        bad = bytearray(blob)
        bad[rng.randrange(len(bad))] ^= 1 << rng.randrange(8)
        try:
            out = codec.decode(bytes(bad), "blob", mac_checked=True)
        except CorruptionError:
            continue
        # Undetected by the codec (plaintext LZ4 without checksums): the MAC check catches it.
        assert out == data or codec.mac(out) != codec.mac(data)


def test_encrypted_segments_into_one_buffer() -> None:
    codec = _codec(None, True)
    for size in (0, 1, 65536, 65537, 3 * 65536 + 5):
        plain = rand_bytes(size + 1, size)
        blob = codec.encrypt(plain)
        got = c._decrypt_into_one(codec.key, blob, codec.subkey_algorithm, codec.segment)
        assert bytes(got) == plain == codec.decrypt(blob)
        assert codec.decode(blob, mac_checked=True) == plain
        if size:
            with pytest.raises(CorruptionError):
                codec.decode(blob[:-20], mac_checked=True)


def test_truncated_packfile_is_a_corruption_error(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(rand_bytes(7, 3 * MiB))
    write_store(tmp_path / "store", str(src), compression="LZ4", padding=False)
    packs = sorted((tmp_path / "store" / "packfiles").rglob("*"), key=lambda p: p.stat().st_size)
    big = [p for p in packs if p.is_file()][-1]
    with open(big, "r+b") as fh:
        fh.truncate(big.stat().st_size // 2)
    with open_store(f"fs://{tmp_path / 'store'}") as store, pytest.raises(CorruptionError):
        snap = store.open_snapshot()
        path = next(p for p, _ in snap.walk() if p.endswith(b"/f"))
        f = snap.open_file(path)
        f.read(0, f.size)
