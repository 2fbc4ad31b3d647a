# The ext4 layout planner: a tree of Nodes in, a Layout (sorted, non-overlapping regions covering the
# whole image) out. Pure: no I/O, and file data is never read (only FileData references are kept).
#
# Strategy (after nbdkit's floppy plugin): metadata first, data after, everything allocated as one
# prefix of the block space, so every bitmap is "the first n bits set" and every file is contiguous.
#
#   block 0            boot padding + superblock (s_first_data_block = 0 with 4 KiB blocks)
#   1 .. gdt           group descriptors (64 bytes each), no reserved GDT blocks (no resize_inode)
#   block bitmaps      one block per group, all groups together (flex_bg lets them live anywhere)
#   inode bitmaps      likewise
#   inode tables       all groups' tables back to back: inode k sits at itable_start*bs + (k-1)*256
#   aux                directory blocks, extent tree blocks, slow symlink blocks, in inode order
#   data               each regular file's blocks, contiguous, in inode order
#   journal            with PlanOptions.journal only: inode 8's blocks (ext4/journal.py), then its
#                      extent tree blocks if it needs any
#   free               zero blocks up to the end of the last (always full) group: virtual free space
#
# Inode numbers: 2 is the root, 1 and 3..10 stay reserved (zeroed but marked in use), the tree's
# other inodes are 11.. in depth-first order with children sorted by name (deterministic whatever
# order the nodes arrive in). The UUID and htree hash seed are hashes of the encoded metadata and
# the options, so the same tree and options give the same bytes.
from __future__ import annotations

import dataclasses
import hashlib
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from kloset_blocks.errors import LayoutError
from kloset_blocks.ext4 import extent
from kloset_blocks.ext4.bitmaps import prefix_bitmap
from kloset_blocks.ext4.dirent import EXT4_NAME_LEN, encode_dir
from kloset_blocks.ext4.group_desc import EXT4_DESC_SIZE_64BIT, GroupDesc, encode_group_desc
from kloset_blocks.ext4.inode import (
    EXT4_EXTENTS_FL,
    EXT4_EXTRA_ISIZE,
    EXT4_GOOD_OLD_FIRST_INO,
    EXT4_INODE_SIZE,
    EXT4_N_BLOCKS_BYTES,
    EXT4_ROOT_INO,
    FILE_TYPE,
    encode_inode,
    encode_rdev,
)
from kloset_blocks.ext4.journal import EXT4_JOURNAL_INO, default_journal_blocks, encode_journal_superblock
from kloset_blocks.ext4.superblock import SUPERBLOCK_OFFSET, SuperblockParams, encode_superblock
from kloset_blocks.tree import Node

BLOCK_SIZE = 4096
LOG_BLOCK_SIZE = 2  # 1024 << 2
BLOCKS_PER_GROUP = 8 * BLOCK_SIZE
MAX_INODES_PER_GROUP = 8 * BLOCK_SIZE
INODES_PER_BLOCK = BLOCK_SIZE // EXT4_INODE_SIZE
LOG_GROUPS_PER_FLEX = 4
EXT4_LINK_MAX = 65000
SYMLINK_MAX = BLOCK_SIZE - 1
GiB = 1 << 30
DEFAULT_MIN_FREE = GiB
# Room for new files (Postgres creates some): at least this many free inodes, and one inode
# per INODE_RATIO bytes of image, whichever is more. Unused inode tables are zero regions.
MIN_FREE_INODES = 65536
INODE_RATIO = 65536
MAX_BLOCKS = 1 << 48  # i_block extents hold 48-bit physical block numbers

# Region kinds.
BYTES = 0  # source: a bytes-like buffer, src_offset: where the region starts in it
ZERO = 1  # reads as zeros
FILE = 2  # source: FileData, src_offset: file offset at region start, src_len: file bytes, rest zeros

_ZERO_BLOCK = bytes(BLOCK_SIZE)
_ONES_BLOCK = b"\xff" * BLOCK_SIZE


class Region(NamedTuple):
    start: int
    length: int
    kind: int
    source: Any = None
    src_offset: int = 0
    src_len: int = 0


