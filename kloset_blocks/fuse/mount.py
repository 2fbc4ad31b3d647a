# What both FUSE views share: read-only operations, mount options, the trio loop, --daemon, and
# the run-directory record that `kloset-blocks down` uses to stop a view.
#
# Strategy: `run_view(build, mountpoint, kind)` builds the operations (opens the store, plans the
# image or the tree: errors surface here, before anything is mounted), mounts, and serves until
# SIGINT/SIGTERM/SIGHUP or an external unmount, then unmounts. With --daemon the process forks
# FIRST and the child does all of that, reporting "ready" or its one-line error through a pipe:
# no thread (store executor, cache prefetch pool) ever lives across a fork.
#
# Invariants:
# - Mounted `ro` with default_permissions: the kernel answers EROFS to every write before it
#   reaches us, and checks modes against the snapshot's owners; the write handlers answer EROFS
#   too, in case a request gets through anyway.
# - Reads run in worker threads (trio.to_thread): a chunk fetch blocks one request, not the loop;
#   the codecs release the GIL. Errors reading the store are logged and become EIO, never bytes.
# - A standalone view records {fuse_view: pid+starttime, fuse_view_mount} in its own run directory
#   (host.rundir.RunDir); `down` signals the pid (we then unmount) and lazily unmounts what remains.
#   At a clean exit the view removes its run directory, unless a `down` holds its lock.
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from kloset_blocks.errors import KlosetError, UsageError
from kloset_blocks.fuse.record import STATE_KIND, STATE_MOUNT, STATE_PROC, FuseViewError
from kloset_blocks.host.mounts import is_mounted
from kloset_blocks.host.procs import proc_record
from kloset_blocks.host.rundir import LOCK_FILE, RunDir, locked
from kloset_blocks.host.signals import signals_blocked, signals_unwind

# Attributes and names never change while mounted: let the kernel cache them for long.
CACHE_TIMEOUT = 3600.0
MAX_TASKS = 32  # concurrent FUSE requests in flight (each read may wait on a chunk fetch)
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def log(msg: str) -> None:
    print(f"kloset-blocks: {msg}", file=sys.stderr, flush=True)


# --- operations --------------------------------------------------------------------------------


def _erofs(*_: Any, **__: Any) -> Any:
    raise pyfuse3.FUSEError(errno.EROFS)


class ReadOnlyOps(pyfuse3.Operations):
    """Every modifying request fails with EROFS."""

    async def setattr(self, *a: Any) -> Any:
        _erofs()

    async def mknod(self, *a: Any) -> Any:
        _erofs()

    async def mkdir(self, *a: Any) -> Any:
        _erofs()

    async def unlink(self, *a: Any) -> Any:
        _erofs()

    async def rmdir(self, *a: Any) -> Any:
        _erofs()

    async def symlink(self, *a: Any) -> Any:
        _erofs()

    async def rename(self, *a: Any) -> Any:
        _erofs()

    async def link(self, *a: Any) -> Any:
        _erofs()

    async def write(self, *a: Any) -> Any:
        _erofs()

    async def create(self, *a: Any) -> Any:
        _erofs()

    async def setxattr(self, *a: Any) -> Any:
        _erofs()

    async def removexattr(self, *a: Any) -> Any:
        _erofs()

    def close(self) -> None:
        """Release what the operations hold (cache threads, store), after the unmount."""


