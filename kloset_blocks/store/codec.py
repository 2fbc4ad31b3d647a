# Byte-level codecs shared by the Kloset reader and the fixture writer: the storage wrapper
# (magic, type, version, MAC trailer), the store MAC (§3.2), key derivation and canary (§3.3),
# blob encoding = encrypt(compress(x)) (§4) and msgpack conventions (§14.2).
#
# Invariants:
# - Both directions live here so that writer and reader cannot drift apart.
# - Decoding never returns unchecked garbage silently: a failed decrypt (tag, key unwrap) or a
#   malformed compressed stream raises CorruptionError naming `what`.
# - Everything is pure and thread-safe: no state is mutated after Codec.__init__, and the
#   primitives (cryptography, lz4, zlib, blake3) release the GIL for the heavy work.
# - Blobs whose MAC is checked after decoding (content-addressed: chunks, objects, tree nodes) take
#   a faster path (`decode(..., mac_checked=True)`): AES-GCM-SIV segments are decrypted into one
#   buffer and LZ4 frames are decoded block by block with liblz4 into one buffer, without the
#   frame's xxh32 checksums (the keyed MAC over the plaintext is the stronger check and follows).
#   Anything unusual in the frame falls back to python-lz4's frame decoder, so both paths give the
#   same bytes or the same kind of error.
# - Imports are lazy where a store may not need them (startup of the nbdkit plugin is on the
#   time-to-first-query path): cryptography only for an encrypted store, zstandard/gzip/python-lz4's
#   frame module only when the store's compression (or the LZ4 fallback) asks for them, and liblz4 is
#   opened by its soname before falling back to ctypes.util.find_library (which runs ldconfig).
# - msgpack: timestamp=0 (msgpack.Timestamp, robust outside years 1..9999), strings are Go byte
#   strings decoded with surrogateescape so any name round-trips to the same bytes.
from __future__ import annotations

import ctypes
import hashlib
import hmac
import os
import struct
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import blake3
import msgpack

from kloset_blocks.errors import CorruptionError, PassphraseError, StoreError


def _crypto() -> Any:
    """The cryptography primitives, imported on first use (a plaintext store never needs them)."""
    global _CRYPTO
    if _CRYPTO is None:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives import keywrap
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESGCMSIV

        _CRYPTO = SimpleNamespace(
            AESGCM=AESGCM,
            AESGCMSIV=AESGCMSIV,
            keywrap=keywrap,
            errors=(InvalidTag, keywrap.InvalidUnwrap, ValueError),
        )
    return _CRYPTO


_CRYPTO: Any = None

# Decoded data as the fast paths return it: bytes, or a buffer they did not copy into bytes.
Buffer = bytes | bytearray | memoryview

RT_CONFIG = 1
RT_LOCK = 2
RT_STATE = 3
RT_PACKFILE = 4
RT_SNAPSHOT = 5
RT_SIGNATURE = 6
RT_OBJECT = 7
RT_CHUNK = 9
RT_VFS_BTREE = 10
RT_VFS_NODE = 11
RT_VFS_ENTRY = 12
RT_ERROR_BTREE = 13
RT_ERROR_NODE = 14
RT_ERROR_ENTRY = 15
RT_XATTR_BTREE = 16
RT_XATTR_NODE = 17
RT_XATTR_ENTRY = 18
RT_BTREE_ROOT = 19
RT_BTREE_NODE = 20
RT_VFS_SUMMARY = 21
RT_RANDOM = 255

RT_NAMES = {
    RT_CONFIG: "config",
    RT_LOCK: "lock",
    RT_STATE: "state",
    RT_PACKFILE: "packfile",
    RT_SNAPSHOT: "snapshot",
    RT_SIGNATURE: "signature",
    RT_OBJECT: "object",
    RT_CHUNK: "chunk",
    RT_VFS_BTREE: "vfs btree",
    RT_VFS_NODE: "vfs node",
    RT_VFS_ENTRY: "vfs entry",
    RT_ERROR_BTREE: "error btree",
    RT_ERROR_NODE: "error node",
    RT_ERROR_ENTRY: "error entry",
    RT_XATTR_BTREE: "xattr btree",
    RT_XATTR_NODE: "xattr node",
    RT_XATTR_ENTRY: "xattr entry",
    RT_BTREE_ROOT: "btree root",
    RT_BTREE_NODE: "btree node",
    RT_VFS_SUMMARY: "vfs summary",
    RT_RANDOM: "random",
}

