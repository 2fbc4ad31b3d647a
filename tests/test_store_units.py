# Table-driven unit tests of the reader's pieces: codec, locations, Go mode mapping, and the
# state merge (topological order, DELETE, COLOURED, unknown entries, 1.0.0 states).
from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import pytest

from kloset_blocks.errors import CorruptionError, StoreError
from kloset_blocks.store import LocationIndex, go_mode_to_st_mode, parse_location
from kloset_blocks.store import codec as c
from kloset_blocks.store.snapshot import clean_path
from tests.store_helpers import PLAIN

# ---------------------------------------------------------------- codec


def _config(compression: str | None, hashing: str, encrypted: bool) -> dict:
    enc = {"SubKeyAlgorithm": "AES256-KW", "DataAlgorithm": "AES256-GCM-SIV", "ChunkSize": 65536}
    return {
        "RepositoryID": bytes(range(16)),
        "Hashing": {"Algorithm": hashing, "Bits": 256},
        "Compression": {"Algorithm": compression} if compression else None,
        "Encryption": enc if encrypted else None,
    }


@pytest.mark.parametrize("compression", ["LZ4", "GZIP", "ZSTD", None])
@pytest.mark.parametrize("hashing", ["BLAKE3", "SHA256"])
@pytest.mark.parametrize("encrypted", [False, True])
def test_codec_round_trip(compression: str | None, hashing: str, encrypted: bool) -> None:
    codec = c.Codec(_config(compression, hashing, encrypted), os.urandom(32) if encrypted else None)
    for data in (b"", b"x", os.urandom(70000), bytes(5 << 20)):
        assert codec.decode(codec.encode(data)) == data
    if encrypted:
        blob = bytearray(codec.encode(b"hello" * 1000))
        blob[-1] ^= 1
        with pytest.raises(CorruptionError, match="cannot decrypt"):
            codec.decode(bytes(blob), "blob X")


@pytest.mark.parametrize(
    ("compression", "encrypted", "size"),
    [("LZ4", False, 15), ("ZSTD", False, 0), (None, True, 40), ("LZ4", True, 40 + 15 + 28)],
)
def test_empty_encodings(compression: str | None, encrypted: bool, size: int) -> None:
    codec = c.Codec(_config(compression, "BLAKE3", encrypted), os.urandom(32) if encrypted else None)
    assert len(codec.encode(b"")) == size


def test_plaintext_mac_secret_is_hash_of_repository_id() -> None:
    import blake3

    codec = c.Codec(_config("LZ4", "BLAKE3", False), None)
    secret = blake3.blake3(bytes(range(16))).digest()
    assert codec.mac(b"abc") == blake3.blake3(b"abc", key=secret).digest()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b"_NOTKLO_" + b[8:], "not a kloset object"),
        (lambda b: b[:8] + struct.pack("<I", 4) + b[12:], "resource type is packfile, expected state"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "MAC mismatch"),
        (lambda b: b[:20], "not a kloset object"),
    ],
)
def test_unwrap_errors(mutate, message: str) -> None:
    mac = c.config_mac(None)
    good = c.wrap(c.RT_STATE, c.pack_version(1, 1, 0), b"payload", mac)
    assert c.unwrap(good, c.RT_STATE, mac, "x") == (0x00010100, b"payload")
    assert c.unwrap(b"_PLAKAR_" + good[8:], c.RT_STATE, None, "x")[1] == b"payload"
    with pytest.raises(CorruptionError, match=f"the-file: .*{message}|the-file: {message}"):
        c.unwrap(mutate(good), c.RT_STATE, mac, "the-file")


def test_canary() -> None:
    key = os.urandom(32)
    canary = c.make_canary(key)
    assert len(canary) == 100 and c.verify_canary(key, canary) and not c.verify_canary(os.urandom(32), canary)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"Hashing": {"Algorithm": "MD5"}}, "unsupported hashing"),
        ({"Compression": {"Algorithm": "BROTLI"}}, "unsupported compression"),
    ],
)
def test_codec_refuses_unknown_algorithms(config: dict, message: str) -> None:
    with pytest.raises(StoreError, match=message):
        c.Codec({**_config("LZ4", "BLAKE3", False), **config}, None)


# ---------------------------------------------------------------- locations and paths


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("fs:/var/b", "/var/b"),
        ("fs:///var/b", "/var/b"),
        ("FS:/var/b", "/var/b"),
        ("/var/b/", "/var/b"),
        ("C:/x", os.path.join(os.getcwd(), "C:/x")),
        ("rel/dir", os.path.join(os.getcwd(), "rel/dir")),
    ],
)
def test_parse_location(location: str, expected: str) -> None:
    loc = parse_location(location)
    assert (loc.scheme, loc.path) == ("fs", expected)


