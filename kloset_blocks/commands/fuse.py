# `expose` and `browse`: the two read-only FUSE views (kloset_blocks.fuse), for a human.
#
# - expose STORE SNAP FILE: FILE (created if missing; an existing one must be an empty regular file)
#   becomes the synthesized ext4 image, as one read-only file. Removed again at exit if we made it.
# - browse STORE SNAP DIR: DIR (created if missing) shows the snapshot's files, read-only.
# Both serve in the foreground until Ctrl-C/SIGTERM (then unmount), or with --daemon detach once
# mounted and print how to stop them; `kloset-blocks down` stops them too.
# Secrets: --passphrase-file FILE, else $PLAKAR_PASSPHRASE, else a prompt; never in argv. A key
# derived by a parent is used only when the parent says so (--key-from-env, internal).
from __future__ import annotations

import argparse
import contextlib
import os
import stat
from pathlib import Path

from kloset_blocks.errors import UsageError
from kloset_blocks.serving.server import PluginConfig
from kloset_blocks.units import parse_size


def _root_path(value: str) -> bytes:
    return ("/" + value.strip("/")).encode("utf-8", "surrogateescape")


def _passphrase_spec(args: argparse.Namespace) -> str | None:
    return f"+{args.passphrase_file}" if args.passphrase_file else None


def _check_fuse() -> None:
    if not os.path.exists("/dev/fuse"):
        raise UsageError("/dev/fuse is missing: load the fuse module (modprobe fuse)")


# ---------------------------------------------------------------- expose


def prepare_file(path: Path) -> bool:
    """Make sure `path` can be the mountpoint of the image file; True if we created it."""
    from kloset_blocks.fuse.mount import check_not_mounted

    check_not_mounted(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if not path.parent.is_dir():
            raise UsageError(f"{path.parent} is not a directory") from None
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
        os.close(fd)
        return True
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{path} exists and is not a regular file: give a new or empty file path")
    if st.st_size:
        raise UsageError(f"{path} is not empty ({st.st_size} bytes): give a new or empty file path")
    return False


def cmd_expose(args: argparse.Namespace) -> int:
    from kloset_blocks.fuse import image_file
    from kloset_blocks.fuse.mount import run_view

    _check_fuse()
    config = PluginConfig(
        store=args.store,
        snapshot=args.snapshot,
        path=_root_path(args.path) if args.path else b"/",
        pgdata=args.pgdata,
        owner=args.owner,
        free=args.free,
        label=args.label or "",
        journal=args.journal,
        cache=args.cache,
        readahead=args.readahead,
        passphrase=_passphrase_spec(args),
        key_env=args.key_from_env,
    )
    if args.pgdata and args.path:
        raise UsageError("give either --path or --pgdata, not both")
    path = Path(args.file).absolute()
    created = prepare_file(path)

    def remove_created() -> None:  # runs in the serving process, after the unmount
        if created:
            with contextlib.suppress(OSError):
                os.unlink(path)

    return run_view(
        lambda: image_file.build(config),
        path,
        "expose",
        f"kloset:{args.snapshot or 'latest'}",
        daemon=args.daemon,
        record=not args.no_run_dir,
        describe=lambda ops: ops.describe(),
        on_exit=remove_created,
    )


# ---------------------------------------------------------------- browse


def cmd_browse(args: argparse.Namespace) -> int:
    from kloset_blocks.fuse import tree
    from kloset_blocks.fuse.mount import check_not_mounted, run_view

    _check_fuse()
    path = Path(args.dir).absolute()
    check_not_mounted(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path} is not a directory")
    if not path.exists():
        if not path.parent.is_dir():
            raise UsageError(f"{path.parent} is not a directory")
        path.mkdir()
    root = _root_path(args.path) if args.path else b"/"
    return run_view(
        lambda: tree.build(
            args.store,
            args.snapshot,
            root,
            passphrase=_passphrase_spec(args),
            cache=args.cache,
            readahead=args.readahead,
        ),
        path,
        "browse",
        f"kloset:{args.snapshot or 'latest'}",
        daemon=args.daemon,
        record=not args.no_run_dir,
        describe=lambda ops: ops.describe(),
    )


# ---------------------------------------------------------------- parser


def register(subparsers: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("store", metavar="STORE", help="Kloset store, e.g. fs:/var/backups")
    common.add_argument("snapshot", metavar="SNAP", help="snapshot id prefix ('latest' for the newest)")
    common.add_argument("--passphrase-file", metavar="FILE", help="else $PLAKAR_PASSPHRASE, else a prompt")
    common.add_argument("--cache", type=parse_size, default=512 << 20, metavar="SIZE",
                        help="decoded-chunk cache (default 512M)")  # fmt: skip
    common.add_argument("--readahead", type=parse_size, default=8 << 20, metavar="SIZE",
                        help="sequential readahead (default 8M; 0 disables)")  # fmt: skip
    common.add_argument(
        "--daemon", action="store_true", help="detach once mounted (stop: kloset-blocks down)"
    )
    # Internal: the attach chain (mount --backend fuse) records the process in its own run directory.
    common.add_argument("--no-run-dir", action="store_true", help=argparse.SUPPRESS)

    p = subparsers.add_parser(
        "expose",
        parents=[common],
        help="the snapshot's ext4 image as one read-only file (FUSE)",
        description="Mount a FUSE filesystem on FILE whose only inode is the synthesized ext4 image: "
        "e2fsck -fn FILE, debugfs FILE, losetup -r FILE and qemu-img create -b FILE -F raw work on it.",
    )
    p.add_argument("file", metavar="FILE", help="the image file (created if missing; must be empty)")
    p.add_argument("--path", help="serve this directory of the snapshot as the filesystem root")
    p.add_argument("--pgdata", action="store_true", help="serve the directory holding PG_VERSION as root")
    p.add_argument("--owner", metavar="USER", help="give every inode to USER (default: postgres for PGDATA)")
    p.add_argument("--free", type=parse_size, metavar="SIZE", help="virtual free space in the image")
    p.add_argument("--label", help="ext4 volume label")
    p.add_argument("--journal", action="store_true", help="an (empty) jbd2 journal: for a kept overlay")
    # Internal: the key its parent derived is in $KLOSET_BLOCKS_STORE_KEY (fuse.chain.ExposedImage).
    p.add_argument("--key-from-env", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(handler=cmd_expose)

    p = subparsers.add_parser(
        "browse",
        parents=[common],
        help="the snapshot's files as a read-only directory tree (FUSE)",
        description="Mount the snapshot's files on DIR with their modes, owners, sizes and times.",
    )
    p.add_argument("dir", metavar="DIR", help="mountpoint (created if missing)")
    p.add_argument("--path", help="show this directory of the snapshot as the root")
    p.set_defaults(handler=cmd_browse)