# Blob ids that are MAC(plaintext) (§3.2); snapshot/signature/random ids are random values.
CONTENT_ADDRESSED = frozenset(
    {
        RT_OBJECT,
        RT_CHUNK,
        RT_VFS_BTREE,
        RT_VFS_NODE,
        RT_VFS_ENTRY,
        RT_ERROR_BTREE,
        RT_ERROR_NODE,
        RT_ERROR_ENTRY,
        RT_XATTR_BTREE,
        RT_XATTR_NODE,
        RT_XATTR_ENTRY,
        RT_BTREE_ROOT,
        RT_BTREE_NODE,
        RT_VFS_SUMMARY,
    }
)

MAGIC = b"_KLOSET_"
LEGACY_MAGIC = b"_PLAKAR_"
HEADER_SIZE = 16
TRAILER_SIZE = 32
MAC_SIZE = 32

_HEADER = struct.Struct("<8sII")

Mac = Callable[[bytes], bytes]
# An absent MAC or id (no object, no parent state): 32 zero bytes, as Kloset writes it.
ZERO_MAC = bytes(32)


def pack_version(major: int, minor: int, patch: int) -> int:
    return (major << 16) | (minor << 8) | patch


def version_str(version: int) -> str:
    return f"{version >> 16}.{(version >> 8) & 0xFF}.{version & 0xFF}"


def rt_name(rtype: int) -> str:
    return RT_NAMES.get(rtype, f"type {rtype}")


# ---------------------------------------------------------------- msgpack


def unpack(data: bytes) -> Any:
    """Decode one msgpack value the way every Kloset record is read (raises on malformed input)."""
    return msgpack.unpackb(
        data, raw=False, timestamp=0, strict_map_key=False, unicode_errors="surrogateescape"
    )


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True, unicode_errors="surrogateescape", datetime=False)


def timestamp_ns(value: Any) -> int:
    """Nanoseconds since the epoch of a msgpack ext -1 timestamp (None/missing -> 0)."""
    if isinstance(value, msgpack.Timestamp):
        return value.seconds * 1_000_000_000 + value.nanoseconds
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    raise ValueError(f"not a timestamp: {value!r}")


# ---------------------------------------------------------------- storage wrapper (§2)


def wrap(rtype: int, version: int, payload: bytes, mac: Mac) -> bytes:
    body = _HEADER.pack(MAGIC, rtype, version) + payload
    return body + mac(body)


def unwrap(data: bytes, rtype: int, mac: Mac | None, what: str) -> tuple[int, bytes]:
    """Check magic, type and (when `mac` is given) the trailer; return (version, payload)."""
    if len(data) < HEADER_SIZE + TRAILER_SIZE:
        raise CorruptionError(f"{what}: not a kloset object (only {len(data)} bytes)")
    magic, found, version = _HEADER.unpack_from(data)
    if magic not in (MAGIC, LEGACY_MAGIC):
        raise CorruptionError(f"{what}: not a kloset object (bad magic {magic!r})")
    if found != rtype:
        raise CorruptionError(f"{what}: resource type is {rt_name(found)}, expected {rt_name(rtype)}")
    if mac is not None and not hmac.compare_digest(mac(data[:-TRAILER_SIZE]), data[-TRAILER_SIZE:]):
        raise CorruptionError(f"{what}: MAC mismatch (file damaged or wrong key)")
    return version, data[HEADER_SIZE:-TRAILER_SIZE]


# ---------------------------------------------------------------- keys and MACs (§3)