@pytest.mark.parametrize(
    ("location", "fields"),
    [
        ("s3://127.0.0.1:9000/bkt", ("s3", "127.0.0.1", 9000, None, "bkt", "")),
        ("S3://s3.example.com/bkt/a/b/", ("s3", "s3.example.com", None, None, "bkt", "a/b/")),
        ("s3://[::1]:81/bkt/p", ("s3", "::1", 81, None, "bkt", "p/")),
        ("sftp://backup@host:2222/srv/store", ("sftp", "host", 2222, "backup", "", "/srv/store")),
        ("sftp://host/srv/store/", ("sftp", "host", None, None, "", "/srv/store")),
    ],
)
def test_parse_remote_location(location: str, fields: tuple) -> None:
    loc = parse_location(location)
    assert (loc.scheme, loc.host, loc.port, loc.user, loc.bucket, loc.path) == fields
    assert loc.remote and loc.display == location


@pytest.mark.parametrize(
    "location",
    [
        "s3:b",
        "s3://host",
        "s3://host:99999/b",
        "sftp://h",
        "sftp://h/",
        "ftp://h/x",
        "ptar:/x",
        "/x/y.ptar",
        "",
    ],
)
def test_parse_location_refuses(location: str) -> None:
    with pytest.raises(StoreError):
        parse_location(location)


@pytest.mark.parametrize(
    ("path", "clean"),
    [(b"/", b"/"), (b"", b"/"), (b"a/b", b"/a/b"), (b"//a/./b/../c/", b"/a/c"), (b"/../..", b"/")],
)
def test_clean_path(path: bytes, clean: bytes) -> None:
    assert clean_path(path) == clean


# ---------------------------------------------------------------- Go FileMode -> st_mode

D, L, DEV, P, S, SU, SG, CD, ST = (
    1 << 31,
    1 << 27,
    1 << 26,
    1 << 25,
    1 << 24,
    1 << 23,
    1 << 22,
    1 << 21,
    1 << 20,
)


@pytest.mark.parametrize(
    ("go", "target", "st_mode"),
    [
        (0o644, None, stat.S_IFREG | 0o644),
        (D | 0o750, None, stat.S_IFDIR | 0o750),
        (L | 0o777, b"x", stat.S_IFLNK | 0o777),
        (0o777, b"x", stat.S_IFLNK | 0o777),  # tar symlink stored as a regular file (§17.3)
        (P | 0o600, None, stat.S_IFIFO | 0o600),
        (S | 0o755, None, stat.S_IFSOCK | 0o755),
        (DEV | CD | 0o666, None, stat.S_IFCHR | 0o666),
        (CD | 0o666, None, stat.S_IFCHR | 0o666),
        (DEV | 0o660, None, stat.S_IFBLK | 0o660),
        (SU | SG | 0o755, None, stat.S_IFREG | 0o6755),  # Go's flags
        (D | ST | 0o777, None, stat.S_IFDIR | 0o1777),
        (0o4755, None, stat.S_IFREG | 0o4755),  # tar's low bits (§17.5)
        (D | 0o3777, None, stat.S_IFDIR | 0o3777),
    ],
)
def test_go_mode_to_st_mode(go: int, target: bytes | None, st_mode: int) -> None:
    assert go_mode_to_st_mode(go, target) == st_mode


# ---------------------------------------------------------------- states

PF1, PF2 = b"\x01" * 32, b"\x02" * 32
BLOB, SNAP = b"\xaa" * 32, b"\x5e" * 32


def loc(rtype: int, mac: bytes, pf: bytes, off: int = 0, length: int = 10, version: int = 0x10000) -> tuple:
    return (2, struct.pack("<BI32s32sQII", rtype, version, mac, pf, off, length, 0))


def packfile(pf: bytes) -> tuple:
    return (4, struct.pack("<32s32sQ", pf, b"\0" * 32, 0))


def coloured(rtype: int, mac: bytes) -> tuple:
    return (3, struct.pack("<B32sQ", rtype, mac, 0))


def delete(etype: int, rtype: int, mac: bytes, pf: bytes) -> tuple:
    return (6, struct.pack("<BB32s32s", etype, rtype, mac, pf))


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    (tmp_path / "CONFIG").write_bytes((PLAIN / "CONFIG").read_bytes())
    return tmp_path


def _codec() -> c.Codec:
    _, payload = c.unwrap((PLAIN / "CONFIG").read_bytes(), c.RT_CONFIG, None, "CONFIG")
    return c.Codec(c.unpack(payload), None)


def write_state(
    root: Path, ident: bytes, entries: list, parent: bytes | None = bytes(32), ts: int = 0
) -> None:
    codec = _codec()
    stream = b"" if parent is None else parent
    for etype, body in entries:
        stream += struct.pack("<BI", etype, len(body)) + body
    stream += b"\x01" + struct.pack("<IQ16s", 0x10100, ts, b"\0" * 16)
    version = c.pack_version(1, 0, 0) if parent is None else c.pack_version(1, 1, 0)
    path = root / "states" / ident.hex()[:2] / ident.hex()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(c.wrap(c.RT_STATE, version, codec.encode(stream), codec.mac))