@dataclass(frozen=True, slots=True)
class PlanOptions:
    root: bytes = b"/"
    uid: int | None = None
    gid: int | None = None
    free_bytes: int | None = None  # None: max(1 GiB, data size)
    label: bytes = b""
    on_bad_name: str = "fail"  # or "skip"
    uuid_seed: bytes = b""  # mixed into the UUID, e.g. a snapshot id
    journal: bool = False  # an empty jbd2 journal in inode 8, for an overlay that is kept


@dataclass(slots=True)
class Layout:
    size: int
    regions: list[Region]
    block_size: int
    blocks_count: int
    groups: int
    inodes_count: int
    inodes_per_group: int
    used_inodes: int
    used_blocks: int
    data_start_block: int
    uuid: bytes
    files: int = 0
    directories: int = 0
    warnings: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Tree collection


def _norm_root(root: bytes) -> bytes:
    root = b"/" + root.strip(b"/")
    return root


def _bad_name(name: bytes) -> str | None:
    if not name:
        return "empty name"
    if name in (b".", b".."):
        return "reserved name"
    if len(name) > EXT4_NAME_LEN:
        return f"name longer than {EXT4_NAME_LEN} bytes"
    if b"\0" in name:
        return "name contains NUL"
    if b"/" in name:
        return "name contains '/'"
    return None


class _Tree:
    """Nodes re-rooted under `root`, keyed by relative path (b"" for the root)."""

    def __init__(self, nodes: Iterable[Node], opts: PlanOptions) -> None:
        self.opts = opts
        self.root = _norm_root(opts.root)
        self.prefix = b"/" if self.root == b"/" else self.root + b"/"
        self.paths: list[bytes] = []
        self.nodes: list[Node | None] = []
        self.index: dict[bytes, int] = {}
        self.warnings: list[str] = []
        for node in nodes:
            rel = self.rel(node.path)
            if rel is None:
                continue
            if rel in self.index:
                raise LayoutError(f"duplicate path in tree: {node.path!r}")
            self.index[rel] = len(self.paths)
            self.paths.append(rel)
            self.nodes.append(node)
        if b"" not in self.index:
            self._add_implicit(b"")
        self.alive = self._resolve_parents()

    def rel(self, path: bytes) -> bytes | None:
        if len(path) > 1 and path.endswith(b"/"):
            path = path.rstrip(b"/") or b"/"
        if path == self.root:
            return b""
        if not path.startswith(self.prefix):
            return None
        return path[len(self.prefix) :]

    def _add_implicit(self, rel: bytes) -> int:
        i = len(self.paths)
        self.index[rel] = i
        self.paths.append(rel)
        self.nodes.append(None)
        return i

    def _skip_or_fail(self, rel: bytes, why: str) -> None:
        full = self.prefix + rel if rel else self.root
        msg = f"cannot represent {full!r} in ext4: {why}"
        if self.opts.on_bad_name != "skip":
            raise LayoutError(msg + " (on_bad_name='skip' leaves it out)")
        self.warnings.append(msg + "; skipped")

    def _resolve_parents(self) -> list[int]:
        """Alive state per index (1 alive, 2 dead); creates missing parent directories."""
        state = [0] * len(self.paths)
        state[self.index[b""]] = 1
        i = 0
        while i < len(self.paths):
            if state[i] == 0:
                stack = [i]
                while stack:
                    j = stack[-1]
                    rel = self.paths[j]
                    parent_rel, _, name = rel.rpartition(b"/")
                    why = _bad_name(name)
                    if why is not None:
                        self._skip_or_fail(rel, why)
                        state[j] = 2
                        stack.pop()
                        continue
                    p = self.index.get(parent_rel)
                    if p is None:
                        p = self._add_implicit(parent_rel)
                        state.append(0)
                    if state[p] == 0:
                        stack.append(p)
                        continue
                    if state[p] == 1 and not self.is_dir(p):
                        raise LayoutError(f"parent of {self.prefix + rel!r} is not a directory")
                    state[j] = state[p]
                    stack.pop()
            i += 1
        return state

    def is_dir(self, i: int) -> bool:
        node = self.nodes[i]
        return node is None or (node.hardlink_to is None and stat.S_ISDIR(node.mode))


# ----------------------------------------------------------------------------------------------
# The plan


