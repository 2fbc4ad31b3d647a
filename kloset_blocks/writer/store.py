# The test-fixture writer: builds Kloset stores (fs backend layout) that Plakar and our reader
# read like the ones Kloset's own snapshot builder writes (format §11.3 says what a writer may
# simplify; §17 and the golden fixtures fix the record shapes copied here).
#
# Strategy:
# - One pass over the source (writer_source): each regular file is chunked while it is read
#   (writer_chunker), its chunks and Object stored at once; only per-path metadata is kept.
# - Then: missing ancestors are synthesized (ModeDir|0750, epoch, uid 0, §17.2), paths sorted in
#   PathCmp order, one VFS Entry per path, the VFS B+tree (given order), empty xattr and error
#   trees (one MAC under both blob types, as Kloset stores them), the header with one source and
#   a root summary, then one state named by the snapshot id with a zero parent that lists only
#   the blobs this snapshot added.
# - Deduplication as Kloset does it: a blob (type, MAC) already in the store's states, or already
#   written in this run, is not written again; chunk MACs are computed before encoding, so a
#   known chunk is never compressed or encrypted.
# - Chunks and Objects go to "data" packfiles, everything else to a "metadata" packfile, like
#   Kloset v1.1.3's packers.
# - Visibility: a new store is built in a hidden sibling directory renamed into place at the end;
#   for add_snapshot, packfiles are renamed into place as they fill (unreferenced, so invisible)
#   and the state, renamed last, publishes the snapshot.
from __future__ import annotations

import os
import platform
import random
import shutil
import socket
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from msgpack import Timestamp

from kloset_blocks import __version__
from kloset_blocks.errors import KlosetError, PassphraseError, StoreError, UsageError
from kloset_blocks.store import codec as C
from kloset_blocks.store.codec import Codec
from kloset_blocks.store.config import CONFIG_VERSION
from kloset_blocks.store.gomode import (
    MODE_DEVICE,
    MODE_DIR,
    MODE_NAMED_PIPE,
    MODE_SETGID,
    MODE_SETUID,
    MODE_SOCKET,
    MODE_STICKY,
    MODE_SYMLINK,
)
from kloset_blocks.writer.chunker import check_sizes, content_type, entropy, iter_chunks, mac_hasher
from kloset_blocks.writer.pack import (
    BLOB_VERSION,
    STATE_VERSION,
    PackWriter,
    bucket_path,
    build_btree,
    iter_state_locations,
    state_stream,
    write_atomic,
)
from kloset_blocks.writer.source import Item
from kloset_blocks.writer.source import open_source as _open_source

RECORD_VERSION = C.pack_version(1, 0, 0)  # Object, Chunk, Entry, Header
MiB = 1 << 20
DEFAULT_CHUNKING = (512 * 1024, MiB, 8 * MiB)
DEFAULT_PACKFILE_MAX = 64 * MiB
COMPRESSIONS = ("LZ4", "GZIP", "ZSTD")
HASHINGS = ("BLAKE3", "SHA256")


@dataclass(slots=True)
class _Node:
    item: Item
    object: bytes = C.ZERO_MAC
    content_type: str = ""
    entropy: float = 0.0
    chunks: int = 0


# ---------------------------------------------------------------- store creation / opening


def _compression_config(compression: str | None) -> dict | None:
    if compression is None:
        return None
    if compression not in COMPRESSIONS:
        raise UsageError(f"unknown compression {compression!r} (choose LZ4, GZIP, ZSTD or none)")
    return {
        "Algorithm": compression,
        "Level": 131072 if compression == "LZ4" else -1,  # pierrec's Level9 constant, ignored
        "WindowSize": -1,
        "ChunkSize": -1,
        "BlockSize": -1,
        "EnableCRC": False,
    }


