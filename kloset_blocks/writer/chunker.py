# Chunking, content statistics and streaming MACs for the test-fixture writer.
#
# Strategy: Kloset trusts the chunk list it reads and never re-chunks (format §11.3), so the
# writer need not be bit-exact with go-cdc-chunkers' FastCDC. A per-byte gear hash in pure
# Python runs at a few MB/s; instead each chunk's size is drawn from an exponential law around
# `avg`, clamped to [min, max], seeded by a hash of (its offset in the file, its first 64
# bytes). That makes boundaries:
# - deterministic: the same file always chunks the same way, so an unchanged file, or a file
#   changed in place (PostgreSQL pages), deduplicates chunk by chunk across snapshots;
# - varied and not 4 KiB aligned, with tunable min/avg/max so tests can force hundreds of
#   boundaries into a small file.
# Invariants: every chunk is 1..max bytes except the single zero-length chunk of an empty
# file; the last chunk may be shorter than min; memory is O(max(chunk_max, 64 KiB)), never the
# file size.
from __future__ import annotations

import hashlib
import hmac
import math
from collections import Counter
from collections.abc import Iterator
from typing import BinaryIO, Protocol

import blake3

from kloset_blocks.errors import UsageError
from kloset_blocks.store.codec import Codec

HEAD = 64  # bytes of a chunk's start that seed its size
ENTROPY_SAMPLE = 64 * 1024  # entropy is informational: sample big chunks


def check_sizes(chunk_min: int, chunk_avg: int, chunk_max: int) -> None:
    if not (1 <= chunk_min <= chunk_avg <= chunk_max):
        raise UsageError(
            f"chunk sizes must satisfy 1 <= min <= avg <= max (got {chunk_min}, {chunk_avg}, {chunk_max})"
        )
    if chunk_max > 0xFFFFFFFF:
        raise UsageError(f"chunk max size {chunk_max} does not fit the u32 chunk length")


def _next_size(offset: int, head: bytes, chunk_min: int, chunk_avg: int, chunk_max: int) -> int:
    digest = hashlib.blake2b(offset.to_bytes(8, "little") + head, digest_size=8).digest()
    u = (int.from_bytes(digest, "little") + 0.5) / 2.0**64  # in (0, 1)
    size = chunk_min + int(-math.log(u) * (chunk_avg - chunk_min))
    return min(size, chunk_max)


def iter_chunks(stream: BinaryIO, chunk_min: int, chunk_avg: int, chunk_max: int) -> Iterator[bytes]:
    """Split `stream` into chunks as it is read; an empty stream gives one b"" chunk."""
    check_sizes(chunk_min, chunk_avg, chunk_max)
    block = max(64 * 1024, 2 * chunk_max)
    buf = bytearray()
    pos = 0  # start of unconsumed data in buf
    offset = 0  # file offset of buf[pos]
    eof = False
    emitted = False

    def fill(need: int) -> None:
        nonlocal buf, pos, eof
        while not eof and len(buf) - pos < need:
            if pos:  # compact before growing, so buf stays O(block)
                del buf[:pos]
                pos = 0
            data = stream.read(block)
            if not data:
                eof = True
            else:
                buf += data

    while True:
        fill(HEAD)
        if len(buf) == pos:
            break
        size = _next_size(offset, bytes(buf[pos : pos + HEAD]), chunk_min, chunk_avg, chunk_max)
        fill(size)
        chunk = bytes(buf[pos : pos + size])
        pos += len(chunk)
        offset += len(chunk)
        emitted = True
        yield chunk
    if not emitted:
        yield b""


def entropy(data: bytes) -> float:
    """Shannon entropy in bits per byte (sampled above ENTROPY_SAMPLE bytes); 0.0 for b""."""
    if not data:
        return 0.0
    if len(data) > ENTROPY_SAMPLE:
        data = memoryview(data)[:: -(-len(data) // ENTROPY_SAMPLE)].tobytes()
    n = len(data)
    # H = log2(n) - sum(c log2 c) / n, with c log2 c from a table so the sum runs in C
    return max(0.0, math.log2(n) - math.fsum(map(_C_LOG_C.__getitem__, Counter(data).values())) / n)


_C_LOG_C = [0.0] + [c * math.log2(c) for c in range(1, ENTROPY_SAMPLE + 1)]


def content_type(first_chunk: bytes) -> str:
    """A small stand-in for gabriel-vasile/mimetype, with the values the fixtures show."""
    if not first_chunk:
        return "text/plain"
    head = first_chunk[:3072]
    if b"\x00" not in head:
        try:
            head.decode("utf-8")
            return "text/plain; charset=utf-8"
        except UnicodeDecodeError as e:
            if e.start >= len(head) - 3 and len(first_chunk) > len(head):  # cut inside a character
                return "text/plain; charset=utf-8"
    return "application/octet-stream"


class MacHasher(Protocol):
    def update(self, data: bytes) -> None: ...
    def digest(self) -> bytes: ...


def mac_hasher(codec: Codec) -> MacHasher:
    """An incremental form of codec.mac (codec.py has only the one-shot form): the Object's
    contentMAC over a whole file, and packfile names and trailers, without holding the bytes."""
    secret = codec._secret
    if codec.hashing == "BLAKE3":
        return blake3.blake3(key=secret)
    return hmac.new(secret, digestmod=hashlib.sha256)
