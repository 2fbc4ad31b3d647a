# Persisted Kloset B+trees (§10.1): a root record {Order, Root} and content-addressed nodes
# {keys, pointers (internal), values (leaf), next (leaf chain)}. Keys are Go strings, handled
# here as bytes (surrogateescape round trip) and ordered by PathCmp (depth, then bytes) for the
# VFS and xattr trees, bytewise for the others.
#
# Invariants:
# - Lookup: child index = bisect_right(keys, k) at internal nodes, exact match at leaves.
# - A full scan does not walk the `next` chain one pread at a time: it reads the tree level by
#   level, each level's nodes fetched in batches with coalesced preads, and yields leaves in key
#   order. Memory: one batch of nodes plus the MACs of one level.
# - Decoded nodes used by lookups are kept in a small LRU shared by the store (nodes are
#   immutable and content-addressed, so sharing across snapshots is safe).
from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kloset_blocks.errors import CorruptionError

SCAN_BATCH = 512


def path_cmp_key(p: bytes) -> tuple[int, bytes]:
    """PathCmp as a sort key: number of '/' first, then bytewise."""
    return (p.count(b"/"), p)


def to_bytes(s: Any) -> bytes:
    if isinstance(s, str):
        return s.encode("utf-8", "surrogateescape")
    if isinstance(s, bytes):
        return s
    raise TypeError(f"expected a string, got {type(s).__name__}")


@dataclass(slots=True)
class BNode:
    mac: bytes
    keys: list[bytes]
    pointers: list[bytes]
    values: list[Any]
    next: bytes | None

    @property
    def is_leaf(self) -> bool:
        return not self.pointers


class RecordReader(Protocol):
    def read_record(self, rtype: int, mac: bytes) -> Any: ...
    def read_records(self, rtype: int, macs: Sequence[bytes]) -> list[Any]: ...
    def cached_node(self, rtype: int, mac: bytes, load: Callable[[], BNode]) -> BNode: ...


def decode_node(mac: bytes, rec: Any, what: str) -> BNode:
    try:
        keys = [to_bytes(k) for k in rec.get("keys") or ()]
        pointers = [bytes(p) for p in rec.get("pointers") or ()]
        values = list(rec.get("values") or ())
        nxt = rec.get("next")
        node = BNode(mac, keys, pointers, values, bytes(nxt) if nxt else None)
    except (AttributeError, TypeError, ValueError):
        raise CorruptionError(f"{what} node {mac.hex()}: malformed") from None
    if pointers and len(pointers) != len(keys) + 1:
        raise CorruptionError(f"{what} node {mac.hex()}: {len(keys)} keys but {len(pointers)} pointers")
    if not pointers and len(values) != len(keys):
        raise CorruptionError(f"{what} node {mac.hex()}: {len(keys)} keys but {len(values)} values")
    return node


class BTree:
    def __init__(
        self,
        reader: RecordReader,
        root_type: int,
        node_type: int,
        root_mac: bytes,
        what: str,
        key: Callable[[bytes], Any] | None = path_cmp_key,
    ) -> None:
        self.reader = reader
        self.node_type = node_type
        self.what = what
        self.key = key
        rec = reader.read_record(root_type, root_mac)
        try:
            self.root = bytes(rec["Root"])
            self.order = int(rec.get("Order") or 0)
        except (KeyError, TypeError, ValueError):
            raise CorruptionError(f"{what} root {root_mac.hex()}: malformed") from None

    def node(self, mac: bytes) -> BNode:
        return self.reader.cached_node(
            self.node_type,
            mac,
            lambda: decode_node(mac, self.reader.read_record(self.node_type, mac), self.what),
        )

    def _leaf_for(self, k: bytes) -> BNode:
        node = self.node(self.root)
        for _ in range(64):  # a depth bound: a cycle of pointers is corruption, not a hang
            if node.is_leaf:
                return node
            node = self.node(node.pointers[self._right(node.keys, k)])
        raise CorruptionError(f"{self.what} tree: deeper than 64 levels (pointer cycle?)")

    def _right(self, keys: list[bytes], k: bytes) -> int:
        if self.key is None:
            return bisect.bisect_right(keys, k)
        return bisect.bisect_right(keys, self.key(k), key=self.key)

    def _left(self, keys: list[bytes], k: bytes) -> int:
        if self.key is None:
            return bisect.bisect_left(keys, k)
        return bisect.bisect_left(keys, self.key(k), key=self.key)

    def find(self, k: bytes) -> Any | None:
        leaf = self._leaf_for(k)
        i = self._left(leaf.keys, k)
        if i < len(leaf.keys) and leaf.keys[i] == k:
            return leaf.values[i]
        return None

    def scan_from(self, k: bytes) -> Iterator[tuple[bytes, Any]]:
        """(key, value) for every key >= k, in order, following the leaf chain."""
        leaf: BNode | None = self._leaf_for(k)
        i = self._left(leaf.keys, k)
        seen = 0
        while leaf is not None:
            yield from zip(leaf.keys[i:], leaf.values[i:], strict=True)
            i = 0
            seen += 1
            leaf = self.node(leaf.next) if leaf.next else None
            if seen > 1 << 32:
                raise CorruptionError(f"{self.what} tree: leaf chain does not end")

    def leaves(self) -> Iterator[BNode]:
        """Every leaf, left to right, read level by level with batched fetches."""
        level = [self.root]
        for _ in range(64):
            nxt: list[bytes] = []
            for start in range(0, len(level), SCAN_BATCH):
                batch = level[start : start + SCAN_BATCH]
                recs = self.reader.read_records(self.node_type, batch)
                nodes = [decode_node(m, r, self.what) for m, r in zip(batch, recs, strict=True)]
                if all(n.is_leaf for n in nodes):
                    if nxt:
                        raise CorruptionError(f"{self.what} tree: leaves at different depths")
                    yield from nodes
                elif any(n.is_leaf for n in nodes):
                    raise CorruptionError(f"{self.what} tree: leaves at different depths")
                else:
                    for n in nodes:
                        nxt.extend(n.pointers)
            if not nxt:
                return
            level = nxt
        raise CorruptionError(f"{self.what} tree: deeper than 64 levels (pointer cycle?)")

    def items(self) -> Iterator[tuple[bytes, Any]]:
        for leaf in self.leaves():
            yield from zip(leaf.keys, leaf.values, strict=True)
