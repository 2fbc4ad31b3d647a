"""`kloset-blocks mkstore`: write a Kloset store (or add a snapshot to one) from a directory or
a tar stream, for tests and demos. The passphrase comes from $PLAKAR_PASSPHRASE or
--passphrase-file, never from argv. Prints the new snapshot id."""

from __future__ import annotations

import argparse
import os

from kloset_blocks.errors import PassphraseError, UsageError
from kloset_blocks.store.passphrase import PASSPHRASE_ENV
from kloset_blocks.units import parse_size


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "mkstore",
        help="write a Kloset store (or add a snapshot to one) from a directory or a tar",
        description="Write a Kloset store at DEST holding one snapshot of a directory or a tar stream; "
        "if DEST is already a store, add the snapshot to it (only new chunks are written). "
        f"The passphrase of an encrypted store comes from ${PASSPHRASE_ENV} or --passphrase-file.",
    )
    p.add_argument(
        "dest", metavar="DEST", help="store: a directory, s3://HOST/BUCKET[/PREFIX] or sftp://HOST/PATH"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-dir", metavar="DIR", help="back up this directory (it becomes /)")
    src.add_argument(
        "--from-tar", metavar="FILE", help="import this tar (or - for stdin), like tar:// in plakar"
    )
    p.add_argument(
        "--compression",
        default="LZ4",
        type=str.upper,
        choices=["LZ4", "GZIP", "ZSTD", "NONE"],
        help="new store",
    )
    p.add_argument(
        "--hashing", default="BLAKE3", type=str.upper, choices=["BLAKE3", "SHA256"], help="new store"
    )
    p.add_argument("--plaintext", action="store_true", help="new store without encryption")
    p.add_argument("--passphrase-file", metavar="FILE", help="read the passphrase from FILE")
    p.add_argument("--chunk-min", type=parse_size, metavar="SIZE")
    p.add_argument("--chunk-avg", type=parse_size, metavar="SIZE")
    p.add_argument("--chunk-max", type=parse_size, metavar="SIZE")
    p.add_argument("--btree-order", type=int, default=50, metavar="N", help="VFS B+tree order (>= 3)")
    p.add_argument("--packfile-max", type=parse_size, metavar="SIZE", help="flush packfiles at this size")
    p.add_argument("--kdf-time", type=int, default=4, metavar="N", help="Argon2id passes (new store)")
    p.add_argument(
        "--kdf-memory", type=parse_size, default=256 << 20, metavar="SIZE", help="Argon2id memory (new store)"
    )
    p.add_argument("--seed", type=int, help="seed ids and padding, for reproducible layouts")
    p.set_defaults(handler=run)


def _passphrase(args: argparse.Namespace, required: bool) -> bytes | None:
    if args.passphrase_file:
        try:
            with open(args.passphrase_file, "rb") as f:
                data = f.read()
        except OSError as e:
            raise UsageError(f"cannot read passphrase file {args.passphrase_file}: {e.strerror}") from None
        return data[:-1] if data.endswith(b"\n") else data
    env = os.environb.get(PASSPHRASE_ENV.encode())
    if env is not None:
        return env
    if required:
        raise PassphraseError(
            f"an encrypted store needs a passphrase: set {PASSPHRASE_ENV} or pass --passphrase-file FILE"
        )
    return None


def run(args: argparse.Namespace) -> int:
    from kloset_blocks.store.location import parse_location

    loc = parse_location(args.dest)
    if not loc.remote:
        return _write(args, loc.path)
    from kloset_blocks.store.upload import remote_workdir

    with remote_workdir(loc) as workdir:
        return _write(args, workdir)


def _write(args: argparse.Namespace, dest: str) -> int:
    from kloset_blocks.writer.store import (
        DEFAULT_CHUNKING,
        DEFAULT_PACKFILE_MAX,
        add_snapshot,
        is_store,
        write_store,
    )

    source = args.from_dir if args.from_dir is not None else args.from_tar
    if args.from_dir is not None and not os.path.isdir(args.from_dir):
        raise UsageError(f"--from-dir {args.from_dir}: not a directory")
    chunking = {"chunk_min": args.chunk_min, "chunk_avg": args.chunk_avg, "chunk_max": args.chunk_max}
    if is_store(dest):
        snapshot_id = add_snapshot(
            dest,
            source,
            passphrase=_passphrase(args, required=False),
            btree_order=args.btree_order,
            packfile_max=args.packfile_max,
            seed=args.seed,
            **chunking,
        )
    else:
        defaults = dict(zip(chunking, DEFAULT_CHUNKING, strict=True))
        snapshot_id = write_store(
            dest,
            source,
            passphrase=None if args.plaintext else _passphrase(args, required=True),
            compression=None if args.compression == "NONE" else args.compression,
            hashing=args.hashing,
            btree_order=args.btree_order,
            packfile_max=args.packfile_max or DEFAULT_PACKFILE_MAX,
            kdf_time=args.kdf_time,
            kdf_memory_kib=max(8, args.kdf_memory // 1024),
            seed=args.seed,
            all_buckets=True,
            **{k: v if v is not None else defaults[k] for k, v in chunking.items()},
        )
    print(snapshot_id)
    return 0
