# The logic behind the nbdkit plugin nbdplugin/kloset.py, kept free of the `nbdkit` module so it
# can be tested in a plain interpreter; the plugin script is a thin facade over `Server`.
#
# Lifecycle, as nbdkit drives it:
#   config(key, value)*  -> config_complete() -> get_ready()   [one process, no threads yet]
#   fork -> after_fork() -> open(export) / pread / extents / cache ... [PARALLEL threads]
# get_ready opens the store and builds the default export's image (metadata only), so a wrong
# store, snapshot or passphrase stops nbdkit before it listens (a remote store's image, in an
# nbdkit that never forks: in after_fork, while the connection is made, still before it accepts).
# Other snapshots are served as further exports, named by the full snapshot id (any unique
# prefix, such as the 8-hex short id, is an alias of the same export), their images built on
# first open and then kept. With
# lazy=true (`kloset-blocks query`) the default export too is built on first open, so one broken
# snapshot fails only its own exports. cache-dir= puts a DiskCache (diskcache.py) under the
# ChunkCache: a second tier that persists decoded chunks across runs; a remote store gets one by
# default (a round trip to it costs far more than a disk read).
#
# Reads: BlockImage.readinto stitches regions; file regions read chunks through one ChunkCache
# shared by every export (chunks common to several snapshots are fetched once). nbdkit's `cache`
# requests prefetch their range in the background.
#
# Readahead is adaptive, like the kernel's. A stream is a run of reads each starting where the
# previous one ended (remembered by its end offset, at most _STREAMS of them). Its first read
# prefetches nothing; each read that continues it sets the window to the larger of twice the
# previous window, the request size and RA_MIN, capped at `readahead`, and prefetches from where the
# stream's earlier prefetches stopped up to `end + window`, but never past the end of the file
# whose bytes the read ended in (BlockImage.file_end): the files of a Postgres data directory are
# mostly small, and a fixed window would run from each into its neighbours in the image, decoding
# bytes nobody asked for. A read ending in metadata, zeros or padding prefetches nothing.
# The stream is noted before the read itself, so that the order seen is the order requests arrive
# in, not the order they complete in (which would split nbdcopy's 64 in-flight requests into
# short streams that never ramp up).
#
# Readahead stays off the request path. The image is cut into PLAN_BLOCK-sized blocks; the blocks
# a window covers whole are remembered once asked for (a bounded LRU of block numbers per export),
# so each is planned once however many streams and threads (nbdcopy keeps 64 requests in flight
# over 4 connections) run over it; the partial blocks at a window's edges may be planned again by
# another stream, which costs lookups of chunks already cached or queued. The
# planning (image bytes -> chunk MACs, which may load files' chunk lists from the store) runs on
# one background "planner" thread; the chunk fetches on the cache's prefetch workers, so request
# threads neither rescan the same chunks nor queue on the per-file lock of unloaded chunk lists
# (bench/RESULTS.md, "Adaptive readahead", has the before and after). Requests
# hand ranges to the planner through a SimpleQueue (put() never blocks nor takes a Python-level
# lock; ThreadPoolExecutor.submit() takes a process-wide one, a convoy under nbdkit's threads).
#
# A read that fails (damaged or missing data) fails that request only, with EIO. read_failed()
# gives the one line the plugin logs for it: the whole error (snapshot path, chunk, packfile,
# reason) the first time a (path, reason) fails, a short line naming the path on repeats (a kernel
# retries, Postgres retries: a missing packfile once made thousands of lines). The failures,
# counted, go into the stats file (`read_failures`, at most MAX_FAILURES distinct ones; the file is
# rewritten at once on a new failure), which the CLI reads to say which files of the snapshot are
# damaged when a session fails.
from __future__ import annotations

import _thread
import contextlib
import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from queue import Empty, SimpleQueue
from typing import TYPE_CHECKING, Any, NamedTuple

from kloset_blocks.errors import KlosetError, UsageError
from kloset_blocks.image.block import BlockImage
from kloset_blocks.image.snapshot import ImageOptions, chunk_macs, snapshot_image
from kloset_blocks.serving.chunks import ChunkCache
from kloset_blocks.serving.nbdkit import VIEW_ENV
from kloset_blocks.store.codec import RT_CHUNK
from kloset_blocks.store.diskcache import DISK_CACHE_SIZE
from kloset_blocks.store.passphrase import Secret, key_from_env, passphrase_source
from kloset_blocks.units import format_size, parse_size

