# `kloset-blocks image`: write the synthesized ext4 image of a snapshot (or of a local directory)
# to a sparse file. Mostly for inspection (e2fsck, debugfs, loop mounts) and tests: the nbdkit plugin
# serves the same BlockImage without writing anything. Data is read only while writing OUT.img.
from __future__ import annotations

import argparse
import os
import pwd
import sys
from collections.abc import Iterable

from kloset_blocks.errors import NotFound, UsageError
from kloset_blocks.ext4 import PlanOptions, plan
from kloset_blocks.image import BlockImage
from kloset_blocks.tree import Node
from kloset_blocks.units import format_size, parse_size


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "image",
        help="write a snapshot (or a local directory) as an ext4 image file",
        description="Synthesize an ext4 image of a snapshot subtree and write it as a sparse file.",
    )
    p.add_argument("args", nargs="+", metavar="STORE SNAP OUT.img | OUT.img", help="store, snapshot, output")
    p.add_argument("--from-dir", metavar="DIR", help="image a local directory instead of a snapshot")
    p.add_argument("--path", default="/", help="subtree that becomes the image's root (default /)")
    p.add_argument("--pgdata", action="store_true", help="root the image at the directory holding PG_VERSION")
    p.add_argument("--owner", metavar="USER", help="owner of every inode (default with --pgdata: postgres)")
    p.add_argument("--uid", type=int, help="uid of every inode")
    p.add_argument("--gid", type=int, help="gid of every inode")
    p.add_argument("--free", default=None, metavar="SIZE", help="free space (default max(1G, data size))")
    p.add_argument("--label", default="", help="volume label (at most 16 bytes)")
    p.add_argument("--on-bad-name", choices=("fail", "skip"), default="fail")
    p.add_argument("--passphrase-file", metavar="FILE", help="passphrase of an encrypted store")
    p.set_defaults(handler=run)


def _owner(args: argparse.Namespace) -> tuple[int | None, int | None]:
    if args.owner is not None:
        if args.uid is not None or args.gid is not None:
            raise UsageError("--owner and --uid/--gid are exclusive")
        return _user(args.owner)
    if args.uid is not None or args.gid is not None:
        return args.uid, args.gid
    if args.pgdata:
        try:
            return _user("postgres")
        except UsageError:
            return None, None
    return None, None


def _user(name: str) -> tuple[int, int]:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise UsageError(f"no such user: {name}") from None
    return pw.pw_uid, pw.pw_gid


def find_pgdata(nodes: Iterable[Node]) -> bytes:
    """The shallowest directory holding a PG_VERSION file."""
    best: bytes | None = None
    for n in nodes:
        if n.path.endswith(b"/PG_VERSION"):
            d = n.path[: -len(b"/PG_VERSION")] or b"/"
            if (
                best is None
                or d.count(b"/") < best.count(b"/")
                or (d.count(b"/") == best.count(b"/") and d < best)
            ):
                best = d
    if best is None:
        raise NotFound("no PG_VERSION in this tree: not a PostgreSQL data directory")
    return best


def run(args: argparse.Namespace) -> int:
    if args.from_dir is not None:
        if len(args.args) != 1:
            raise UsageError("usage: kloset-blocks image --from-dir DIR OUT.img")
        from kloset_blocks.localtree import walk

        out = args.args[0]

        def source() -> Iterable[Node]:
            return walk(args.from_dir)

        seed = os.fsencode(os.path.abspath(args.from_dir))
    else:
        if len(args.args) != 3:
            raise UsageError("usage: kloset-blocks image STORE SNAP OUT.img")
        from kloset_blocks.store import open_store

        store_loc, snap_prefix, out = args.args
        passphrase = "+" + args.passphrase_file if args.passphrase_file else None
        snap = open_store(store_loc, passphrase).open_snapshot(snap_prefix)

        def source() -> Iterable[Node]:
            # Only the subtree is walked; the reader presents hard links leaving it as copies.
            return snap.nodes(b"/" if args.pgdata else os.fsencode(args.path))

        seed = snap_prefix.encode()
        info = getattr(snap, "info", None)
        if info is not None and getattr(info, "id", None):
            seed = bytes(info.id) if isinstance(info.id, bytes | bytearray) else str(info.id).encode()
    root = os.fsencode(args.path)
    nodes: Iterable[Node] = source()
    if args.pgdata:
        nodes = list(nodes)
        root = find_pgdata(nodes)
    uid, gid = _owner(args)
    label = args.label.encode()
    if len(label) > 16:
        raise UsageError("--label is at most 16 bytes")
    opts = PlanOptions(
        root=root,
        uid=uid,
        gid=gid,
        free_bytes=parse_size(args.free) if args.free is not None else None,
        label=label,
        on_bad_name=args.on_bad_name,
        uuid_seed=seed,
    )
    layout = plan(nodes, opts)
    for w in layout.warnings:
        print(f"kloset-blocks: warning: {w}", file=sys.stderr)
    BlockImage(layout).write_sparse(out)
    print(
        f"{out}: ext4, {format_size(layout.size)}, {layout.files} files, {layout.directories} directories,"
        f" root {os.fsdecode(root)}",
        file=sys.stderr,
    )
    return 0