class _Inode:
    """One inode to encode. kind: S_IFMT bits; nblocks: blocks in aux (dir, symlink) or data (file)."""

    __slots__ = ("aux", "children", "data_blocks", "ino", "kind", "links", "node", "subdirs", "tree")

    def __init__(self, ino: int, kind: int, node: Node | None) -> None:
        self.ino = ino
        self.kind = kind
        self.node = node
        self.links = 1
        self.subdirs = 0
        self.children: list[int] | None = None
        self.aux: bytes = b""  # dir blocks or slow symlink block
        self.data_blocks = 0
        self.tree = 0  # extent tree blocks


def _kind(node: Node | None, path: bytes) -> int:
    if node is None:
        return stat.S_IFDIR
    kind = stat.S_IFMT(node.mode)
    if kind not in FILE_TYPE:
        raise LayoutError(f"unsupported file type {node.mode:#o} at {path!r}")
    return kind


def plan(nodes: Iterable[Node], options: PlanOptions | None = None) -> Layout:
    opts = options or PlanOptions()
    if opts.on_bad_name not in ("fail", "skip"):
        raise LayoutError(f"on_bad_name must be 'fail' or 'skip', not {opts.on_bad_name!r}")
    tree = _Tree(nodes, opts)
    if not tree.is_dir(tree.index[b""]):
        raise LayoutError(f"{tree.root!r} is not a directory")
    inodes, entries_of = _number_inodes(tree)
    _fill_dirs(tree, inodes, entries_of)
    return _assemble(tree, inodes, opts)


def _number_inodes(tree: _Tree) -> tuple[list[_Inode], dict[int, list[int]]]:
    """Depth-first inode numbering with children sorted by name; hard links share their target's inode."""
    paths, alive = tree.paths, tree.alive
    children: dict[int, list[int]] = {}
    root = tree.index[b""]
    for i, rel in enumerate(paths):
        if i == root or alive[i] != 1:
            continue
        parent = tree.index[rel.rpartition(b"/")[0]]
        lst = children.get(parent)
        if lst is None:
            children[parent] = [i]
        else:
            lst.append(i)
    inodes: list[_Inode] = []
    ino_of = [0] * len(paths)
    links: list[int] = []  # path indexes that are hard links, resolved after numbering
    order: list[int] = []
    stack = [root]
    next_ino = EXT4_GOOD_OLD_FIRST_INO
    while stack:
        i = stack.pop()
        order.append(i)
        node = tree.nodes[i]
        if node is not None and node.hardlink_to is not None:
            links.append(i)
        else:
            if i == root:
                ino = EXT4_ROOT_INO
            else:
                ino = next_ino
                next_ino += 1
            ino_of[i] = ino
            inodes.append(_Inode(ino, _kind(node, tree.prefix + paths[i]), node))
        kids = children.get(i)
        if kids:
            kids.sort(key=paths.__getitem__, reverse=True)
            stack.extend(kids)
    by_ino = {ino.ino: ino for ino in inodes}
    # Hard links whose target is outside the tree: the first such name carries the inode itself.
    orphan_owner: dict[bytes, int] = {}
    for i in links:  # in depth-first order
        node = tree.nodes[i]
        assert node is not None and node.hardlink_to is not None
        target = tree.rel(node.hardlink_to)
        t = tree.index.get(target) if target is not None else None
        hops = 0
        while t is not None and alive[t] == 1 and ino_of[t] == 0:
            tnode = tree.nodes[t]
            hops += 1
            if tnode is None or tnode.hardlink_to is None or t == i or hops > 64:
                t = None  # a cycle or a dangling chain: treat as a target outside the tree
                break
            nxt = tree.rel(tnode.hardlink_to)
            t = tree.index.get(nxt) if nxt is not None else None
        if t is not None and alive[t] == 1 and ino_of[t] != 0:
            owner = by_ino[ino_of[t]]
            if owner.kind == stat.S_IFDIR:
                raise LayoutError(f"hard link to a directory: {node.path!r} -> {node.hardlink_to!r}")
            owner.links += 1
            ino_of[i] = owner.ino
            continue
        key = node.hardlink_to
        if key in orphan_owner:
            owner = by_ino[orphan_owner[key]]
            owner.links += 1
            ino_of[i] = owner.ino
            continue
        # Target not in the tree: this name becomes the inode, from its own mode and data.
        kind = _kind(node, node.path)
        if kind == stat.S_IFDIR:
            raise LayoutError(f"hard link to a directory: {node.path!r} -> {node.hardlink_to!r}")
        ino = next_ino
        next_ino += 1
        owner = _Inode(ino, kind, dataclasses.replace(node, hardlink_to=None))
        inodes.append(owner)
        by_ino[ino] = owner
        orphan_owner[key] = ino
        ino_of[i] = ino
    inodes.sort(key=lambda x: x.ino)
    tree.ino_of = ino_of  # type: ignore[attr-defined]
    tree.by_ino = by_ino  # type: ignore[attr-defined]
    return inodes, children