if TYPE_CHECKING:
    from kloset_blocks.serving.startup import StartupProfile
    from kloset_blocks.store import SnapshotInfo, Store
    from kloset_blocks.store.diskcache import DiskCache

CONFIG_HELP = """\
store=STORE        Kloset store: fs:/path, fs:///path, /path, s3://HOST[:PORT]/BUCKET[/PREFIX] or
                   sftp://[USER@]HOST[:PORT]/PATH (required; remote options: store/options.py)
snapshot=PREFIX    snapshot id prefix (default: the latest)
path=PATH          serve this directory of the snapshot as the filesystem root (default /)
pgdata=true        serve the directory holding PG_VERSION as the root
owner=USER         give every inode to USER (default: postgres when serving a Postgres data directory)
uid=N gid=N        give every inode to this uid/gid
free=SIZE          virtual free space in the image (default: max(1G, data size))
label=LABEL        ext4 volume label
journal=true       give the filesystem an (empty) jbd2 journal, so that a kept overlay survives a
                   crash: the kernel or `e2fsck -p` replays it (default false)
cache=SIZE         decoded-chunk cache (default 512M); chunks used once share at most a quarter of
                   it (64M at most), so a long scan does not push out chunks used again
readahead=SIZE     cap of the sequential readahead window, which grows from the request size and
                   stops at the end of the file being read (default 8M; 0 disables)
passphrase=-|+FILE passphrase: - prompts, +FILE reads a file (default: $KLOSET_BLOCKS_STORE_KEY, the
                   key already derived, which kloset-blocks hands the nbdkit it starts; then
                   $PLAKAR_PASSPHRASE; then a prompt)
lazy=true          build every export's image on first open, the default one too (a snapshot that
                   cannot be served then fails its own open, not nbdkit's start)
cache-dir=DIR      persistent on-disk chunk cache (zstd entries, MAC-checked on every hit); for a
                   remote store (s3://, sftp://) on by default in $XDG_CACHE_HOME/kloset-blocks;
                   cache-dir=off turns it off
cache-dir-size=SIZE bound of the on-disk cache (default 4G; least recently used entries go first)
stats=FILE         write cache and fetch counters as JSON to FILE at exit (and when a client closes)"""

# Sequential streams remembered for readahead (the end offsets of recent reads): more than the
# requests a client keeps in flight, or out-of-order replies hide the streams.
_STREAMS = 256
# The smallest readahead window of a sequential stream (the kernel's initial window is 128 KiB too).
RA_MIN = 128 << 10
# Readahead granularity, and the smallest number of planned blocks remembered per export.
PLAN_BLOCK = 1 << 20
_PLANNED_MIN = 64
# Distinct read failures kept for the stats file; more are counted, not kept.
MAX_FAILURES = 100
# Packfiles opened with a remote store's connection after the fork: those the warm-up read most of.
WARMED_OPENED = 16


@dataclass
class PluginConfig:
    store: str | None = None
    snapshot: str = ""
    path: bytes = b"/"
    pgdata: bool = False
    owner: str | None = None
    uid: int | None = None
    gid: int | None = None
    free: int | None = None
    label: str = ""
    cache: int = 512 << 20
    readahead: int = 8 << 20
    passphrase: str | None = None
    key_env: bool = True  # take a parent's derived key from $KLOSET_BLOCKS_STORE_KEY
    stats: str | None = None
    lazy: bool = False
    journal: bool = False
    cache_dir: str | None = None
    cache_dir_size: int = DISK_CACHE_SIZE

    def set(self, key: str, value: str) -> None:
        setter = _SETTERS.get(key)
        if setter is None:
            raise UsageError(f"unknown parameter {key}= (known: {', '.join(sorted(_SETTERS))})")
        try:
            setter(self, value)
        except ValueError:
            raise UsageError(f"bad value for {key}=: {value!r}") from None

    def check(self) -> None:
        if not self.store:
            raise UsageError("store= is required (e.g. store=fs:/var/backups)")
        if self.owner is not None and (self.uid is not None or self.gid is not None):
            raise UsageError("give either owner= or uid=/gid=, not both")

    def secret(self) -> tuple[Secret | None, bytes | None]:
        """(passphrase, key) for open_store, by the one precedence rule (store/passphrase.py): an
        explicit passphrase= first, then the key a parent derived and handed to us (key_env), then
        $PLAKAR_PASSPHRASE, then a prompt."""
        assert self.store is not None
        if self.passphrase is None and self.key_env:
            key = key_from_env()
            if key is not None:
                return None, key
        return passphrase_source(self.passphrase, self.store), None

    def image_options(self) -> ImageOptions:
        return ImageOptions(
            path=self.path,
            pgdata=self.pgdata,
            owner=self.owner,
            uid=self.uid,
            gid=self.gid,
            free=self.free,
            label=self.label.encode(),
            journal=self.journal,
        )