S1, S2, S3 = b"\x11" * 32, b"\x22" * 32, b"\x33" * 32


@pytest.mark.parametrize(
    ("states", "blob_packfiles", "snapshots"),
    [
        # A location needs a PACKFILE entry to be visible.
        ([(S1, [loc(9, BLOB, PF1)], None, 0)], [], []),
        ([(S1, [loc(9, BLOB, PF1), packfile(PF1)], None, 0)], [PF1], []),
        # Spread across states (one per backup, zero parents): merged.
        ([(S1, [loc(9, BLOB, PF1)], bytes(32), 0), (S2, [packfile(PF1)], bytes(32), 1)], [PF1], []),
        # Coloured packfile: condemned.
        ([(S1, [loc(9, BLOB, PF1), packfile(PF1), coloured(4, PF1)], bytes(32), 0)], [], []),
        # Two copies; DELETE of one in a child state whose timestamp is *older* (topo order wins).
        (
            [
                (S1, [loc(9, BLOB, PF1), loc(9, BLOB, PF2), packfile(PF1), packfile(PF2)], bytes(32), 5),
                (S2, [delete(2, 9, BLOB, PF1)], S1, 1),
            ],
            [PF2],
            [],
        ),
        # DELETE of the PACKFILE entry.
        (
            [
                (S1, [loc(9, BLOB, PF1), packfile(PF1)], bytes(32), 0),
                (S2, [delete(4, 0, b"\0" * 32, PF1)], S1, 1),
            ],
            [],
            [],
        ),
        # A coloured snapshot is deleted; un-colouring brings it back.
        ([(S1, [loc(5, SNAP, PF1), packfile(PF1), coloured(5, SNAP)], bytes(32), 0)], [], []),
        (
            [
                (S1, [loc(5, SNAP, PF1), packfile(PF1), coloured(5, SNAP)], bytes(32), 0),
                (S3, [delete(3, 5, SNAP, b"\0" * 32)], S1, 1),
            ],
            [],
            [SNAP],
        ),
        # Unknown entry types are skipped by length; type 6 means nothing in a 1.0.0 state.
        (
            [(S1, [(42, b"whatever"), loc(9, BLOB, PF1), packfile(PF1), delete(4, 0, BLOB, PF1)], None, 0)],
            [PF1],
            [],
        ),
    ],
    ids=[
        "no-packfile",
        "one",
        "merged",
        "coloured-pf",
        "delete-loc-topo",
        "delete-pf",
        "rm-snap",
        "uncolour",
        "v1.0",
    ],
)
def test_state_merge(
    store_dir: Path, states: list, blob_packfiles: list[bytes], snapshots: list[bytes]
) -> None:
    for ident, entries, parent, ts in states:
        write_state(store_dir, ident, entries, parent, ts)
    index = LocationIndex.build(str(store_dir), _codec())
    assert [loc.packfile for loc in index.locations(9, BLOB)] == blob_packfiles
    assert index.locations(7, BLOB) == []  # keyed by (type, mac)
    assert index.snapshot_ids() == snapshots


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([(2, b"short")], "entry type 2 has length 5, expected 85"),
        ([(4, b"x" * 71)], "entry type 4 has length 71, expected 72"),
    ],
)
def test_bad_state_records(store_dir: Path, entries: list, message: str) -> None:
    write_state(store_dir, S1, entries)
    index = LocationIndex.build(str(store_dir), _codec())  # left out, and said why
    assert len(index.damaged) == 1 and message in index.damaged[0][1] and message in index.damage_note()


def test_truncated_state_stream(store_dir: Path) -> None:
    codec = _codec()
    path = store_dir / "states" / "11" / S1.hex()
    path.parent.mkdir(parents=True)
    stream = bytes(32) + struct.pack("<BI", 2, 85) + b"x" * 40
    path.write_bytes(c.wrap(c.RT_STATE, c.pack_version(1, 1, 0), codec.encode(stream), codec.mac))
    index = LocationIndex.build(str(store_dir), codec)
    assert "truncated record stream" in index.damaged[0][1]


def test_newer_blob_version_refused_on_read(store_dir: Path) -> None:
    from kloset_blocks.errors import UnsupportedVersion
    from kloset_blocks.store.packfile import Packfiles

    write_state(store_dir, S1, [loc(9, BLOB, PF1, version=c.pack_version(1, 1, 0)), packfile(PF1)])
    codec = _codec()
    packs = Packfiles(str(store_dir), codec, LocationIndex.build(str(store_dir), codec))
    with pytest.raises(UnsupportedVersion, match=r"unsupported chunk blob version 1\.1\.0"):
        packs.read(9, BLOB)