def _new_config(
    rng: random.Random,
    *,
    passphrase: bytes | None,
    compression: str | None,
    hashing: str,
    chunking: tuple[int, int, int],
    packfile_max: int,
    kdf_time: int,
    kdf_memory_kib: int,
    kdf_threads: int,
) -> tuple[dict, bytes | None]:
    if hashing not in HASHINGS:
        raise UsageError(f"unknown hashing {hashing!r} (choose BLAKE3 or SHA256)")
    config: dict = {
        "Timestamp": Timestamp.from_unix_nano(time.time_ns()),
        "RepositoryID": uuid.UUID(bytes=rng.randbytes(16), version=4).bytes,
        "Packfile": {"MinSize": 0, "AvgSize": 0, "MaxSize": packfile_max},
        # Our chunker is not FastCDC, but Kloset never re-chunks on read; the name keeps Go happy.
        "Chunking": {
            "Algorithm": "fastcdc-v1.0.0",
            "MinSize": chunking[0],
            "NormalSize": chunking[1],
            "MaxSize": chunking[2],
        },
        "Hashing": {"Algorithm": hashing, "Bits": 256},
        "Compression": _compression_config(compression),
        "Encryption": None,
    }
    if passphrase is None:
        return config, None
    kdf = {
        "KDF": "ARGON2ID",
        "Salt": os.urandom(16),
        "argon2id": {
            "SaltSize": 16,
            "Time": kdf_time,
            "Memory": kdf_memory_kib,
            "Threads": kdf_threads,
            "KeyLen": 32,
        },
    }
    key = C.derive_key(passphrase, kdf)
    config["Encryption"] = {
        "SubKeyAlgorithm": "AES256-KW",
        "DataAlgorithm": "AES256-GCM-SIV",
        "ChunkSize": 65536,
        "KDFParams": kdf,
        "Canary": C.make_canary(key),
    }
    return config, key


def _create_layout(root: Path, config: dict, key: bytes | None, all_buckets: bool) -> None:
    """CONFIG, packfiles/ and states/; with all_buckets, their 256 bucket directories as
    `plakar create` makes them (readers must not need them; otherwise made when first used)."""
    for kind in ("packfiles", "states"):
        (root / kind).mkdir(mode=0o700)
        for i in range(256 if all_buckets else 0):
            (root / kind / f"{i:02x}").mkdir(mode=0o700)
    raw = C.wrap(C.RT_CONFIG, CONFIG_VERSION, C.pack(config), C.config_mac(key))
    write_atomic(root / "CONFIG", raw, root)


def open_existing(root: Path, passphrase: bytes | None) -> tuple[dict, bytes | None]:
    """Decoded CONFIG and master key of a store, checked in plakar's order (§3.3)."""
    path = root / "CONFIG"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise StoreError(f"not a kloset store: {root} (no CONFIG file)") from None
    except OSError as e:
        raise StoreError(f"cannot read {path}: {e.strerror}") from None
    version, payload = C.unwrap(raw, C.RT_CONFIG, None, str(path))
    if version != CONFIG_VERSION:
        raise StoreError(f"unsupported store version {C.version_str(version)}: {root}")
    config = C.unpack(payload)
    key = None
    encryption = config.get("Encryption")
    if encryption is not None:
        if passphrase is None:
            raise PassphraseError(
                f"store {root} is encrypted: a passphrase is needed (PLAKAR_PASSPHRASE or --passphrase-file)"
            )
        key = C.derive_key(passphrase, encryption["KDFParams"])
        if not C.verify_canary(key, encryption["Canary"], encryption.get("SubKeyAlgorithm") or "AES256-KW"):
            raise PassphraseError(f"wrong passphrase for store {root}")
    C.unwrap(raw, C.RT_CONFIG, C.config_mac(key), str(path))
    return config, key


def existing_blobs(root: Path, codec: Codec) -> set[tuple[int, bytes]]:
    """(type, MAC) of every blob some state of the store locates."""
    found: set[tuple[int, bytes]] = set()
    states = root / "states"
    if not states.is_dir():
        return found
    for bucket in sorted(states.iterdir()):
        if not bucket.is_dir():
            continue
        for path in sorted(bucket.iterdir()):
            if path.name.startswith("tmp.") or not path.is_file():
                continue
            version, payload = C.unwrap(path.read_bytes(), C.RT_STATE, codec.mac, str(path))
            found.update(iter_state_locations(codec.decode(payload, str(path)), version))
    return found


# ---------------------------------------------------------------- snapshot builder