def _bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def _path(value: str) -> bytes:
    return ("/" + value.strip("/")).encode("utf-8", "surrogateescape")


_SETTERS: dict[str, Any] = {
    "store": lambda c, v: setattr(c, "store", v),
    "snapshot": lambda c, v: setattr(c, "snapshot", v),
    "path": lambda c, v: setattr(c, "path", _path(v)),
    "pgdata": lambda c, v: setattr(c, "pgdata", _bool(v)),
    "owner": lambda c, v: setattr(c, "owner", v),
    "uid": lambda c, v: setattr(c, "uid", int(v)),
    "gid": lambda c, v: setattr(c, "gid", int(v)),
    "free": lambda c, v: setattr(c, "free", parse_size(v)),
    "label": lambda c, v: setattr(c, "label", v),
    "cache": lambda c, v: setattr(c, "cache", parse_size(v)),
    "readahead": lambda c, v: setattr(c, "readahead", parse_size(v)),
    "passphrase": lambda c, v: setattr(c, "passphrase", v),
    "stats": lambda c, v: setattr(c, "stats", v),
    "lazy": lambda c, v: setattr(c, "lazy", _bool(v)),
    "journal": lambda c, v: setattr(c, "journal", _bool(v)),
    "cache-dir": lambda c, v: setattr(c, "cache_dir", v),
    "cache-dir-size": lambda c, v: setattr(c, "cache_dir_size", parse_size(v)),
}

CONFIG_KEYS = tuple(_SETTERS)


class Stream(NamedTuple):
    window: int  # readahead window of the stream's last read (0 after its first read)
    planned_to: int  # image offset where the prefetches this stream asked for end


@dataclass
class Export:
    name: str
    description: str
    image: BlockImage
    streams: OrderedDict[int, Stream] = field(default_factory=OrderedDict)  # by end offset
    planned: OrderedDict[int, None] = field(default_factory=OrderedDict)  # block numbers
    lock: threading.Lock = field(default_factory=threading.Lock)


_FOREGROUND = (b"-f", b"--foreground", b"-s", b"--single")