def derive_key(passphrase: bytes, kdf_params: dict) -> bytes:
    kdf = kdf_params.get("KDF")
    salt = kdf_params.get("Salt") or b""
    if kdf == "ARGON2ID":
        from argon2.low_level import Type, hash_secret_raw

        p = kdf_params.get("argon2id") or {}
        return hash_secret_raw(
            passphrase,
            salt,
            time_cost=int(p.get("Time", 4)),
            memory_cost=int(p.get("Memory", 262144)),
            parallelism=int(p.get("Threads", 1)),
            hash_len=int(p.get("KeyLen", 32)),
            type=Type.ID,
            version=19,
        )
    if kdf == "SCRYPT":
        p = kdf_params.get("scrypt") or {}
        n, r, par = int(p.get("N", 32768)), int(p.get("R", 8)), int(p.get("P", 1))
        return hashlib.scrypt(
            passphrase, salt=salt, n=n, r=r, p=par, maxmem=256 * r * n * par, dklen=int(p.get("KeyLen", 32))
        )
    if kdf == "PBKDF2":
        p = kdf_params.get("pbkdf2") or {}
        algo = str(p.get("Hashing", "SHA256")).lower().replace("-", "")
        if algo not in ("sha256", "sha512", "sha1"):
            raise StoreError(f"unsupported PBKDF2 hashing {p.get('Hashing')!r}")
        return hashlib.pbkdf2_hmac(
            algo, passphrase, salt, int(p.get("Iterations", 100000)), int(p.get("KeyLen", 32))
        )
    raise StoreError(f"unsupported key derivation function {kdf!r} (supported: ARGON2ID, SCRYPT, PBKDF2)")


def config_mac(key: bytes | None) -> Mac:
    """The CONFIG trailer MAC: always BLAKE3, keyed with the master key when encrypted (§2)."""
    if key is None:
        return lambda data: blake3.blake3(data).digest()
    return lambda data: blake3.blake3(data, key=key).digest()


def _hasher(algorithm: str) -> tuple[Callable[[bytes], bytes], Callable[[bytes, bytes], bytes]]:
    """(plain hash, keyed MAC) for a Hashing.Algorithm."""
    if algorithm == "BLAKE3":
        return (lambda d: blake3.blake3(d).digest()), (lambda k, d: blake3.blake3(d, key=k).digest())
    if algorithm == "SHA256":
        return (lambda d: hashlib.sha256(d).digest()), (lambda k, d: hmac.digest(k, d, "sha256"))
    raise StoreError(f"unsupported hashing algorithm {algorithm!r} (supported: BLAKE3, SHA256)")


# ---------------------------------------------------------------- encryption (§4.2)

_SUBKEY_PREFIX = {"AES256-KW": 40, "AES256-GCM": 60}


def _encrypt(master: bytes, plain: bytes, subkey_algorithm: str, segment: int) -> bytes:
    cr = _crypto()
    subkey = os.urandom(32)
    if subkey_algorithm == "AES256-KW":
        out = [cr.keywrap.aes_key_wrap(master, subkey)]
    else:
        nonce = os.urandom(12)
        out = [nonce + cr.AESGCM(master).encrypt(nonce, subkey, None)]
    aead = cr.AESGCMSIV(subkey)
    view = memoryview(plain)
    for start in range(0, len(plain), segment):
        nonce = os.urandom(12)
        out.append(nonce + aead.encrypt(nonce, bytes(view[start : start + segment]), None))
    return b"".join(out)


def _decrypt(master: bytes, blob: bytes, subkey_algorithm: str, segment: int) -> bytes:
    """Raises InvalidTag / InvalidUnwrap / ValueError on a wrong key or damaged bytes."""
    return bytes(_decrypt_into_one(master, blob, subkey_algorithm, segment))


def _decrypt_into_one(master: bytes, blob: bytes, subkey_algorithm: str, segment: int) -> bytearray:
    """Each segment decrypted straight into its place in one buffer (no per-segment ciphertext
    copies, no join)."""
    prefix = _SUBKEY_PREFIX[subkey_algorithm]
    if len(blob) < prefix:
        raise ValueError(f"encrypted blob too short ({len(blob)} bytes)")
    cr = _crypto()
    if subkey_algorithm == "AES256-KW":
        subkey = cr.keywrap.aes_key_unwrap(master, blob[:40])
    else:
        subkey = cr.AESGCM(master).decrypt(blob[:12], blob[12:60], None)
    aead = cr.AESGCMSIV(subkey)
    step = segment + 28
    body = len(blob) - prefix
    nseg, rest = divmod(body, step)
    if rest:
        if rest < 28:
            raise ValueError("truncated encrypted segment")
        nseg += 1
    out = _new_buffer(body - 28 * nseg)
    view, dest = memoryview(blob), memoryview(out)
    pos = 0
    for start in range(prefix, len(blob), step):
        piece = view[start : start + step]
        n = len(piece) - 28
        aead.decrypt_into(piece[:12], piece[12:], None, dest[pos : pos + n])
        pos += n
    return out