class _SnapshotBuilder:
    def __init__(
        self,
        root: Path,
        config: dict,
        codec: Codec,
        known: set[tuple[int, bytes]],
        rng: random.Random,
        *,
        chunking: tuple[int, int, int],
        btree_order: int,
        packfile_max: int,
        padding: bool,
    ) -> None:
        check_sizes(*chunking)
        if btree_order < 3:
            raise UsageError(f"B+tree order must be at least 3 (got {btree_order})")
        self.root = root
        self.config = config
        self.codec = codec
        self.known = known
        self.rng = rng
        self.chunking = chunking
        self.order = btree_order
        padding_max = min(chunking[0] - 1, 4096) if padding else 0
        self.data = PackWriter(root, codec, rng, packfile_max, padding_max)
        self.meta = PackWriter(root, codec, rng, packfile_max, padding_max)

    # -- blobs

    def put_blob(self, rtype: int, mac: bytes, plain: bytes, pack: PackWriter | None = None) -> bytes:
        if (rtype, mac) not in self.known:
            self.known.add((rtype, mac))
            (pack or self.meta).put(rtype, mac, self.codec.encode(plain))
        return mac

    def put_record(self, rtype: int, packed: bytes) -> bytes:
        return self.put_blob(rtype, self.codec.mac(packed), packed)

    # -- file content

    def store_content(self, stream: BinaryIO) -> tuple[bytes, str, float, int, int]:
        """(object MAC, content type, entropy, chunk count, size) of a stream."""
        whole = mac_hasher(self.codec)
        chunks = []
        ctype = None
        size = 0
        weighted = 0.0
        for data in iter_chunks(stream, *self.chunking):
            mac = self.codec.mac(data)
            whole.update(data)
            if ctype is None:
                ctype = content_type(data)
            ent = entropy(data)
            weighted += ent * len(data)
            size += len(data)
            if (C.RT_CHUNK, mac) not in self.known:
                self.put_blob(C.RT_CHUNK, mac, data, self.data)
            chunks.append(
                {
                    "version": RECORD_VERSION,
                    "contentMAC": mac,
                    "length": len(data),
                    "entropy": ent,
                    "flags": 0,
                }
            )
        avg = weighted / size if size else 0.0
        obj: dict = {"version": RECORD_VERSION, "contentMAC": whole.digest(), "chunks": chunks}
        obj["content_type"] = ctype or "text/plain"
        if avg:
            obj["entropy"] = avg
        obj["flags"] = 0
        packed = C.pack(obj)
        mac = self.put_blob(C.RT_OBJECT, self.codec.mac(packed), packed, self.data)
        return mac, obj["content_type"], avg, len(chunks), size

    # -- the whole snapshot

    def run(self, importer: str, items: Iterator[Item], hostname: str) -> bytes:
        started = time.time_ns()
        try:
            nodes = self._import(items)
            _synthesize_parents(nodes)
            order = sorted(nodes, key=lambda p: (p.count(b"/"), p))
            pairs = [(_s(p), self.put_record(C.RT_VFS_ENTRY, _entry(p, nodes[p]))) for p in order]
            vfs = build_btree(pairs, self.order, C.RT_VFS_NODE, C.RT_VFS_BTREE, self.put_record)
            errors = build_btree([], self.order, C.RT_ERROR_NODE, C.RT_ERROR_BTREE, self.put_record)
            xattrs = build_btree([], self.order, C.RT_XATTR_NODE, C.RT_XATTR_BTREE, self.put_record)
            snapshot_id = self.rng.randbytes(32)
            header = _header(
                snapshot_id,
                started,
                importer,
                hostname,
                {"root": vfs, "xattrs": xattrs, "errors": errors},
                _root_summary(nodes, order),
            )
            self.put_blob(C.RT_SNAPSHOT, snapshot_id, C.pack(header))
            self.data.flush()
            self.meta.flush()
        except BaseException:
            self.data.abort()
            self.meta.abort()
            raise
        locations = self.meta.locations + self.data.locations
        packfiles = self.meta.packfiles + self.data.packfiles
        stream = state_stream(snapshot_id, locations, packfiles, self.config["RepositoryID"])
        raw = C.wrap(C.RT_STATE, STATE_VERSION, self.codec.encode(stream), self.codec.mac)
        write_atomic(bucket_path(self.root, "states", snapshot_id), raw, self.root / "states")
        return snapshot_id

    def _import(self, items: Iterator[Item]) -> dict[bytes, _Node]:
        nodes: dict[bytes, _Node] = {}
        for item in items:
            node = _Node(item)
            if item.content is not None:
                try:
                    stored = self.store_content(item.content)
                except (OSError, EOFError, tarfile.TarError) as e:  # a failing disk, a truncated tar
                    raise KlosetError(f"cannot read {_s(item.path)} from the source: {e}") from None
                node.object, node.content_type, node.entropy, node.chunks, item.size = stored
                item.content = None
            nodes[item.path] = node  # a later tar member with the same path wins, as on extraction
        return nodes