def _fill_dirs(tree: _Tree, inodes: list[_Inode], children: dict[int, list[int]]) -> None:
    """Encode every directory's entries (needs only inode numbers) and count links."""
    ino_of: list[int] = tree.ino_of  # type: ignore[attr-defined]
    by_ino: dict[int, _Inode] = tree.by_ino  # type: ignore[attr-defined]
    paths = tree.paths
    for i in range(len(paths)):
        if tree.alive[i] != 1 or ino_of[i] == 0:
            continue
        d = by_ino[ino_of[i]]
        if d.kind != stat.S_IFDIR or d.node is not tree.nodes[i]:
            continue
        parent_rel = paths[i].rpartition(b"/")[0]
        parent_ino = EXT4_ROOT_INO if not paths[i] else ino_of[tree.index[parent_rel]]
        entries = [(b".", d.ino, 2), (b"..", parent_ino, 2)]
        subdirs = 0
        kids = children.get(i, ())
        for c in sorted(kids, key=paths.__getitem__):
            child = by_ino[ino_of[c]]
            if child.kind == stat.S_IFDIR:
                subdirs += 1
            entries.append((paths[c].rpartition(b"/")[2], child.ino, FILE_TYPE[child.kind]))
        d.subdirs = subdirs
        d.aux = encode_dir(entries, BLOCK_SIZE)
        d.tree = extent.tree_blocks(len(d.aux) // BLOCK_SIZE, BLOCK_SIZE)
    for ino in inodes:
        node = ino.node
        if ino.kind == stat.S_IFREG:
            size = node.size if node is not None else 0
            if size < 0:
                raise LayoutError(f"negative size at {node.path!r}")  # type: ignore[union-attr]
            if size and (node is None or node.data is None):
                raise LayoutError(f"regular file without data: {node.path if node else b''!r}")
            ino.data_blocks = -(-size // BLOCK_SIZE)
            ino.tree = extent.tree_blocks(ino.data_blocks, BLOCK_SIZE)
            if ino.links > EXT4_LINK_MAX:
                raise LayoutError(f"too many hard links ({ino.links}) to {node.path!r}")  # type: ignore[union-attr]
        elif ino.kind == stat.S_IFLNK:
            target = node.symlink_target if node is not None else None
            if not target:
                raise LayoutError(f"symlink without target: {node.path if node else b''!r}")
            if len(target) > SYMLINK_MAX:
                raise LayoutError(f"symlink target longer than {SYMLINK_MAX} bytes: {node.path!r}")  # type: ignore[union-attr]
            if len(target) >= EXT4_N_BLOCKS_BYTES:
                ino.aux = target + bytes(BLOCK_SIZE - len(target))


def _geometry(used_inodes: int, content_blocks: int, free_blocks: int) -> tuple[int, int, int, int]:
    """(groups, inodes_per_group, gdt_blocks, fixed metadata blocks) such that everything fits in
    whole groups. Iterates because metadata size depends on the group count."""
    groups = max(1, -(-(content_blocks + free_blocks) // BLOCKS_PER_GROUP))
    while True:
        total_blocks = groups * BLOCKS_PER_GROUP
        target = max(2 * used_inodes, used_inodes + MIN_FREE_INODES, total_blocks * BLOCK_SIZE // INODE_RATIO)
        ipg = -(-target // groups)
        ipg = min(MAX_INODES_PER_GROUP, -(-ipg // INODES_PER_BLOCK) * INODES_PER_BLOCK)
        if ipg * groups < used_inodes + 1:
            groups = -(-(used_inodes + 1) // MAX_INODES_PER_GROUP)
            continue
        gdt_blocks = -(-groups * EXT4_DESC_SIZE_64BIT // BLOCK_SIZE)
        fixed = 1 + gdt_blocks + 2 * groups + groups * (ipg // INODES_PER_BLOCK)
        need = -(-(fixed + content_blocks + free_blocks) // BLOCKS_PER_GROUP)
        if need <= groups:
            return groups, ipg, gdt_blocks, fixed
        groups = need


def _assemble(tree: _Tree, inodes: list[_Inode], opts: PlanOptions) -> Layout:
    bs = BLOCK_SIZE
    used_inodes = inodes[-1].ino if inodes[-1].ino >= EXT4_GOOD_OLD_FIRST_INO else EXT4_GOOD_OLD_FIRST_INO - 1
    aux_blocks = sum(len(i.aux) // bs + i.tree for i in inodes)
    data_blocks = sum(i.data_blocks for i in inodes)
    free_bytes = opts.free_bytes if opts.free_bytes is not None else max(DEFAULT_MIN_FREE, data_blocks * bs)
    if free_bytes < 0:
        raise LayoutError("free space must not be negative")
    free_blocks = -(-free_bytes // bs)
    journal_blocks = journal_tree = 0
    if opts.journal:
        # Sized for the filesystem without it (one table step at most from mke2fs's own choice).
        groups, _, _, fixed = _geometry(used_inodes, aux_blocks + data_blocks, free_blocks)
        journal_blocks = default_journal_blocks(groups * BLOCKS_PER_GROUP)
        journal_tree = extent.tree_blocks(journal_blocks, bs)
    content_blocks = aux_blocks + data_blocks + journal_blocks + journal_tree
    groups, ipg, gdt_blocks, fixed = _geometry(used_inodes, content_blocks, free_blocks)
    blocks_count = groups * BLOCKS_PER_GROUP
    if blocks_count > MAX_BLOCKS:
        raise LayoutError(f"image too large: {blocks_count} blocks")
    itb = ipg // INODES_PER_BLOCK
    bb_start = 1 + gdt_blocks
    ib_start = bb_start + groups
    it_start = ib_start + groups
    aux_start = it_start + groups * itb
    data_start = aux_start + aux_blocks
    journal_start = data_start + data_blocks
    used_blocks = journal_start + journal_blocks + journal_tree
    assert used_blocks == fixed + content_blocks

    uid, gid = opts.uid, opts.gid
    itable = bytearray(-(-used_inodes // INODES_PER_BLOCK) * bs)
    aux_parts: list[bytes] = []
    file_regions: list[Region] = []
    aux_ptr, data_ptr = aux_start, data_start
    dirs_per_group = [0] * groups
    ndirs = nfiles = 0
    for ino in inodes:
        node = ino.node
        kind = ino.kind
        mode = (node.mode & 0o7777 if node is not None else 0o755) | kind
        o_uid = uid if uid is not None else (node.uid if node is not None else 0)
        o_gid = gid if gid is not None else (node.gid if node is not None else 0)
        mtime = node.mtime_ns if node is not None else 0
        flags = 0
        blocks_512 = 0
        if kind == stat.S_IFDIR:
            ndirs += 1
            dirs_per_group[(ino.ino - 1) // ipg] += 1
            n = len(ino.aux) // bs
            size = n * bs
            i_block, tree_bytes = extent.encode_extent_tree(aux_ptr, n, aux_ptr + n, bs)
            aux_parts.append(ino.aux)
            aux_parts.append(tree_bytes)
            aux_ptr += n + ino.tree
            blocks_512 = (n + ino.tree) * (bs // 512)
            flags = EXT4_EXTENTS_FL
            links = 2 + ino.subdirs
            if links > EXT4_LINK_MAX:
                links = 1  # dir_nlink: "more than EXT4_LINK_MAX subdirectories"
        elif kind == stat.S_IFREG:
            nfiles += 1
            size = node.size if node is not None else 0
            n = ino.data_blocks
            i_block, tree_bytes = extent.encode_extent_tree(data_ptr, n, aux_ptr, bs)
            aux_parts.append(tree_bytes)
            aux_ptr += ino.tree
            if n:
                file_regions.append(Region(data_ptr * bs, n * bs, FILE, node.data, 0, size))  # type: ignore[union-attr]
            data_ptr += n
            blocks_512 = (n + ino.tree) * (bs // 512)
            flags = EXT4_EXTENTS_FL
            links = ino.links
        elif kind == stat.S_IFLNK:
            target: bytes = node.symlink_target  # type: ignore[union-attr,assignment]
            size = len(target)
            links = ino.links
            if ino.aux:
                i_block, _ = extent.encode_extent_tree(aux_ptr, 1, aux_ptr + 1, bs)
                aux_parts.append(ino.aux)
                aux_ptr += 1
                blocks_512 = bs // 512
                flags = EXT4_EXTENTS_FL
            else:
                i_block = target  # fast symlink: the target lives in i_block itself
        else:
            size = 0
            links = ino.links
            i_block = encode_rdev(node.rdev) if kind in (stat.S_IFCHR, stat.S_IFBLK) else b""  # type: ignore[union-attr]
        encode_inode(
            itable,
            (ino.ino - 1) * EXT4_INODE_SIZE,
            mode=mode,
            uid=o_uid,
            gid=o_gid,
            size=size,
            mtime_ns=mtime,
            links_count=links,
            blocks_512=blocks_512,
            flags=flags,
            i_block=i_block,
        )
        ino.aux = b""  # release: the bytes now live in aux_parts
    assert aux_ptr == data_start and data_ptr == journal_start
    jnl_blocks = jnl_tree = b""
    if opts.journal:
        jnl_blocks, jnl_tree = _journal_inode(itable, journal_start, journal_blocks)
    aux = b"".join(aux_parts)
    del aux_parts

    digest = hashlib.sha256()
    for part in (
        b"kloset-blocks ext4 v1",
        repr((blocks_count, ipg, opts.root, opts.uid, opts.gid, opts.label)).encode(),
        opts.uuid_seed,
        itable,
        aux,
    ):
        digest.update(len(part).to_bytes(8, "little"))
        digest.update(part)
    h = digest.digest()
    uuid = bytearray(h[:16])
    uuid[6] = (uuid[6] & 0x0F) | 0x80  # RFC 9562 version 8: custom, derived from content
    uuid[8] = (uuid[8] & 0x3F) | 0x80
    hash_seed = h[16:32]

    inodes_count = groups * ipg
    sb = encode_superblock(
        SuperblockParams(
            inodes_count=inodes_count,
            blocks_count=blocks_count,
            free_blocks_count=blocks_count - used_blocks,
            free_inodes_count=inodes_count - used_inodes,
            blocks_per_group=BLOCKS_PER_GROUP,
            inodes_per_group=ipg,
            log_block_size=LOG_BLOCK_SIZE,
            inode_size=EXT4_INODE_SIZE,
            first_ino=EXT4_GOOD_OLD_FIRST_INO,
            desc_size=EXT4_DESC_SIZE_64BIT,
            log_groups_per_flex=LOG_GROUPS_PER_FLEX,
            uuid=bytes(uuid),
            volume_name=opts.label[:16],
            hash_seed=hash_seed,
            extra_isize=EXT4_EXTRA_ISIZE,
            journal_inum=EXT4_JOURNAL_INO if opts.journal else 0,
            jnl_blocks=jnl_blocks,
        )
    )
    head = bytearray((1 + gdt_blocks) * bs)
    head[SUPERBLOCK_OFFSET : SUPERBLOCK_OFFSET + len(sb)] = sb
    for g in range(groups):
        used_b = min(max(used_blocks - g * BLOCKS_PER_GROUP, 0), BLOCKS_PER_GROUP)
        used_i = min(max(used_inodes - g * ipg, 0), ipg)
        encode_group_desc(
            head,
            bs + g * EXT4_DESC_SIZE_64BIT,
            GroupDesc(
                block_bitmap=bb_start + g,
                inode_bitmap=ib_start + g,
                inode_table=it_start + g * itb,
                free_blocks_count=BLOCKS_PER_GROUP - used_b,
                free_inodes_count=ipg - used_i,
                used_dirs_count=dirs_per_group[g],
                itable_unused=0,
            ),
        )

    out = _Regions()
    out.add_bytes(bytes(head))
    for g in range(groups):
        used_b = min(max(used_blocks - g * BLOCKS_PER_GROUP, 0), BLOCKS_PER_GROUP)
        out.add_bitmap(used_b, BLOCKS_PER_GROUP)
    for g in range(groups):
        used_i = min(max(used_inodes - g * ipg, 0), ipg)
        out.add_bitmap(used_i, ipg)
    out.add_bytes(bytes(itable))
    out.add_zero(aux_start * bs - out.end)
    out.add_bytes(aux)
    for r in file_regions:
        assert r.start == out.end
        out.regions.append(r)
        out.end += r.length
    if opts.journal:
        assert out.end == journal_start * bs
        out.add_bytes(encode_journal_superblock(bs, journal_blocks, bytes(uuid)))
        out.add_zero((journal_blocks - 1) * bs)
        out.add_bytes(jnl_tree)
    out.add_zero(blocks_count * bs - out.end)
    return Layout(
        size=blocks_count * bs,
        regions=out.regions,
        block_size=bs,
        blocks_count=blocks_count,
        groups=groups,
        inodes_count=inodes_count,
        inodes_per_group=ipg,
        used_inodes=used_inodes,
        used_blocks=used_blocks,
        data_start_block=data_start,
        uuid=bytes(uuid),
        files=nfiles,
        directories=ndirs,
        warnings=tree.warnings,
    )


def _journal_inode(itable: bytearray, start: int, nblocks: int) -> tuple[bytes, bytes]:
    """Encode inode 8 (the journal: a regular file of `nblocks` blocks at `start`, its extent tree
    blocks right after) into the inode table. Returns s_jnl_blocks, the superblock's copy of its
    block map (e2fsprogs: i_block, then i_size_high, then i_size), and the extent tree blocks."""
    bs = BLOCK_SIZE
    tree = extent.tree_blocks(nblocks, bs)
    i_block, tree_bytes = extent.encode_extent_tree(start, nblocks, start + nblocks, bs)
    size = nblocks * bs
    encode_inode(
        itable,
        (EXT4_JOURNAL_INO - 1) * EXT4_INODE_SIZE,
        mode=stat.S_IFREG | 0o600,
        uid=0,
        gid=0,
        size=size,
        mtime_ns=0,
        links_count=1,
        blocks_512=(nblocks + tree) * (bs // 512),
        flags=EXT4_EXTENTS_FL,
        i_block=i_block,
    )
    jnl_blocks = i_block + (size >> 32).to_bytes(4, "little") + (size & 0xFFFFFFFF).to_bytes(4, "little")
    return jnl_blocks, tree_bytes


class _Regions:
    """Appends regions in address order, merging adjacent zero regions and sharing bitmap buffers."""

    def __init__(self) -> None:
        self.regions: list[Region] = []
        self.end = 0
        self._bitmaps: dict[tuple[int, int], bytes] = {}

    def add_bytes(self, data: bytes) -> None:
        if data:
            self.regions.append(Region(self.end, len(data), BYTES, data, 0, len(data)))
            self.end += len(data)

    def add_zero(self, length: int) -> None:
        assert length >= 0
        if not length:
            return
        last = self.regions[-1] if self.regions else None
        if last is not None and last.kind == ZERO:
            self.regions[-1] = last._replace(length=last.length + length)
        else:
            self.regions.append(Region(self.end, length, ZERO))
        self.end += length

    def add_bitmap(self, used: int, valid: int) -> None:
        key = (used, valid)
        buf = self._bitmaps.get(key)
        if buf is None:
            buf = prefix_bitmap(used, valid, BLOCK_SIZE)
            if buf == _ZERO_BLOCK:
                buf = _ZERO_BLOCK
            elif buf == _ONES_BLOCK:
                buf = _ONES_BLOCK
            self._bitmaps[key] = buf
        if buf is _ZERO_BLOCK:
            self.add_zero(BLOCK_SIZE)
        else:
            self.add_bytes(buf)


__all__ = ["BYTES", "FILE", "ZERO", "Layout", "PlanOptions", "Region", "plan"]