def make_canary(key: bytes, subkey_algorithm: str = "AES256-KW", segment: int = 65536) -> bytes:
    return _encrypt(key, os.urandom(32), subkey_algorithm, segment)


def verify_canary(
    key: bytes, canary: bytes, subkey_algorithm: str = "AES256-KW", segment: int = 65536
) -> bool:
    try:
        _decrypt(key, canary, subkey_algorithm, segment)
    except _crypto().errors:
        return False
    return True


# ---------------------------------------------------------------- compression (§4.1)


def _lz4_compress(data: bytes) -> bytes:
    # As pierrec/lz4 NewWriter defaults: 4 MiB independent blocks, content checksum, no size.
    import lz4.frame

    return lz4.frame.compress(
        data,
        block_size=lz4.frame.BLOCKSIZE_MAX4MB,
        block_linked=False,
        content_checksum=True,
        store_size=False,
    )


def _lz4_decompress(data: bytes) -> bytes:
    # Streamed in 4 MiB pieces (Go's block size): lz4.frame.decompress() without a content size
    # in the frame (Go never writes one) peaks at ~9x the output while growing its buffer; this
    # peaks at ~2x and measured faster too.
    import lz4.frame

    d = lz4.frame.LZ4FrameDecompressor()
    out = []
    stalled = 0
    while not d.eof:
        piece = d.decompress(data, max_length=4 << 20)
        data = b""
        stalled = 0 if piece else stalled + 1
        if not d.eof and (stalled > 1 or (not piece and d.needs_input)):
            raise ValueError("truncated LZ4 frame")
        out.append(piece)
    return out[0] if len(out) == 1 else b"".join(out)


# LZ4 block by block with liblz4 (ctypes; the calls release the GIL). python-lz4's frame decoder
# needs the output size up front or grows its buffer, and always computes the xxh32 checksums.
_LZ4_MAGIC = 0x184D2204
_LZ4_WINDOW = 64 << 10
_U32 = struct.Struct("<I")
_SMALL_BLOCK = 64 << 10  # compressed bytes


def _load_liblz4() -> Any:
    try:
        lib = ctypes.CDLL("liblz4.so.1")
    except OSError:
        from ctypes.util import find_library

        try:
            lib = ctypes.CDLL(find_library("lz4") or "liblz4.so.1")
        except OSError:
            return None
    sig = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.LZ4_decompress_safe.argtypes = sig
    lib.LZ4_decompress_safe.restype = ctypes.c_int
    lib.LZ4_decompress_safe_usingDict.argtypes = [*sig, ctypes.c_void_p, ctypes.c_int]
    lib.LZ4_decompress_safe_usingDict.restype = ctypes.c_int
    return lib


_LIBLZ4 = _load_liblz4()
_bytearray_uninit = ctypes.pythonapi.PyByteArray_FromStringAndSize
_bytearray_uninit.argtypes = [ctypes.c_void_p, ctypes.c_ssize_t]
_bytearray_uninit.restype = ctypes.py_object


def _new_buffer(n: int) -> bytearray:
    # bytearray(n) would zero-fill: pages the decoder never writes would be touched for nothing.
    return _bytearray_uninit(None, n)


