# The SFTP backend: a Kloset store in a directory of a remote host, the fs layout under PATH, read
# over SSH with paramiko. Host keys as OpenSSH does: ~/.ssh/known_hosts (and the `known_hosts=FILE`
# option) must know the host unless `insecure_ignore_host_key=true`; a key that differs from the
# recorded one is refused. Authentication: `identity=FILE`, else the SSH agent and ~/.ssh/id_*.
#
# Strategy: one SSH connection, several SFTP channels over it (an SFTP channel answers its
# requests in order, so parallel reads need parallel channels); a thread checks a channel out of
# the pool for each call. Ranged reads use readv, which pipelines the 32 KiB SFTP reads of a span
# instead of waiting a round trip for each. Open file handles are kept per channel (bounded), so a
# packfile read again costs one request, not an open, a read and a close.
#
# Invariants:
# - Read-only: files are opened "rb"; no request here changes the remote directory.
# - Every request has a deadline (the channel timeout, `timeout` s) and bounded retries with
#   backoff (options.retry); a broken connection is re-established once per failure. Errors are one
#   StoreError line (host key, authentication, connection); a missing file is FileNotFoundError.
from __future__ import annotations

import contextlib
import errno
import getpass
import os
import queue
import socket
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import paramiko

from kloset_blocks.errors import StoreError
from kloset_blocks.store.location import StoreLocation
from kloset_blocks.store.options import (
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    parse_bool,
    parse_number,
    retry,
    store_options,
)

PARALLELISM = 16
HANDLES_PER_CHANNEL = 64
T = TypeVar("T")


def _transient(e: BaseException) -> bool:
    return isinstance(e, OSError | EOFError | paramiko.SSHException) and not isinstance(e, PermissionError)


def connect(loc: StoreLocation, opts: dict[str, str]) -> paramiko.SSHClient:
    """An authenticated SSH connection (StoreError with one line when it cannot be had)."""
    timeout = parse_number(opts, "timeout", DEFAULT_TIMEOUT)
    client = paramiko.SSHClient()
    with contextlib.suppress(OSError):
        client.load_system_host_keys()
    known = opts.get("known_hosts")
    if known:
        try:
            client.load_host_keys(os.path.expanduser(known))
        except OSError as e:
            raise StoreError(f"cannot read known_hosts file {known}: {e.strerror}") from None
    insecure = parse_bool(opts, "insecure_ignore_host_key", False)
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy() if insecure else paramiko.RejectPolicy())
    user = loc.user or getpass.getuser()
    port = loc.port or 22
    identity = opts.get("identity")
    where = f"{user}@{loc.host}:{port}"
    try:
        client.connect(
            loc.host,
            port=port,
            username=user,
            key_filename=os.path.expanduser(identity) if identity else None,
            timeout=min(timeout, 10.0),
            banner_timeout=timeout,
            auth_timeout=timeout,
            channel_timeout=timeout,
            allow_agent=not identity,
            look_for_keys=not identity,
        )
    except paramiko.BadHostKeyException:
        client.close()
        raise StoreError(
            f"sftp {where}: host key mismatch (the key differs from the one in known_hosts)"
        ) from None
    except paramiko.AuthenticationException:
        client.close()
        raise StoreError(f"sftp {where}: authentication failed (check identity= or the SSH agent)") from None
    except paramiko.SSHException as e:
        client.close()
        if "known_hosts" in str(e) or "not found in" in str(e):
            raise StoreError(
                f"sftp {where}: unknown host key (add it to known_hosts or set insecure_ignore_host_key=true)"
            ) from None
        raise StoreError(f"sftp {where}: {e}") from None
    except (OSError, EOFError) as e:
        client.close()
        reason = e.strerror if isinstance(e, OSError) and e.strerror else (str(e) or type(e).__name__)
        raise StoreError(f"sftp {where}: cannot connect: {reason}") from None
    return client


class _Channel:
    def __init__(self, sftp: paramiko.SFTPClient, timeout: float) -> None:
        self.sftp = sftp
        sftp.get_channel().settimeout(timeout)
        self.handles: OrderedDict[str, tuple[paramiko.SFTPFile, int]] = OrderedDict()

    def handle(self, path: str) -> tuple[paramiko.SFTPFile, int]:
        got = self.handles.get(path)
        if got is not None:
            self.handles.move_to_end(path)
            return got
        f = self.sftp.open(path, "rb")
        got = (f, f.stat().st_size or 0)
        self.handles[path] = got
        if len(self.handles) > HANDLES_PER_CHANNEL:
            _, (old, _) = self.handles.popitem(last=False)
            with contextlib.suppress(Exception):
                old.close()
        return got

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.sftp.close()