def check_open_flags(flags: int) -> None:
    if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND):
        raise pyfuse3.FUSEError(errno.EROFS)


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking read in a worker thread; a KlosetError (bad store bytes, vanished store)
    becomes EIO with one line on stderr."""
    try:
        return await trio.to_thread.run_sync(fn, *args)
    except KlosetError as e:
        log(f"read error: {e}")
        raise pyfuse3.FUSEError(errno.EIO) from None
    except OSError as e:
        log(f"read error: {e}")
        raise pyfuse3.FUSEError(e.errno or errno.EIO) from None


def attributes(ino: int, mode: int, size: int, uid: int, gid: int, mtime_ns: int, nlink: int = 1,
               rdev: int = 0) -> pyfuse3.EntryAttributes:  # fmt: skip
    a = pyfuse3.EntryAttributes()
    a.st_ino = ino
    a.generation = 0
    a.st_mode = mode
    a.st_nlink = nlink
    a.st_uid = uid
    a.st_gid = gid
    a.st_rdev = rdev
    a.st_size = size
    a.st_blksize = 4096
    a.st_blocks = (size + 511) // 512
    a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = mtime_ns  # Kloset keeps only the mtime
    a.entry_timeout = a.attr_timeout = CACHE_TIMEOUT
    return a


def mount_options(fsname: str) -> set[str]:
    opts = set(pyfuse3.default_options) | {"ro", f"fsname={fsname}", "subtype=kloset-blocks"}
    if os.geteuid() == 0:
        opts.add("allow_other")  # the postgres user (and loop/qemu as other users) may read
    return opts


# --- the loop --------------------------------------------------------------------------------


async def _serve() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal)
        await pyfuse3.main(min_tasks=1, max_tasks=MAX_TASKS)
        nursery.cancel_scope.cancel()  # unmounted from outside (umount, fusermount3 -u)


async def _stop_on_signal() -> None:
    with trio.open_signal_receiver(*_STOP_SIGNALS) as signals:
        async for _ in signals:
            pyfuse3.terminate()
            return


def run_view(
    build: Callable[[], ReadOnlyOps],
    mountpoint: Path,
    kind: str,
    fsname: str,
    *,
    daemon: bool = False,
    record: bool = True,
    describe: Callable[[ReadOnlyOps], str] = lambda ops: "",
    on_exit: Callable[[], None] = lambda: None,
) -> int:
    """Mount the view `build()` makes on `mountpoint` and serve it until told to stop; `on_exit`
    runs last in the serving process (with --daemon, the child), whatever happened."""

    def serve(ready: Callable[[str, RunDir | None], None]) -> int:
        try:
            return _run(build, mountpoint, kind, fsname, record, describe, ready)
        finally:
            on_exit()

    if daemon:
        return _daemonize(serve)
    return serve(lambda text, run: log(text))


def _run(
    build: Callable[[], ReadOnlyOps],
    mountpoint: Path,
    kind: str,
    fsname: str,
    record: bool,
    describe: Callable[[ReadOnlyOps], str],
    ready: Callable[[str, RunDir | None], None],
) -> int:
    with signals_unwind():  # SIGTERM before the trio loop runs still unwinds through `finally`
        ops = build()
        run: RunDir | None = None
        mounted = False
        try:
            if record:
                run = RunDir.create()
                run.record(
                    **{STATE_PROC: proc_record(os.getpid()), STATE_MOUNT: str(mountpoint), STATE_KIND: kind}
                )
            try:
                pyfuse3.init(ops, str(mountpoint), mount_options(fsname))
            except RuntimeError as e:
                raise FuseViewError(f"cannot mount on {mountpoint}: {e}") from None
            mounted = True
            stop = f"stop it with Ctrl-C, `kill {os.getpid()}`, `umount {mountpoint}` or `kloset-blocks down`"
            ready(f"{kind}: {describe(ops)} on {mountpoint} (pid {os.getpid()}); {stop}", run)
            trio.run(_serve)
        finally:
            with signals_blocked():
                if mounted:
                    pyfuse3.close(unmount=True)
                ops.close()
                if run is not None:
                    release_run_dir(run.path)
    return 0


def release_run_dir(path: Path) -> None:
    """Remove our run directory at a clean exit, unless `down` is tearing it down (holds its lock):
    then `down` removes it, and waiting for its lock would deadlock (it waits for us to exit)."""
    with locked(path / LOCK_FILE, wait=False) as mine:
        if mine:
            shutil.rmtree(path, ignore_errors=True)


# --- --daemon --------------------------------------------------------------------------------


def _daemonize(body: Callable[[Callable[[str, RunDir | None], None]], int]) -> int:
    """Fork; the child runs `body` and calls ready(text) once mounted, which hands `text` to the
    parent (it prints it and exits 0) and detaches the child from the terminal."""
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(w)
        with os.fdopen(r, "rb") as f:
            msg = f.read().decode(errors="replace")
        if msg.startswith("ok\n"):
            print(msg[3:], flush=True)
            return 0
        _, status = os.waitpid(pid, 0)
        raise FuseViewError(msg.strip() or f"the view exited before mounting (status {status})")

    os.close(r)
    code = 1

    def ready(text: str, run: RunDir | None) -> None:
        nonlocal w
        os.write(w, b"ok\n" + text.encode())
        os.close(w)
        w = -1
        _detach(run.path / "view.log" if run is not None else None)

    try:
        code = body(ready)
    except KlosetError as e:
        if w >= 0:
            os.write(w, str(e).encode())
        else:
            log(str(e))
    except BaseException as e:  # unexpected: keep the traceback in the log
        if w >= 0:
            os.write(w, f"{type(e).__name__}: {e}".encode())
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _detach(log_path: Path | None) -> None:
    os.setsid()  # no controlling terminal: no SIGINT/SIGHUP from the shell that started us
    null = os.open(os.devnull, os.O_RDWR)
    out = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) if log_path else null
    os.dup2(null, 0)
    os.dup2(out, 1)
    os.dup2(out, 2)
    for fd in {null, out}:
        os.close(fd)


def check_not_mounted(path: Path) -> None:
    if is_mounted(path):
        raise UsageError(f"{path} is already a mountpoint")