def _address(buf: bytes | bytearray) -> int:
    if isinstance(buf, bytes):
        return ctypes.cast(ctypes.c_char_p(buf), ctypes.c_void_p).value  # type: ignore[return-value]
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def _lz4_blocks(data: bytes | bytearray) -> tuple[int, int, list[tuple[int, int, bool]]] | None:
    """(FLG, block max size, [(start, size, stored raw)]) of a well-formed single frame, None for
    anything this path does not handle (the frame decoder then decides); ValueError if truncated."""
    if len(data) < 7 or _U32.unpack_from(data)[0] != _LZ4_MAGIC:
        return None
    flg, bd = data[4], data[5]
    if flg >> 6 != 1 or flg & 1 or (bd >> 4) & 7 < 4:  # version 01, no dictionary id
        return None
    bmax = 1 << (8 + 2 * ((bd >> 4) & 7))
    pos = 7 + (8 if flg & 8 else 0)
    csum = 4 if flg & 16 else 0
    blocks = []
    while True:
        if pos + 4 > len(data):
            raise ValueError("truncated LZ4 frame")
        (size,) = _U32.unpack_from(data, pos)
        pos += 4
        if size == 0:
            break
        raw, size = bool(size & 0x80000000), size & 0x7FFFFFFF
        if size > bmax:
            return None
        if pos + size + csum > len(data):
            raise ValueError("truncated LZ4 frame")
        blocks.append((pos, size, raw))
        pos += size + csum
    pos += 4 if flg & 4 else 0
    if pos != len(data):  # truncated content checksum or trailing bytes: the frame decoder's call
        return None
    return flg, bmax, blocks


def _lz4_block() -> Callable[..., bytes]:
    global _LZ4_BLOCK_DECOMPRESS
    if _LZ4_BLOCK_DECOMPRESS is None:
        from lz4.block import decompress

        _LZ4_BLOCK_DECOMPRESS = decompress
    return _LZ4_BLOCK_DECOMPRESS


_LZ4_BLOCK_DECOMPRESS: Callable[..., bytes] | None = None


def _lz4_decompress_fast(data: bytes | bytearray) -> Buffer:
    """LZ4 frame -> plaintext without checksum checks (the caller checks a MAC over the result).
    No copy beyond the decoder's own writes: a frame of one stored block is returned as a view of
    `data`, and the output buffer (sized for the blocks' bound) is trimmed in place."""
    parsed = _lz4_blocks(data) if _LIBLZ4 is not None else None
    if parsed is None:
        return _lz4_decompress(bytes(data))
    flg, bmax, blocks = parsed
    if not blocks:
        return b""
    if len(blocks) == 1 and blocks[0][2]:
        start, size, _ = blocks[0]
        return memoryview(data)[start : start + size]
    if len(blocks) == 1 and blocks[0][1] <= _SMALL_BLOCK:
        # Small blobs (VFS entries, tree nodes: thousands at startup): python-lz4's block call is
        # ~1 us where the ctypes path below costs ~10 us in argument conversion. Same liblz4
        # LZ4_decompress_safe, same bound (bmax), so the same bytes or an error.
        start, size, _ = blocks[0]
        return _lz4_block()(memoryview(data)[start : start + size], uncompressed_size=bmax)
    out = _new_buffer(max(1, sum(size if raw else bmax for _, size, raw in blocks)))
    src, dst = _address(data), _address(out)
    linked = not flg & 32
    n = 0
    for start, size, raw in blocks:
        if raw:
            ctypes.memmove(dst + n, src + start, size)
            n += size
            continue
        if linked and n:
            window = min(n, _LZ4_WINDOW)
            got = _LIBLZ4.LZ4_decompress_safe_usingDict(
                src + start, dst + n, size, bmax, dst + n - window, window
            )
        else:
            got = _LIBLZ4.LZ4_decompress_safe(src + start, dst + n, size, bmax)
        if got < 0:
            raise ValueError("corrupt LZ4 block")
        n += got
    del out[n:]  # shrinks the allocation in place (realloc), no copy
    return out


def _zstd_compress(data: bytes) -> bytes:
    # klauspost's streaming encoder writes nothing for empty input.
    import zstandard

    return zstandard.ZstdCompressor().compress(data) if data else b""


def _zstd_decompress(data: bytes) -> bytes:
    if not data:
        return b""
    import zstandard

    obj = zstandard.ZstdDecompressor().decompressobj()
    out = obj.decompress(data)
    if not obj.eof:
        raise ValueError("truncated zstd stream")
    return out


def _gzip_decompress(data: bytes) -> bytes:
    # One gzip member, fully consumed; gzip.decompress checks CRC32 and ISIZE.
    import gzip

    return gzip.decompress(data)


def _gzip_compress(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data, compresslevel=6, mtime=0)