def _s(path: bytes) -> str:
    return path.decode("utf-8", "surrogateescape")


def _parent(path: bytes) -> bytes:
    return path.rsplit(b"/", 1)[0] or b"/"


def _synthesize_parents(nodes: dict[bytes, _Node]) -> None:
    """Add every missing ancestor as Kloset does (§17.2); refuse a non-directory parent."""
    for path in [*nodes, b"/."]:  # b"/." makes sure an empty source still has its root
        while path != b"/":
            path = _parent(path)
            node = nodes.get(path)
            if node is None:
                name = b"/" if path == b"/" else path.rsplit(b"/", 1)[1]
                item = Item(path=path, name=name, mode=MODE_DIR | 0o750, size=0, mtime_ns=0, nlink=0)
                nodes[path] = _Node(item)
            elif not node.item.is_dir:
                raise KlosetError(f"source path {_s(path)} is not a directory but has entries below it")


def _entry(path: bytes, node: _Node) -> bytes:
    item = node.item
    entry: dict = {
        "version": RECORD_VERSION,
        "parent_path": _s(_parent(path)),
        "file_info": {
            "name": _s(item.name),
            "size": item.size,
            "mode": item.mode,
            "mod_time": Timestamp.from_unix_nano(item.mtime_ns),
            "dev": item.dev,
            "ino": item.ino,
            "uid": item.uid,
            "gid": item.gid,
            "nlink": item.nlink,
            "username": _s(item.username),
            "groupname": _s(item.groupname),
            "flags": 0,
        },
        "summary": None,
    }
    if item.symlink_target:
        entry["symlink_target"] = _s(item.symlink_target)
    entry["object"] = node.object
    if node.content_type:
        entry["content_type"] = node.content_type
    if node.entropy:
        entry["entropy"] = node.entropy
    if node.chunks:
        entry["chunks"] = node.chunks
    return C.pack(entry)


def _header(
    snapshot_id: bytes, started: int, importer: str, hostname: str, root: dict, summary: dict
) -> dict:
    context = [
        ("Hostname", hostname),
        ("Username", os.environ.get("USER", "")),
        ("OperatingSystem", sys.platform),
        ("MachineID", ""),
        ("CommandLine", "kloset-blocks writer"),
        ("ProcessID", str(os.getpid())),
        ("Architecture", {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())),
        ("NumCPU", str(os.cpu_count() or 1)),
        ("MaxProcs", str(os.cpu_count() or 1)),
        ("Client", f"kloset-blocks-writer/{__version__}"),
    ]
    return {
        "version": RECORD_VERSION,
        "identifier": snapshot_id,
        "timestamp": Timestamp.from_unix_nano(started),
        "duration": time.time_ns() - started,
        "identity": {"identifier": bytes(16), "public_key": None},
        "name": "default",
        "category": "",
        "environment": "",
        "perimeter": "",
        "job": "",
        "replicas": 1,
        "dataset": "",
        "data_classes": [],
        "classifications": [],
        "tags": [],
        "context": [{"key": k, "value": v} for k, v in context],
        "sources": [
            {
                "importer": {"type": importer, "origin": hostname, "directory": "/"},
                "context": [],
                "root": root,
                "indexes": [],
                "summary": summary,
            }
        ],
    }


# ---------------------------------------------------------------- summaries (kloset vfs/summary.go)

