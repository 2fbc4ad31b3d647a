# The SFTP backend: a Kloset store in a directory of a remote host, the fs layout under PATH, read
# over SSH with paramiko. Host keys as OpenSSH does: ~/.ssh/known_hosts (and the `known_hosts=FILE`
# option) must know the host unless `insecure_ignore_host_key=true`; a key that differs from the
# recorded one is refused. Authentication: `identity=FILE`, else the SSH agent and ~/.ssh/id_*.
#
# Strategy: one SSH connection and one SFTP channel over it, shared by every thread (_Pipe). SFTP
# tags each request with an id: a thread sends its requests under a lock and waits for its own
# replies, which one reader thread hands out, so any number of requests from any number of threads
# are in flight at once and a call costs its round trips, never a wait behind another thread's. One
# channel, not a pool of them: a pool pays a channel open, a subsystem start (a server process
# each, for OpenSSH) and a version exchange per channel, one after another, and its own open of
# every packfile; one channel carries the link's bandwidth as well (one SSH connection either way).
# A ranged read is its 32 KiB pieces (the size every server must accept), sent at once. Packfile
# handles are opened once and kept (bounded, never closed while a thread uses one); a whole small
# object is an OPEN and a STAT sent together, then its reads: two round trips. The check that the
# store directory exists is sent at connect and its answer taken with the first call's. Nothing
# connects before the first call, or before connect_in_background() (nbdkit, after its fork).
# A backend closed keeps its SSH connection for the next one on the same store in the process
# (_park: a command opening the store again pays one channel, not a handshake).
# paramiko provides the SSH connection (keys, agent, known_hosts, ciphers), imported only to make
# one (a start served from the on-disk cache needs none); the SFTP requests used here (version 3:
# OPEN, READ, STAT, OPENDIR, READDIR, CLOSE) are framed here, with the protocol's numbers, so that
# a reply can be bounded before it is read and every field checked (the server
# is untrusted: a reply over MAX_REPLY, a DATA longer than asked, a truncated field are errors;
# tests/test_sftp_pipe.py plays such a server).
#
# Invariants:
# - Read-only: files are opened with SFTP_FLAG_READ alone; no request here changes the remote
#   directory.
# - Every request has a deadline (the channel timeout, `timeout` s) and bounded retries with
#   backoff (options.retry); a broken connection is re-established once per failure. Errors are one
#   StoreError line (host key, authentication, connection); a missing file is FileNotFoundError.
from __future__ import annotations

import contextlib
import errno
import functools
import getpass
import os
import socket
import stat
import struct
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, TypeVar

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

if TYPE_CHECKING:
    import paramiko  # imported where a connection is made: 0.1 s of a start that needs none

# SFTP version 3 (draft-ietf-secsh-filexfer-02), the numbers verbatim; paramiko.sftp has the same
# (tests/test_sftp_pipe.py compares them).
CMD_INIT, CMD_VERSION, CMD_OPEN, CMD_CLOSE, CMD_READ = 1, 2, 3, 4, 5
CMD_OPENDIR, CMD_READDIR, CMD_STAT = 11, 12, 17
CMD_STATUS, CMD_HANDLE, CMD_DATA, CMD_NAME, CMD_ATTRS = 101, 102, 103, 104, 105
SFTP_EOF, SFTP_NO_SUCH_FILE, SFTP_PERMISSION_DENIED = 1, 2, 3
SFTP_FLAG_READ = 0x01
ATTR_SIZE, ATTR_UIDGID, ATTR_PERMISSIONS, ATTR_ACMODTIME, ATTR_EXTENDED = 0x1, 0x2, 0x4, 0x8, 0x80000000
MAX_PACKET = 1 << 15  # the channel's largest packet: paramiko's default, every server's minimum

PARALLELISM = 16  # threads worth having in flight (callers' pools); they share one channel
HANDLES = 64  # packfile handles kept open
READ_PIECE = 32768  # bytes per READ: what every SFTP server accepts (OpenSSH's own client's size)
PIECES_IN_FLIGHT = 64  # READs of one call outstanding at once (2 MiB)
WINDOW = 16 << 20  # the channel's receive window: 16 MiB in flight covers 1 Gbit/s at 100 ms
MAX_REPLY = 1 << 20  # no reply to these requests is near this; a longer one is refused unread
CONNECT_DEADLINE = 10.0  # the TCP connect's own bound (connect()); the handshake has `timeout`
T = TypeVar("T")