_COMPRESSORS: dict[str, tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]] = {
    "LZ4": (_lz4_compress, _lz4_decompress),
    "GZIP": (_gzip_compress, _gzip_decompress),
    "ZSTD": (_zstd_compress, _zstd_decompress),
}


def _identity(data: bytes) -> bytes:
    return data


# ---------------------------------------------------------------- the store codec


class Codec:
    """MAC, compression and encryption of one store, from its decoded CONFIG map."""

    def __init__(self, config: dict, key: bytes | None) -> None:
        hashing = (config.get("Hashing") or {}).get("Algorithm", "BLAKE3")
        plain_hash, keyed = _hasher(hashing)
        self.hashing = hashing
        encryption = config.get("Encryption")
        self.encrypted = encryption is not None
        if self.encrypted:
            if key is None:
                raise PassphraseError("store is encrypted: a passphrase is needed")
            data_algo = encryption.get("DataAlgorithm")
            if data_algo != "AES256-GCM-SIV":
                raise StoreError(f"unsupported data encryption {data_algo!r} (supported: AES256-GCM-SIV)")
            self.subkey_algorithm = encryption.get("SubKeyAlgorithm") or "AES256-KW"
            if self.subkey_algorithm not in _SUBKEY_PREFIX:
                raise StoreError(
                    f"unsupported subkey algorithm {self.subkey_algorithm!r}"
                    " (supported: AES256-KW, AES256-GCM)"
                )
            self.segment = int(encryption.get("ChunkSize") or 65536)
            self.key: bytes | None = key
            secret = key
        else:
            self.key = None
            secret = plain_hash(bytes(config.get("RepositoryID") or b""))
        self._secret = secret
        self._keyed = keyed
        compression = config.get("Compression")
        if compression is None:
            self.compression = None
            self._compress, self._decompress = _identity, _identity
        else:
            algo = compression.get("Algorithm")
            if algo not in _COMPRESSORS:
                raise StoreError(f"unsupported compression {algo!r} (supported: LZ4, GZIP, ZSTD, none)")
            self.compression = algo
            self._compress, self._decompress = _COMPRESSORS[algo]

    def mac(self, data: bytes) -> bytes:
        return self._keyed(self._secret, data)

    def compress(self, data: bytes) -> bytes:
        return self._compress(data)

    def decompress(self, data: bytes, what: str = "blob") -> bytes:
        try:
            return self._decompress(data)
        except Exception as e:  # each library has its own error classes
            raise CorruptionError(f"{what}: cannot decompress {self.compression}: {_short(e)}") from None

    def encrypt(self, data: bytes) -> bytes:
        if not self.encrypted:
            return data
        return _encrypt(self.key, data, self.subkey_algorithm, self.segment)  # type: ignore[arg-type]

    def decrypt(self, data: bytes, what: str = "blob") -> bytes:
        if not self.encrypted:
            return data
        try:
            return _decrypt(self.key, data, self.subkey_algorithm, self.segment)  # type: ignore[arg-type]
        except _crypto().errors as e:
            raise CorruptionError(f"{what}: cannot decrypt: {_short(e) or 'authentication failed'}") from None

    def encode(self, plain: bytes) -> bytes:
        return self.encrypt(self.compress(plain))

    def decode(self, blob: bytes, what: str = "blob", mac_checked: bool = False) -> Buffer:
        """`mac_checked`: the caller checks a MAC over the result, so the compressed stream's own
        checksums may be skipped (LZ4: faster path, see the module comment), and the result may
        be a buffer the fast path did not copy (a view of a stored block, a trimmed bytearray)."""
        if not mac_checked:
            return self.decompress(self.decrypt(blob, what), what)
        data: bytes | bytearray = blob
        if self.encrypted:
            try:
                data = _decrypt_into_one(self.key, blob, self.subkey_algorithm, self.segment)  # type: ignore[arg-type]
            except _crypto().errors as e:
                reason = _short(e) or "authentication failed"
                raise CorruptionError(f"{what}: cannot decrypt: {reason}") from None
        if self.compression == "LZ4":
            try:
                return _lz4_decompress_fast(data)
            except Exception as e:
                raise CorruptionError(f"{what}: cannot decompress LZ4: {_short(e)}") from None
        return self.decompress(bytes(data) if isinstance(data, bytearray) else data, what)


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:200]