_COUNTS = ("directories", "files", "symlinks", "devices", "pipes", "sockets", "children")
_FLAGS = ("setuid", "setgid", "sticky")
_MIME = ("MIME_audio", "MIME_video", "MIME_image", "MIME_text", "MIME_application", "MIME_other")
_DIRECTORY_KEYS = (
    *_COUNTS,
    *_FLAGS,
    "objects",
    "chunks",
    "min_size",
    "max_size",
    "avg_size",
    "size",
    "min_mod_time",
    "max_mod_time",
    "min_entropy",
    "max_entropy",
    "sum_entropy",
    "avg_entropy",
    "hi_entropy",
    "lo_entropy",
    *_MIME,
    "errors",
)
_BELOW_KEYS = tuple(k for k in _DIRECTORY_KEYS if k not in ("avg_size", "sum_entropy", "avg_entropy"))


def _kind(mode: int) -> str:
    if mode & MODE_DIR:
        return "directories"
    if mode & MODE_SYMLINK:
        return "symlinks"
    if mode & MODE_DEVICE:
        return "devices"
    if mode & MODE_NAMED_PIPE:
        return "pipes"
    if mode & MODE_SOCKET:
        return "sockets"
    return "files"


def _min0(current: float, value: float) -> float:
    """Go's `if v < cur || cur == 0 { cur = v }`."""
    return value if (value < current or current == 0) else current


def _max0(current: float, value: float) -> float:
    return value if (value > current or current == 0) else current


def _add_file(d: dict, node: _Node) -> None:
    item = node.item
    d[_kind(item.mode)] += 1
    for flag, bit in zip(_FLAGS, (MODE_SETUID, MODE_SETGID, MODE_STICKY), strict=True):
        d[flag] += bool(item.mode & bit)
    if node.object != C.ZERO_MAC:
        d["objects"] += 1
        d["chunks"] += node.chunks
    mtime = item.mtime_ns // 1_000_000_000
    d["min_mod_time"] = _min0(d["min_mod_time"], mtime)
    d["max_mod_time"] = _max0(d["max_mod_time"], mtime)
    d["min_size"] = _min0(d["min_size"], item.size)
    d["max_size"] = _max0(d["max_size"], item.size)
    d["min_entropy"] = _min0(d["min_entropy"], node.entropy)
    d["max_entropy"] = _max0(d["max_entropy"], node.entropy)
    if node.entropy <= 2.0:
        d["lo_entropy"] += 1
    elif node.entropy >= 7.0:
        d["hi_entropy"] += 1
    if node.content_type:
        major = node.content_type.split("/", 1)[0]
        key = f"MIME_{major}" if major in ("text", "image", "audio", "video", "application") else "MIME_other"
        d[key] += 1
    d["size"] += item.size
    d["sum_entropy"] += node.entropy


def _add_below(below: dict, child: dict) -> None:
    """Go's Summary.UpdateBelow: fold a child directory's summary into `below`."""
    for part in (child["below"], child["directory"]):
        for key in (
            *_COUNTS,
            *_FLAGS,
            "objects",
            "chunks",
            "size",
            "hi_entropy",
            "lo_entropy",
            *_MIME,
            "errors",
        ):
            below[key] += part[key]
        for key in ("min_size", "min_mod_time", "min_entropy"):
            below[key] = part[key] if below[key] == 0 or part[key] < below[key] else below[key]
        for key in ("max_size", "max_mod_time", "max_entropy"):
            below[key] = part[key] if below[key] == 0 or part[key] > below[key] else below[key]


def _root_summary(nodes: dict[bytes, _Node], order: list[bytes]) -> dict:
    """The root directory's Summary {directory, below}, folded bottom-up over all directories."""
    summaries: dict[bytes, dict] = {}
    for path in reversed(order):  # deepest first
        node = nodes[path]
        if path != b"/":
            parent = summaries.setdefault(_parent(path), _empty_summary())
            parent["directory"]["children"] += 1
            if node.item.is_dir:
                parent["directory"]["directories"] += 1
                _add_below(parent["below"], summaries.pop(path, None) or _empty_summary())
            else:
                _add_file(parent["directory"], node)
    root = summaries.get(b"/") or _empty_summary()
    directory = root["directory"]
    if directory["files"]:
        directory["avg_size"] = directory["size"] // directory["files"]
        directory["avg_entropy"] = directory["sum_entropy"] / directory["files"]
    return {
        "directory": {k: directory[k] for k in _DIRECTORY_KEYS if directory[k]},
        "below": {k: root["below"][k] for k in _BELOW_KEYS if root["below"][k] or k == "errors"},
    }