def _transient(e: BaseException) -> bool:
    import paramiko

    return isinstance(e, OSError | EOFError | paramiko.SSHException) and not isinstance(e, PermissionError)


class _PromptSocket(socket.socket):
    """A TCP socket that acknowledges at once what it receives. OpenSSH's sshd leaves Nagle's
    algorithm on for a session without a terminal (an sftp subsystem): a small message it sends
    while an earlier one is unacknowledged waits for that ACK, and a receiver's kernel delays the
    ACK of a small segment by up to 40 ms. So after authentication the channel-open reply waited
    40 ms behind the host-keys message, as did one reply of every pair sent together (a HANDLE
    and its ATTRS). Linux forgets TCP_QUICKACK as the connection goes on: it is set again before
    every read. Nagle is off on this side (TCP_NODELAY) for the same reason, sshd being the one
    delaying its ACKs then."""

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        with contextlib.suppress(OSError):
            self.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        return super().recv(bufsize, flags)


def _dial(host: str, port: int, timeout: float) -> socket.socket:
    """The TCP connection to the server: its addresses in the resolver's order, the first that
    answers (as paramiko's own connect does), as a _PromptSocket."""
    failure: OSError | None = None
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = _PromptSocket(family, kind, proto)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(timeout)
            sock.connect(address)
            return sock
        except OSError as e:
            sock.close()
            failure = e
    raise failure or OSError(errno.EHOSTUNREACH, f"no address for {host}")


def connect(loc: StoreLocation, opts: dict[str, str]) -> paramiko.SSHClient:
    """An authenticated SSH connection (StoreError with one line when it cannot be had)."""
    import paramiko

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
            sock=_dial(loc.host, port, min(timeout, CONNECT_DEADLINE)),
            username=user,
            key_filename=os.path.expanduser(identity) if identity else None,
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


# A closed backend's SSH connection is kept for the next backend of the same location and options
# in this process (a command that opens the store again: app/check.prepare starting over on what
# the store holds now), one a location, taken within IDLE_FOR seconds or closed.
IDLE_FOR = 30.0
_idle: dict[tuple[object, ...], tuple[paramiko.SSHClient, float, int]] = {}
_idle_lock = threading.Lock()


def _park(key: tuple[object, ...], client: paramiko.SSHClient) -> None:
    transport = client.get_transport()
    if transport is None or not transport.is_active():
        client.close()
        return
    with _idle_lock:
        old = _idle.pop(key, None)
        _idle[key] = (client, time.monotonic(), os.getpid())
    if old is not None and old[2] == os.getpid():
        old[0].close()


def _unpark(key: tuple[object, ...]) -> paramiko.SSHClient | None:
    with _idle_lock:
        parked = _idle.pop(key, None)
    if parked is None:
        return None
    client, since, pid = parked
    if pid != os.getpid():  # a fork's: its threads are gone; leave it be
        return None
    transport = client.get_transport()
    if time.monotonic() - since > IDLE_FOR or transport is None or not transport.is_active():
        client.close()
        return None
    return client


Reply = tuple[int, bytes]  # the reply's type and its bytes after the request id


def _string(data: bytes | str) -> bytes:
    raw = data.encode() if isinstance(data, str) else data
    return struct.pack(">I", len(raw)) + raw