def nbdkit_in_foreground(cmdline: str = "/proc/self/cmdline") -> bool:
    """Whether this process is an nbdkit told -f (--foreground) or -s (--single, which implies it),
    and not --run: its after_fork comes right after get_ready, in the same process, before it
    accepts a connection. A forking nbdkit (a daemon; captive under --run, which forks the server
    off even with -f) or a test's Server: no."""
    try:
        with open(cmdline, "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    if os.path.basename(argv[0]) != b"nbdkit" or any(a == b"--run" or a.startswith(b"--run=") for a in argv):
        return False
    return any(a in _FOREGROUND for a in argv[1:])


class Server:
    def __init__(self) -> None:
        self.config = PluginConfig()
        self.store: Store | None = None
        self.cache: ChunkCache | None = None
        self.disk: DiskCache | None = None  # with cache-dir= (by default for a remote store)
        self.startup: StartupProfile | None = None  # what a start read (remote stores)
        self._startup_macs: list[bytes] = []
        self._startup_positions: list[tuple[bytes, int]] = []
        self.startup_prefetch: threading.Thread | None = None  # the first open's (it queues, then ends)
        self._build_after_fork = ""  # the default export, built in after_fork (see get_ready)
        self._stats_lock = threading.Lock()
        self.exports: dict[str, Export] = {}
        self.default_export = ""
        self._build_lock = threading.Lock()
        # Planner work: (export, offset, length) to plan, a held lock to release once reached
        # (settle), or None to stop.
        self._plans: SimpleQueue[tuple[Export, int, int] | Any | None] = SimpleQueue()
        self._planner: threading.Thread | None = None
        self._planner_lock = threading.Lock()
        self._failures: dict[tuple[str, str, str], int] = {}  # (export, path, reason) -> count
        self._failures_lock = threading.Lock()
        self._failures_dropped = 0

    # ---- startup -------------------------------------------------------------------------------

    def configure(self, key: str, value: str) -> None:
        self.config.set(key, value)

    def config_complete(self) -> None:
        self.config.check()

    def get_ready(self) -> None:
        from kloset_blocks.store import cache_dir_for, open_store

        assert self.config.store is not None, "config_complete() first"
        passphrase, key = self.config.secret()
        cache_dir = cache_dir_for(self.config.store, self.config.cache_dir)
        self.store = open_store(
            self.config.store,
            passphrase,
            key=key,
            cache_dir=cache_dir,
            cache_size=self.config.cache_dir_size,
            view=os.environ.get(VIEW_ENV),  # what the command that started nbdkit read
        )
        fetch = self.store.read_chunk  # through the on-disk cache, when there is one
        self.disk = self.store.disk
        if self.disk is not None and self.store.remote:  # what this start reads, prefetched next time
            from kloset_blocks.serving.startup import StartupProfile

            self.startup = StartupProfile(self.disk.dir)
            self._startup_macs = [m for m in self.startup.load() if self.store.index.locations(RT_CHUNK, m)]
            self._startup_positions = self.startup.load_positions()
            fetch = self.startup.wrap(fetch)
        # A remote store answers in tens of ms: keep as many fetches in flight as it takes.
        workers = self.store.backend.parallelism if self.store.remote else 2
        self.cache = ChunkCache(fetch, max_bytes=self.config.cache, prefetch_workers=workers)
        info = self.store.find_snapshot(self.config.snapshot)
        self.default_export = info.hex_id
        # No thread may start before after_fork (nbdkit reopens stdin and stdout on fds 0 and 1
        # between the two: a thread's new socket there made it exit, "open: Resource temporarily
        # unavailable"); in an nbdkit that does not fork, after_fork comes before the first
        # connection is accepted: a remote store's image is built there, while the connection is
        # made (its errors stop nbdkit there, as here).
        if not self.config.lazy and self.store.remote and nbdkit_in_foreground():
            self._build_after_fork = info.hex_id
        elif not self.config.lazy:
            self._export(info.hex_id)
        # nbdkit may fork now, with C's fork(): no thread of ours may be alive (its child would
        # wait for it forever at exit); the pools are made anew on first use.
        self.store.packfiles.stop_threads()
        if self.disk is not None:
            self.disk.flush()

    def after_fork(self) -> None:
        """nbdkit has forked (or, with -f, would have): threads may start now. A remote store's
        connection is made in the background, so that a start whose reads are all in the on-disk
        cache never waits for it; the packfiles the warm-up read from are opened with it (SFTP:
        a first read from each then costs one round trip, not two). Then the image get_ready left
        (nbdkit -f), built while the connection is made."""
        if self.store is not None and self.store.remote:
            self.store.backend.connect_in_background(self.store.packfiles.warmed(WARMED_OPENED))
        if self._build_after_fork:
            self._export(self._build_after_fork)

    # ---- exports -------------------------------------------------------------------------------

    def list_exports(self) -> list[tuple[str, str]]:
        return [(info.hex_id, describe(info)) for info in reversed(self.store.snapshots())]

    def open(self, export_name: str) -> Export:
        if self._startup_macs:  # on the first connection: worker threads do not survive the fork
            with self._build_lock:
                macs, self._startup_macs = self._startup_macs, []
            self.cache.prefetch(macs)
        export = self._export(export_name or self.default_export)
        if self.startup is not None and self.startup_prefetch is None:  # the first open, once
            with self._build_lock:
                if self.startup_prefetch is None:
                    positions, self._startup_positions = self._startup_positions, []
                    self.startup_prefetch = threading.Thread(
                        target=self._prefetch_startup, args=(export, positions), daemon=True
                    )
                    self.startup_prefetch.start()
        return export

    def _prefetch_startup(self, export: Export, positions: list[tuple[bytes, int]]) -> None:
        """The chunks at the places the last start read, in this snapshot (its files may have
        changed), and the WAL this snapshot's recovery begins with (another file at every backup)."""
        from kloset_blocks.serving.startup import at_positions, wal_start

        assert self.cache is not None
        with contextlib.suppress(KlosetError):  # a hint: what fails is read (and said) later
            macs = wal_start(export.image) + at_positions(export.image, positions)
            self.cache.prefetch(list(dict.fromkeys(macs)))

    def _export(self, name: str) -> Export:
        """The export of the snapshot `name` identifies: its full id, or any unique prefix (the 8-hex
        short id is the usual alias). One export, and one image, per snapshot, whatever the name."""
        hex_id = self.store.find_snapshot(name).hex_id
        with self._build_lock:
            export = self.exports.get(hex_id)
            if export is None:
                export = self.exports[hex_id] = self._build(hex_id)
            return export

    def _build(self, hex_id: str) -> Export:
        assert self.store is not None and self.cache is not None, "get_ready() first"
        snapshot = self.store.open_snapshot(hex_id)
        snapshot.fetch_chunk = self.cache.get
        image, root = snapshot_image(snapshot, self.config.image_options())
        if self.store.remote:  # the first reads of a start, fetched at once (startup.py)
            from kloset_blocks.serving.startup import warm_up

            warm_up(image, self.store, self.disk)
        info = snapshot.info
        description = f"{describe(info)}, {root.decode(errors='replace')} as ext4 ({format_size(image.size)})"
        return Export(info.hex_id, description, image)

    # ---- reads ---------------------------------------------------------------------------------

    def pread(self, export: Export, buf: memoryview, offset: int) -> None:
        if self.config.readahead and len(buf):
            self._readahead(export, offset, len(buf))
        export.image.readinto(buf, offset)

    def read_failed(self, export: Export, offset: int, length: int, error: KlosetError) -> str:
        """Record a failed read; the line to log for it (the whole error the first time)."""
        path = getattr(error, "path", "")
        reason = getattr(error, "reason", str(error))
        key = (export.name, path, reason)
        with self._failures_lock:
            count = self._failures.get(key, 0) + 1
            if count > 1 or len(self._failures) < MAX_FAILURES:
                self._failures[key] = count
            else:
                self._failures_dropped += 1
        where = f"read {length}@{offset} of export {export.name}"
        if count == 1:
            if self.config.stats:  # now, not at disconnect: a failing session reads it before teardown
                self.write_stats()
            return f"{where}: {error}"
        return f"{where}: {path or reason[:120]}: failed again ({count} times)"

    def failures(self) -> list[dict[str, Any]]:
        with self._failures_lock:
            items = sorted(self._failures.items())
        return [{"export": e, "path": p, "reason": r, "count": n} for (e, p, r), n in items]

    def _readahead(self, export: Export, offset: int, length: int) -> None:
        end = offset + length
        with export.lock:
            prev = export.streams.pop(offset, None)
            if prev is None:
                window, start, limit = 0, end, end
            else:
                window = min(self.config.readahead, max(2 * prev.window, length, RA_MIN))
                start = max(end, prev.planned_to)
                limit = min(end + window, export.image.file_end(end - 1))
            export.streams[end] = Stream(window, max(start, limit))
            while len(export.streams) > _STREAMS:
                export.streams.popitem(last=False)
            ranges = self._unplanned(export, start, limit) if start < limit else []
        for first, stop in ranges:
            self.prefetch(export, first, stop - first)

    def _unplanned(self, export: Export, start: int, limit: int) -> list[tuple[int, int]]:
        """The parts of [start, limit) not in a block planned recently, as (start, end) runs; the
        blocks the range covers whole are remembered as planned. Called under export.lock."""
        # Blocks planned are remembered for about as many bytes as the cache's first-use queue
        # holds (chunks.py): after that their chunks may have left it, and a new pass over them
        # should prefetch again.
        assert self.cache is not None
        keep = max(_PLANNED_MIN, self.cache.recent_max // PLAN_BLOCK)
        planned = export.planned
        runs: list[tuple[int, int]] = []
        for block in range(start // PLAN_BLOCK, (limit - 1) // PLAN_BLOCK + 1):
            if block in planned:
                planned.move_to_end(block)
                continue
            lo, hi = max(start, block * PLAN_BLOCK), min(limit, (block + 1) * PLAN_BLOCK)
            if hi - lo == PLAN_BLOCK:
                planned[block] = None
            if runs and runs[-1][1] == lo:
                runs[-1] = (runs[-1][0], hi)
            else:
                runs.append((lo, hi))
        while len(planned) > keep:
            planned.popitem(last=False)
        return runs

    def prefetch(self, export: Export, offset: int, length: int) -> None:
        """Prefetch the chunks of [offset, offset+length) of the image, planned in the background."""
        length = max(0, min(length, export.image.size - offset))
        if length:
            self._start_planner()
            self._plans.put((export, offset, length))

    def settle(self) -> None:
        """Return once every prefetch asked for so far is planned and fetched."""
        if self._planner is not None:
            reached = _thread.allocate_lock()
            reached.acquire()
            self._plans.put(reached)
            reached.acquire()  # the planner releases it: everything queued before is planned
        if self.cache is not None:
            self.cache.wait_idle()

    def _plan_loop(self) -> None:
        while (work := self._plans.get()) is not None:
            if not isinstance(work, tuple):
                work.release()
                continue
            export, offset, length = work
            # A damaged chunk list is not reported here: the foreground read of those bytes does it.
            with contextlib.suppress(KlosetError):
                assert self.cache is not None
                self.cache.prefetch(chunk_macs(export.image, offset, length))

    def _start_planner(self) -> None:
        # Started on first use, after nbdkit's fork (threads do not survive it).
        if self._planner is None:
            with self._planner_lock:
                if self._planner is None:
                    planner = threading.Thread(target=self._plan_loop, name="kloset-planner", daemon=True)
                    planner.start()
                    self._planner = planner

    def _drop_queued_plans(self) -> None:
        # At exit, planning what nobody will read is wasted time; waiters of settle() still wake.
        while True:
            try:
                work = self._plans.get_nowait()
            except Empty:
                return
            if work is not None and not isinstance(work, tuple):
                work.release()

    def extents(self, export: Export, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return export.image.extents(offset, length)

    # ---- exit ----------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        counters = self.cache.stats.as_dict() if self.cache else {}
        if self.store is not None:
            counters.update(self.store.stats())
        if self.disk is not None:
            counters.update(self.disk.stats.as_dict())
        failures = self.failures()
        if failures:
            counters["read_failures"] = failures
            counters["read_failures_dropped"] = self._failures_dropped
        return counters

    def close(self, export: Export) -> None:
        # A client is gone: publish the counters so far (a run serving several exports, like
        # `kloset-blocks query`, reads them between snapshots without stopping nbdkit).
        if self.config.stats:
            self.write_stats()

    def write_stats(self) -> None:
        assert self.config.stats is not None
        with self._stats_lock:
            tmp = self.config.stats + ".tmp"
            # 0600 whatever nbdkit's umask: the counters name the store's snapshots and sizes.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(self.stats(), f, indent=1, sort_keys=True)
            os.replace(tmp, self.config.stats)

    def cleanup(self) -> None:
        if self._planner is not None:
            self._drop_queued_plans()
            self._plans.put(None)
            self._planner.join()
            self._planner = None
        if self.cache is not None:
            self.cache.shutdown()
        if self.startup is not None:
            self.startup.save(export.image for export in self.exports.values())
        if self.disk is not None:
            self.disk.flush()
        if self.config.stats:
            self.write_stats()


def describe(info: SnapshotInfo) -> str:
    return f"snapshot {info.short_id} of {info.timestamp:%Y-%m-%d %H:%M:%S} ({info.name})"


__all__ = ["CONFIG_HELP", "CONFIG_KEYS", "Export", "KlosetError", "PluginConfig", "Server"]