def _empty_summary() -> dict:
    return {"directory": dict.fromkeys(_DIRECTORY_KEYS, 0), "below": dict.fromkeys(_DIRECTORY_KEYS, 0)}


# ---------------------------------------------------------------- public API


def write_store(
    dest_dir: str | os.PathLike,
    source: object,
    *,
    passphrase: bytes | None = None,
    compression: str | None = "LZ4",
    hashing: str = "BLAKE3",
    chunk_min: int = DEFAULT_CHUNKING[0],
    chunk_avg: int = DEFAULT_CHUNKING[1],
    chunk_max: int = DEFAULT_CHUNKING[2],
    btree_order: int = 50,
    packfile_max: int = DEFAULT_PACKFILE_MAX,
    padding: bool = True,
    kdf_time: int = 4,
    kdf_memory_kib: int = 262144,
    kdf_threads: int = 1,
    seed: int | None = None,
    hostname: str | None = None,
    all_buckets: bool = False,
) -> str:
    """Create a new store at `dest_dir` holding one snapshot of `source` (a directory, a tar
    file, "-" for a tar on stdin, or a binary file object with a tar stream). Returns the
    snapshot id as 64 hex digits. `dest_dir` must not exist or be an empty directory."""
    dest = Path(os.fspath(dest_dir)).absolute()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UsageError(f"cannot create a store at {dest}: it exists and is not an empty directory")
    rng = random.Random(seed)
    chunking = (chunk_min, chunk_avg, chunk_max)
    check_sizes(*chunking)
    importer, items = _open_source(source)
    config, key = _new_config(
        rng,
        passphrase=passphrase,
        compression=compression,
        hashing=hashing,
        chunking=chunking,
        packfile_max=packfile_max,
        kdf_time=kdf_time,
        kdf_memory_kib=kdf_memory_kib,
        kdf_threads=kdf_threads,
    )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{random.getrandbits(32):08x}"
    try:
        tmp.mkdir(mode=0o700)
        _create_layout(tmp, config, key, all_buckets)
        builder = _SnapshotBuilder(
            tmp,
            config,
            Codec(config, key),
            set(),
            rng,
            chunking=chunking,
            btree_order=btree_order,
            packfile_max=packfile_max,
            padding=padding,
        )
        snapshot_id = builder.run(importer, items, hostname or socket.gethostname())
        os.rename(tmp, dest)  # replaces an empty directory atomically
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return snapshot_id.hex()


def add_snapshot(
    store_dir: str | os.PathLike,
    source: object,
    *,
    passphrase: bytes | None = None,
    chunk_min: int | None = None,
    chunk_avg: int | None = None,
    chunk_max: int | None = None,
    btree_order: int = 50,
    packfile_max: int | None = None,
    padding: bool = True,
    seed: int | None = None,
    hostname: str | None = None,
) -> str:
    """Add one snapshot of `source` to an existing store, writing only blobs the store lacks.
    Chunk sizes default to the store's CONFIG (so unchanged content deduplicates)."""
    root = Path(os.fspath(store_dir)).absolute()
    config, key = open_existing(root, passphrase)
    codec = Codec(config, key)
    chunk_cfg = config.get("Chunking") or {}
    chunking = (
        chunk_min or int(chunk_cfg.get("MinSize") or DEFAULT_CHUNKING[0]),
        chunk_avg or int(chunk_cfg.get("NormalSize") or DEFAULT_CHUNKING[1]),
        chunk_max or int(chunk_cfg.get("MaxSize") or DEFAULT_CHUNKING[2]),
    )
    check_sizes(*chunking)
    importer, items = _open_source(source)
    builder = _SnapshotBuilder(
        root,
        config,
        codec,
        existing_blobs(root, codec),
        random.Random(seed),
        chunking=chunking,
        btree_order=btree_order,
        packfile_max=packfile_max
        or int((config.get("Packfile") or {}).get("MaxSize") or DEFAULT_PACKFILE_MAX),
        padding=padding,
    )
    return builder.run(importer, items, hostname or socket.gethostname()).hex()


def is_store(path: str | os.PathLike) -> bool:
    return (Path(os.fspath(path)) / "CONFIG").is_file()


__all__ = ["BLOB_VERSION", "add_snapshot", "is_store", "open_existing", "write_store"]