class _Fields:
    """Reads a reply's fields; a field running past the reply's end is an error (paramiko's
    Message pads with zeros instead)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.at = 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.body):
            raise _protocol_error("a truncated reply")
        out = self.body[self.at : self.at + n]
        self.at += n
        return out

    def int(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def int64(self) -> int:
        return struct.unpack(">Q", self.take(8))[0]

    def string(self) -> bytes:
        return self.take(self.int())

    def attrs(self) -> _Attrs:
        flags = self.int()
        attrs = _Attrs()
        if flags & ATTR_SIZE:
            attrs.st_size = self.int64()
        if flags & ATTR_UIDGID:
            self.int(), self.int()
        if flags & ATTR_PERMISSIONS:
            attrs.st_mode = self.int()
        if flags & ATTR_ACMODTIME:
            self.int(), self.int()
        if flags & ATTR_EXTENDED:
            for _ in range(self.int()):
                self.string(), self.string()
        return attrs


@dataclass
class _Attrs:
    """What is used here of a file's SFTP attributes (the rest is read past)."""

    st_size: int | None = None
    st_mode: int | None = None


class _EndOfFile(Exception):
    """SFTP's EOF status: the end of a file or a directory listing (not EOFError, which is the
    connection's end here, a transient failure)."""


def _protocol_error(what: str) -> OSError:
    return OSError(errno.EIO, f"sftp protocol error: {what}")


def _status(body: bytes, path: str) -> OSError | None:
    """A STATUS reply as the error it reports (None for EOF)."""
    fields = _Fields(body)
    code = fields.int()
    if code == SFTP_EOF:
        return None
    text = fields.string().decode(errors="replace")[:200] if fields.at < len(body) else ""
    if code == SFTP_NO_SUCH_FILE:
        return FileNotFoundError(errno.ENOENT, "no such file", path)
    if code == SFTP_PERMISSION_DENIED:
        return PermissionError(errno.EACCES, "permission denied", path)
    return OSError(errno.EIO, f"server said: {text or f'status {code}'}", path)


def _expect(reply: Reply, kind: int, path: str) -> _Fields:
    """The reply's fields if it is `kind`; the error a STATUS reports raised (_EndOfFile at EOF)."""
    got, body = reply
    if got == kind:
        return _Fields(body)
    if got == CMD_STATUS:
        error = _status(body, path)
        raise error if error is not None else _EndOfFile(path)
    raise _protocol_error(f"reply {got} to a request expecting {kind}")


class _Stream(Protocol):
    """What the pipe needs of its channel (a paramiko Channel; a socket in the tests)."""

    def sendall(self, data: bytes) -> None: ...
    def recv(self, n: int) -> bytes: ...
    def settimeout(self, timeout: float | None) -> None: ...
    def close(self) -> None: ...


@dataclass
class _Open:
    reply: Future[Reply]
    users: int = 0
    handle: bytes | None = None