class SftpBackend:
    parallelism = PARALLELISM

    def __init__(self, loc: StoreLocation) -> None:
        self.location = loc
        self.opts = store_options("sftp")
        self.timeout = parse_number(self.opts, "timeout", DEFAULT_TIMEOUT)
        self.attempts = 1 + int(parse_number(self.opts, "retries", DEFAULT_RETRIES))
        self.root = loc.path
        self._lock = threading.Lock()
        self._idle: queue.LifoQueue[_Channel] = queue.LifoQueue()
        self._opened = 0
        self._closed = False
        self._client = connect(loc, self.opts)
        self._pid = os.getpid()
        self._forsaken: list[paramiko.SSHClient] = []
        try:
            with self._channel() as ch:
                st = ch.sftp.stat(self.root)
        except (FileNotFoundError, StoreError):
            self.close()
            raise StoreError(f"store not found: {loc.display} (no such directory)") from None
        except Exception as e:
            self.close()
            raise StoreError(f"sftp {loc.display}: {e}") from None
        if not stat.S_ISDIR(st.st_mode or 0):
            self.close()
            raise StoreError(f"store not found: {loc.display} (not a directory)")

    def describe(self, key: str) -> str:
        loc = self.location
        user = f"{loc.user}@" if loc.user else ""
        port = f":{loc.port}" if loc.port else ""
        return f"sftp://{user}{loc.host}{port}{self._path(key)}"

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    @contextlib.contextmanager
    def _channel(self) -> Iterator[_Channel]:
        ch = self._checkout()
        try:
            yield ch
        except BaseException:
            ch.close()  # its state is unknown (a timeout mid-request): do not reuse it
            with self._lock:
                self._opened -= 1
            raise
        self._idle.put(ch)

    def _after_fork(self) -> None:
        # nbdkit forks with C's fork() (no Python at-fork handler runs): the SSH transport's thread
        # is gone in the child, though its objects say it is active. Connect anew; the parent's
        # client is kept unreferenced-free, not closed (closing would wait on the gone thread).
        with self._lock:
            if self._pid == os.getpid():
                return
            self._forsaken.append(self._client)
            self._idle = queue.LifoQueue()
            self._opened = 0
            self._client = connect(self.location, self.opts)
            self._pid = os.getpid()

    def _checkout(self) -> _Channel:
        if self._pid != os.getpid():
            self._after_fork()
        with contextlib.suppress(queue.Empty):
            return self._idle.get_nowait()
        with self._lock:
            if self._closed:
                raise StoreError("store is closed")
            grow = self._opened < self.parallelism
            if grow:
                self._opened += 1
        if not grow:
            try:
                return self._idle.get(timeout=self.timeout)
            except queue.Empty:
                raise TimeoutError("no SFTP channel became free") from None
        try:
            return _Channel(self._transport_client().open_sftp(), self.timeout)
        except BaseException:
            with self._lock:
                self._opened -= 1
            raise

    def _transport_client(self) -> paramiko.SSHClient:
        with self._lock:
            transport = self._client.get_transport()
            if transport is None or not transport.is_active():
                self._client.close()
                self._client = connect(self.location, self.opts)
            return self._client

    def _call(self, key: str, fn: Callable[[_Channel], T], what: str = "read") -> T:
        def once() -> T:
            with self._channel() as ch:
                try:
                    return fn(ch)
                except FileNotFoundError:
                    raise FileNotFoundError(errno.ENOENT, "no such file", self.describe(key)) from None
                except OSError as e:
                    if e.errno == errno.ENOENT:
                        raise FileNotFoundError(errno.ENOENT, "no such file", self.describe(key)) from None
                    raise

        return retry(once, f"cannot {what} {self.describe(key)}", _transient, self.attempts, _describe)

    def read(self, key: str) -> bytes:
        def get(ch: _Channel) -> bytes:
            with ch.sftp.open(self._path(key), "rb") as f:
                size = f.stat().st_size or 0
                return b"".join(f.readv([(0, size)])) if size else b""

        return self._call(key, get)

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        def get(ch: _Channel) -> bytes:
            f, size = ch.handle(self._path(key))
            n = max(0, min(length, size - offset))
            return b"".join(f.readv([(offset, n)])) if n else b""

        return self._call(key, get)

    def list(self, prefix: str) -> list[str]:
        top = prefix.rstrip("/")

        def listdir(rel: str) -> list[paramiko.SFTPAttributes]:
            return self._call(rel, lambda ch: ch.sftp.listdir_attr(self._path(rel)), "list")

        try:
            entries = listdir(top)
        except FileNotFoundError:
            return []
        out = [f"{top}/{e.filename}" for e in entries if stat.S_ISREG(e.st_mode or 0)]
        dirs = [f"{top}/{e.filename}" for e in entries if stat.S_ISDIR(e.st_mode or 0)]

        def files(rel: str) -> list[str]:
            try:
                return [f"{rel}/{e.filename}" for e in listdir(rel) if stat.S_ISREG(e.st_mode or 0)]
            except FileNotFoundError:
                return []

        if dirs:  # one request per bucket directory: in parallel, each on its own channel
            with ThreadPoolExecutor(min(self.parallelism, len(dirs))) as pool:
                for names in pool.map(files, dirs):
                    out.extend(names)
        return sorted(out)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                break
        self._client.close()


def _describe(e: BaseException) -> str:
    if isinstance(e, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__
