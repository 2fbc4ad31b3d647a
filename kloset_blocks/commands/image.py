# `kloset-blocks image`: write the synthesized ext4 image of a snapshot (or of a local directory)
# to a sparse file. Mostly for inspection (e2fsck, debugfs, loop mounts) and tests: the nbdkit plugin
# serves the same BlockImage without writing anything. Data is read only while writing OUT.img.
from __future__ import annotations

import argparse
import os
import stat
import sys

from kloset_blocks.errors import NotFound, UsageError
from kloset_blocks.ext4 import plan
from kloset_blocks.image.block import BlockImage
from kloset_blocks.image.snapshot import ImageOptions, plan_options, snapshot_image
from kloset_blocks.pgdata import find_pgdata_in
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
    p.add_argument("--owner", metavar="USER", help="owner of all inodes (default for a data dir: postgres)")
    p.add_argument("--uid", type=int, help="uid of every inode")
    p.add_argument("--gid", type=int, help="gid of every inode")
    p.add_argument("--free", default=None, metavar="SIZE", help="free space (default max(1G, data size))")
    p.add_argument("--label", default="", help="volume label (at most 16 bytes)")
    p.add_argument("--on-bad-name", choices=("fail", "skip"), default="fail")
    p.add_argument("--passphrase-file", metavar="FILE", help="passphrase of an encrypted store")
    p.set_defaults(handler=run)


def image_options(args: argparse.Namespace) -> ImageOptions:
    return ImageOptions(
        path=os.fsencode(args.path),
        pgdata=args.pgdata,
        owner=args.owner,
        uid=args.uid,
        gid=args.gid,
        free=parse_size(args.free) if args.free is not None else None,
        label=args.label.encode(),
        on_bad_name=args.on_bad_name,
    )


def run(args: argparse.Namespace) -> int:
    from kloset_blocks.errors import LayoutError

    try:
        return _run(args)
    except LayoutError as e:  # the planner names its option; a user gives it as a flag
        raise LayoutError(str(e).replace("on_bad_name='skip'", "--on-bad-name skip")) from None


def _run(args: argparse.Namespace) -> int:
    options = image_options(args)
    if args.from_dir is not None:
        if len(args.args) != 1:
            raise UsageError("usage: kloset-blocks image --from-dir DIR OUT.img")
        (out,) = args.args
        image, root = directory_image(args.from_dir, options)
    else:
        if len(args.args) != 3:
            raise UsageError("usage: kloset-blocks image STORE SNAP OUT.img")
        from kloset_blocks.app.check import open_checked_store

        store_loc, snap_prefix, out = args.args
        snapshot = open_checked_store(store_loc, args.passphrase_file).open_snapshot(snap_prefix)
        image, root = snapshot_image(snapshot, options)
    layout = image.layout
    for w in layout.warnings:
        print(f"kloset-blocks: warning: {w}", file=sys.stderr)
    image.write_sparse(out)
    print(
        f"{out}: ext4, {format_size(layout.size)}, {layout.files} files, {layout.directories} directories,"
        f" root {os.fsdecode(root)}",
        file=sys.stderr,
    )
    return 0


def directory_image(directory: str, options: ImageOptions) -> tuple[BlockImage, bytes]:
    from kloset_blocks.image.localtree import walk

    nodes = list(walk(directory))
    root = options.path
    if options.pgdata:
        found = find_pgdata_in(n.path for n in nodes if stat.S_ISREG(n.mode))
        if found is None:
            raise NotFound(f"{directory} is not a PostgreSQL data directory (no PG_VERSION)")
        root = found
    is_pgdata = any(n.path == root.rstrip(b"/") + b"/PG_VERSION" for n in nodes)
    seed = os.fsencode(os.path.abspath(directory))
    return BlockImage(plan(nodes, plan_options(options, root, is_pgdata, seed))), root