@dataclass
class _Pipe:
    """One SFTP channel shared by every thread (see the module comment). `broken` is set, and
    every waiting call fails, once the channel fails or a reply does not come in time."""

    chan: _Stream
    timeout: float
    broken: BaseException | None = None
    _next: int = 1
    _waiting: dict[int, Future[Reply]] = field(default_factory=dict)
    _opened: OrderedDict[str, _Open] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _send_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def open(cls, transport: paramiko.Transport, timeout: float) -> _Pipe:
        chan = transport.open_session(window_size=WINDOW, max_packet_size=MAX_PACKET)
        try:
            chan.invoke_subsystem("sftp")
            return cls.start(chan, timeout)
        except BaseException:
            chan.close()
            raise

    @classmethod
    def start(cls, chan: _Stream, timeout: float) -> _Pipe:
        """The version exchange on an open SFTP stream, then the reply reader."""
        pipe = cls(chan, timeout)
        chan.settimeout(timeout)
        pipe._send(CMD_INIT, struct.pack(">I", 3))
        kind, _ = pipe._receive()
        if kind != CMD_VERSION:
            raise _protocol_error(f"reply {kind} to the version request")
        chan.settimeout(None)  # the reader waits for as long as the channel lives; calls have deadlines
        threading.Thread(target=pipe._read_replies, name="sftp-replies", daemon=True).start()
        return pipe

    def _send(self, kind: int, payload: bytes) -> None:
        with self._send_lock:
            self.chan.sendall(struct.pack(">IB", len(payload) + 1, kind) + payload)

    def _receive_exactly(self, n: int) -> bytes:
        parts, got = [], 0
        while got < n:
            part = self.chan.recv(n - got)
            if not part:
                raise EOFError("the SFTP channel closed")
            parts.append(part)
            got += len(part)
        return b"".join(parts)

    def _receive(self) -> tuple[int, bytes]:
        (length,) = struct.unpack(">I", self._receive_exactly(4))
        if not 1 <= length <= MAX_REPLY:
            raise _protocol_error(f"a reply of {length} bytes")
        packet = self._receive_exactly(length)
        return packet[0], packet[1:]

    def _read_replies(self) -> None:
        try:
            while True:
                kind, packet = self._receive()
                if len(packet) < 4:
                    raise _protocol_error("a reply without a request id")
                (rid,) = struct.unpack(">I", packet[:4])
                with self._lock:
                    waiter = self._waiting.pop(rid, None)
                if waiter is not None:  # none for a CLOSE's reply, or a late reply to a failed call
                    waiter.set_result((kind, packet[4:]))
        except BaseException as e:  # the channel is done for, whatever the cause
            self.fail(e)

    def fail(self, error: BaseException) -> None:
        with self._lock:
            if self.broken is None:
                self.broken = error
            waiting, self._waiting = self._waiting, {}
        for waiter in waiting.values():
            waiter.set_exception(self._lost())
        with contextlib.suppress(Exception):
            self.chan.close()

    def request(self, kind: int, payload: bytes, reply: bool = True) -> Future[Reply]:
        """Send a request; its reply arrives in the future (no future is kept with reply=False)."""
        waiter: Future[Reply] = Future()
        with self._lock:
            if self.broken is not None:
                raise self._lost()
            rid = self._next
            self._next = (self._next + 1) & 0xFFFFFFFF
            if reply:
                self._waiting[rid] = waiter
        try:
            self._send(kind, struct.pack(">I", rid) + payload)
        except BaseException as e:
            self.fail(e)
            raise self._lost() from None
        return waiter

    def _lost(self) -> BaseException:
        """A new exception for each call the failure ends: a timeout stays a TimeoutError, anything
        else is a lost connection (both retried, on a new channel)."""
        error = self.broken
        if isinstance(error, TimeoutError):
            return TimeoutError(str(error))
        return EOFError(f"the SFTP connection failed: {_describe(error) if error else 'closed'}")

    def wait(self, waiter: Future[Reply]) -> Reply:
        try:
            return waiter.result(self.timeout)
        except TimeoutError:
            if not waiter.done():
                self.fail(TimeoutError("the server did not answer in time"))
            raise TimeoutError("the server did not answer in time") from None

    def close_handle(self, handle: bytes) -> None:
        with contextlib.suppress(Exception):
            self.request(CMD_CLOSE, _string(handle), reply=False)

    @contextlib.contextmanager
    def opened(self, path: str) -> Iterator[bytes]:
        """A handle of `path` kept open for later calls (one OPEN, whoever asks first)."""
        with self._lock:
            entry = self._opened.get(path)
            if entry is None:
                entry = self._opened[path] = _Open(Future())
                opening = True
            else:
                self._opened.move_to_end(path)
                opening = False
            entry.users += 1
        try:
            if opening:
                try:
                    entry.reply.set_result(self.wait(self.request(CMD_OPEN, _open_payload(path))))
                except BaseException as e:
                    entry.reply.set_exception(e)
            try:
                if entry.handle is None:
                    entry.handle = _expect(self.wait(entry.reply), CMD_HANDLE, path).string()
            except BaseException:
                with self._lock:
                    if self._opened.get(path) is entry:
                        del self._opened[path]  # the next call opens it again
                raise
            yield entry.handle
        finally:
            with self._lock:
                entry.users -= 1
                idle = self._evictable()
            for handle in idle:
                self.close_handle(handle)

    def open_ahead(self, paths: Iterable[str]) -> None:
        """OPEN each file now, its reply not waited for: a later read of it finds the handle (or the
        OPEN in flight) in the cache, a round trip saved. Files already open are skipped; at most
        half the cache is filled so (an entry nobody used yet is never evicted)."""
        for path in paths:
            with self._lock:
                if path in self._opened:
                    continue
                if len(self._opened) >= HANDLES // 2:
                    return
                entry = self._opened[path] = _Open(Future())
            try:
                sent = self.request(CMD_OPEN, _open_payload(path))
            except BaseException as e:  # the channel failed: a read of it opens it again
                entry.reply.set_exception(e)
                return
            sent.add_done_callback(functools.partial(_pass_on, entry.reply))

    def _evictable(self) -> list[bytes]:
        """Handles over HANDLES that no thread is using, least recently used first (under _lock)."""
        out = []
        for path in list(self._opened):
            if len(self._opened) <= HANDLES:
                break
            entry = self._opened[path]
            if entry.users == 0 and entry.handle is not None:
                del self._opened[path]
                out.append(entry.handle)
        return out

    def read(self, handle: bytes, offset: int, length: int, path: str) -> bytes:
        """`length` bytes at `offset` (fewer only at the end of the file): READs sent at once."""
        out: list[bytes] = []
        pending: deque[tuple[int, int, Future[Reply]]] = deque()
        at, end = offset, offset + length
        while at < end or pending:
            while at < end and len(pending) < PIECES_IN_FLIGHT:
                n = min(READ_PIECE, end - at)
                pending.append((at, n, self.request(CMD_READ, _string(handle) + struct.pack(">QI", at, n))))
                at += n
            start, n, waiter = pending.popleft()
            try:
                data = _expect(self.wait(waiter), CMD_DATA, path).string()
            except _EndOfFile:
                break  # the file ends before this piece: what came before is all of it
            if len(data) > n:
                raise _protocol_error(f"{len(data)} bytes for a read of {n}")
            out.append(data)
            if len(data) < n:  # a short read: the rest of this piece, before the pieces after it
                rest = self.read(handle, start + len(data), n - len(data), path)
                out.append(rest)
                if len(rest) < n - len(data):
                    break
        return b"".join(out)

    def stat(self, path: str) -> Future[Reply]:
        return self.request(CMD_STAT, _string(path))

    def listdir(self, path: str) -> list[tuple[str, int]]:
        """(name, st_mode) of each entry but . and .. (and names no key can hold)."""
        handle = _expect(self.wait(self.request(CMD_OPENDIR, _string(path))), CMD_HANDLE, path).string()
        entries: list[tuple[str, int]] = []
        try:
            while True:  # two READDIRs at a time: a small directory is its names and the EOF at once
                waiters = [self.request(CMD_READDIR, _string(handle)) for _ in range(2)]
                ended = False
                for waiter in waiters:
                    try:
                        fields = _expect(self.wait(waiter), CMD_NAME, path)
                    except _EndOfFile:
                        ended = True
                        continue
                    for _ in range(fields.int()):
                        name = fields.string().decode(errors="surrogateescape")
                        fields.string()  # the long name, as ls -l would print it
                        mode = fields.attrs().st_mode or 0
                        if name not in (".", "..") and "/" not in name and "\x00" not in name:
                            entries.append((name, mode))
                if ended:
                    return entries
        finally:
            self.close_handle(handle)


