# From a snapshot to the block image that is served: which directory becomes the filesystem root
# (a given path, or the directory holding PG_VERSION), who owns every inode (by default the local
# `postgres` user when the root is a Postgres data directory, since Postgres refuses a data
# directory it does not own), then the ext4 plan. One function used by the nbdkit plugin, the
# `image` command and the FUSE views, so that all of them serve the same bytes for the same options.
#
# Only metadata is read here: entries through the snapshot's B+tree walk. File data stays in the
# store until someone reads it.
from __future__ import annotations

import pwd
from collections.abc import Iterator
from dataclasses import dataclass

from kloset_blocks.errors import NotFound, UsageError
from kloset_blocks.ext4.layout import PlanOptions, plan
from kloset_blocks.image.block import BlockImage
from kloset_blocks.pgdata import find_pgdata, holds_pgdata
from kloset_blocks.store.snapshot import Snapshot, SnapshotFile


@dataclass(frozen=True)
class ImageOptions:
    path: bytes = b"/"
    pgdata: bool = False  # serve the directory holding PG_VERSION, wherever it is
    owner: str | None = None  # a user name; None: postgres for a data directory, else keep
    uid: int | None = None
    gid: int | None = None
    free: int | None = None  # virtual free bytes; None: the planner's default
    label: bytes = b""
    on_bad_name: str = "fail"
    journal: bool = False  # an empty jbd2 journal: for an overlay that is kept across runs

    def __post_init__(self) -> None:
        if len(self.label) > 16:
            raise UsageError("the volume label is at most 16 bytes")


def resolve_owner(options: ImageOptions, is_pgdata: bool) -> tuple[int | None, int | None]:
    """The uid/gid every inode gets, or (None, None) to keep the snapshot's owners."""
    if options.uid is not None or options.gid is not None:
        if options.owner is not None:
            raise UsageError("give either an owner or a uid/gid, not both")
        return options.uid, options.gid
    name = options.owner or ("postgres" if is_pgdata else None)
    if name is None:
        return None, None
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise UsageError(f"owner {name}: no such user on this host") from None
    return entry.pw_uid, entry.pw_gid


def plan_options(options: ImageOptions, root: bytes, is_pgdata: bool, uuid_seed: bytes) -> PlanOptions:
    uid, gid = resolve_owner(options, is_pgdata)
    return PlanOptions(
        root=root,
        uid=uid,
        gid=gid,
        free_bytes=options.free,
        label=options.label,
        on_bad_name=options.on_bad_name,
        uuid_seed=uuid_seed,
        journal=options.journal,
    )


def snapshot_image(snapshot: Snapshot, options: ImageOptions) -> tuple[BlockImage, bytes]:
    """The synthesized image of `snapshot` and the snapshot path that is its root."""
    root = find_pgdata(snapshot) if options.pgdata else options.path
    try:
        if not snapshot.lookup(root).is_dir:
            raise UsageError(f"{root.decode(errors='replace')} is not a directory in the snapshot")
    except NotFound:
        raise NotFound(
            f"no directory {root.decode(errors='replace')} in snapshot {snapshot.info.short_id}"
        ) from None
    opts = plan_options(options, root, holds_pgdata(snapshot, root), snapshot.info.id)
    return BlockImage(plan(snapshot.nodes(root), opts)), root


def chunk_macs(image: BlockImage, offset: int, length: int) -> Iterator[bytes]:
    """The chunks a read of [offset, offset+length) of the image needs, in order: what to prefetch."""
    for data, file_offset, n in image.file_ranges(offset, length):
        if isinstance(data, SnapshotFile):  # files of local trees have no chunks
            macs = data.macs
            for index, _, _ in data.chunk_ranges(file_offset, n):
                yield macs[index]