def _pass_on(to: Future[Reply], done: Future[Reply]) -> None:
    error = done.exception()
    if error is not None:
        to.set_exception(error)
    else:
        to.set_result(done.result())


def _open_payload(path: str) -> bytes:
    return _string(path) + struct.pack(">II", SFTP_FLAG_READ, 0)  # no attributes


class SftpBackend:
    parallelism = PARALLELISM

    def __init__(self, loc: StoreLocation) -> None:
        self.location = loc
        self.opts = store_options("sftp")
        self.timeout = parse_number(self.opts, "timeout", DEFAULT_TIMEOUT)
        self.attempts = 1 + int(parse_number(self.opts, "retries", DEFAULT_RETRIES))
        self.root = loc.path
        self._lock = threading.Lock()
        self._closed = False
        # A connect's bound: the TCP connect's, then the handshake's and the channel's (`timeout` each).
        self._connect_deadline = CONNECT_DEADLINE + 2 * self.timeout
        self._client: paramiko.SSHClient | None = None
        self._pid = os.getpid()
        self._forsaken: list[paramiko.SSHClient] = []
        self._pipe: _Pipe | None = None
        self._root_stat: Future[Reply] | None = None
        self._root_checked = False
        self._root_lock = threading.Lock()
        # Nothing is connected here: the first call connects (the SSH handshake is five or six
        # round trips, the channel's start three more), or connect_in_background() starts it.
        self._connecting: Future[None] | None = None
        self._soon: list[str] = []  # paths to open once connected (connect_in_background)
        self._idle_key = (loc.display, loc.user, loc.port, tuple(sorted(self.opts.items())))

    def connect_in_background(self, soon: Sequence[str] = ()) -> None:
        """Start connecting now, in a thread, unless connected or connecting; the files `soon` names
        are opened as soon as the channel is (now, if it is). The first call waits for the
        connection, and a process that needs no request (the plugin on a warm start, all its
        reads in the on-disk cache) never waits at all. Never before a C fork() (a thread alive then
        could hold a lock the child waits for forever): nbdkit's plugin calls it after the fork
        (nbdkit -f calls after_fork too, where it would fork)."""
        paths = [self._path(key) for key in soon]
        connecting = self._connecting
        if connecting is not None and self._pid == os.getpid():  # _lock is held until it is done
            connecting.add_done_callback(lambda _: self._open_ahead(paths))
            return
        with self._lock:
            if self._pid != os.getpid():
                self._after_fork()
            if self._closed:
                return
            if self._pipe is not None and self._pipe.broken is None:
                self._open_ahead(paths)
                return
            self._soon = paths  # _open_pipe opens them
            self._connecting = connecting = Future()
        threading.Thread(
            target=self._connect_in_background, args=(connecting,), name="sftp-connect", daemon=True
        ).start()

    def _open_ahead(self, paths: list[str]) -> None:
        pipe = self._pipe
        if pipe is not None and pipe.broken is None:
            pipe.open_ahead(paths)

    def _connect_in_background(self, connecting: Future[None]) -> None:
        try:
            with self._lock:
                self._open_pipe()
        except BaseException as e:
            connecting.set_exception(e)
        else:
            connecting.set_result(None)

    def client(self) -> paramiko.SSHClient:
        """The SSH connection (mkstore writes through its own SFTP session on it)."""
        self._current_pipe()
        assert self._client is not None
        return self._client

    def describe(self, key: str) -> str:
        loc = self.location
        user = f"{loc.user}@" if loc.user else ""
        port = f":{loc.port}" if loc.port else ""
        return f"sftp://{user}{loc.host}{port}{self._path(key)}"

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def _after_fork(self) -> None:
        # nbdkit forks with C's fork() (no Python at-fork handler runs): the SSH transport's thread,
        # the reply reader and a connect under way are gone in the child, though their objects say
        # they are alive. Connect anew; the parent's client is kept referenced, not closed (closing
        # would wait on the gone thread).
        if self._client is not None:
            self._forsaken.append(self._client)
        self._client = None
        self._connecting = None
        self._pipe = None
        self._root_stat = None
        self._soon = []
        self._pid = os.getpid()

    def _wait_for_connect(self) -> None:
        """The background connect's outcome, for the first call after it. Its failure is this call's
        (one line); a later call connects again itself."""
        connecting = self._connecting
        if connecting is None or self._pid != os.getpid():
            return
        try:
            connecting.result(self._connect_deadline)
        except StoreError as e:
            raise StoreError(str(e)) from None
        except BaseException as e:
            raise StoreError(f"sftp {self.location.display}: cannot connect: {_describe(e)}") from None
        finally:
            self._connecting = None

    def _open_pipe(self) -> None:
        """Open the channel, connecting first when the connection is gone (under _lock)."""
        transport = self._client.get_transport() if self._client is not None else None
        if transport is None or not transport.is_active():
            if self._client is not None:
                self._client.close()
            self._client = None
            self._client = _unpark(self._idle_key) or connect(self.location, self.opts)
            transport = self._client.get_transport()
        assert transport is not None
        self._pipe = _Pipe.open(transport, self.timeout)
        soon, self._soon = self._soon, []
        self._pipe.open_ahead(soon)  # sent before any call can send its own OPEN of them
        if not self._root_checked and self._root_stat is None:
            self._root_stat = self._pipe.stat(self.root)

    def _current_pipe(self) -> _Pipe:
        """The shared channel, opened again (and the connection made again) after a failure."""
        self._wait_for_connect()
        with self._lock:
            if self._pid != os.getpid():
                self._after_fork()
            if self._closed:
                raise StoreError("store is closed")
            if self._pipe is None or self._pipe.broken is not None:
                self._open_pipe()
            assert self._pipe is not None
            return self._pipe

    def _check_root(self, pipe: _Pipe) -> None:
        """That the store's directory exists: the answer to the STAT sent at connect, which has
        come back by the time the first call's replies have."""
        with self._root_lock:
            if self._root_checked:
                return
            stat_reply = self._root_stat
            if stat_reply is None or (stat_reply.done() and stat_reply.exception() is not None):
                stat_reply = pipe.stat(self.root)
            try:
                st = _expect(pipe.wait(stat_reply), CMD_ATTRS, self.root).attrs()
            except FileNotFoundError:
                raise StoreError(f"store not found: {self.location.display} (no such directory)") from None
            finally:
                self._root_stat = None
            if not stat.S_ISDIR(st.st_mode or 0):
                raise StoreError(f"store not found: {self.location.display} (not a directory)")
            self._root_checked = True

    def _call(self, key: str, fn: Callable[[_Pipe], T], what: str = "read") -> T:
        def once() -> T:
            pipe = self._current_pipe()
            try:
                result = fn(pipe)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
                self._check_root(pipe)
                raise FileNotFoundError(errno.ENOENT, "no such file", self.describe(key)) from None
            self._check_root(pipe)
            return result

        return retry(once, f"cannot {what} {self.describe(key)}", _transient, self.attempts, _describe)

    def read(self, key: str) -> bytes:
        def get(pipe: _Pipe) -> bytes:
            path = self._path(key)
            opened = pipe.request(CMD_OPEN, _open_payload(path))
            attrs = pipe.stat(path)  # sent with the OPEN: the size comes back with the handle
            handle = _expect(pipe.wait(opened), CMD_HANDLE, path).string()
            try:
                size = _expect(pipe.wait(attrs), CMD_ATTRS, path).attrs().st_size or 0
                return pipe.read(handle, 0, size, path) if size else b""
            finally:
                pipe.close_handle(handle)

        return self._call(key, get)

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        def get(pipe: _Pipe) -> bytes:
            path = self._path(key)
            with pipe.opened(path) as handle:
                return pipe.read(handle, offset, length, path) if length > 0 else b""

        return self._call(key, get)

    def list(self, prefix: str) -> list[str]:
        top = prefix.rstrip("/")

        def listdir(rel: str) -> list[tuple[str, int]]:
            return self._call(rel, lambda pipe: pipe.listdir(self._path(rel)), "list")

        try:
            entries = listdir(top)
        except FileNotFoundError:
            return []
        out = [f"{top}/{name}" for name, mode in entries if stat.S_ISREG(mode)]
        dirs = [f"{top}/{name}" for name, mode in entries if stat.S_ISDIR(mode)]

        def files(rel: str) -> list[str]:
            try:
                return [f"{rel}/{name}" for name, mode in listdir(rel) if stat.S_ISREG(mode)]
            except FileNotFoundError:
                return []

        if dirs:  # one listing per bucket directory, all in flight at once
            with ThreadPoolExecutor(min(self.parallelism, len(dirs))) as pool:
                for names in pool.map(files, dirs):
                    out.extend(names)
        return sorted(out)

    def close(self) -> None:
        connecting = self._connecting
        if connecting is not None and self._pid == os.getpid():
            with contextlib.suppress(BaseException):  # its connection is closed below
                connecting.result(self._connect_deadline)
        with self._lock:
            self._closed = True
            pipe, self._pipe = self._pipe, None
            client, self._client = self._client, None
        if pipe is not None:
            pipe.fail(EOFError("the store is closed"))
        if client is not None:
            if self._pid == os.getpid():
                _park(self._idle_key, client)  # for the next backend here, if any
            else:
                client.close()


def _describe(e: BaseException) -> str:
    if isinstance(e, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__
