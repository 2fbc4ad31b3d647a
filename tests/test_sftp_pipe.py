"""The SFTP backend's shared channel (backend_sftp._Pipe) against a scripted server on a socket
pair: what OpenSSH's server does not do but a compromised or an unusual one may (replies out of
order, short reads, a DATA longer than asked, an oversized or truncated reply, no reply at all).
The real sshd is in tests/test_remote_store.py; the oracle here is the bytes the server holds."""

from __future__ import annotations

import contextlib
import random
import select
import socket
import struct
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

from kloset_blocks.store import backend_sftp
from kloset_blocks.store.backend_sftp import HANDLES, _expect, _Pipe

FXP = {"init": 1, "version": 2, "open": 3, "close": 4, "read": 5, "opendir": 11, "readdir": 12, "stat": 17}
STATUS, HANDLE, DATA, NAME, ATTRS = 101, 102, 103, 104, 105
FILES = {
    "/s/empty": b"",
    "/s/small": bytes(range(256)) * 400,
    "/s/big": random.Random(7).randbytes(1 << 20),
}


def _string(b: bytes | str) -> bytes:
    raw = b.encode() if isinstance(b, str) else b
    return struct.pack(">I", len(raw)) + raw


def _attrs(size: int, mode: int) -> bytes:
    return struct.pack(">IQI", 0x1 | 0x4, size, mode)


@dataclass
class Server:
    """Answers OPEN, READ, STAT, OPENDIR, READDIR and CLOSE from FILES and `dirs`; `quirk` bends
    it: "reorder" (each batch of waiting requests answered last first), "short" (half of each
    READ), "overlong" (a byte more than asked), "huge" (a reply header of 2 MiB), "truncated"
    (a STAT's size cut short), "silent" (READs never answered)."""

    sock: socket.socket
    quirk: str = ""
    dirs: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    opened: list[str] = field(default_factory=list)
    closed: list[bytes] = field(default_factory=list)
    handles: dict[bytes, str] = field(default_factory=dict)
    listed: set[bytes] = field(default_factory=set)

    def _recv(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            got = self.sock.recv(n - len(out))
            if not got:
                raise EOFError
            out += got
        return out

    def _request(self) -> tuple[int, int, bytes]:
        (length,) = struct.unpack(">I", self._recv(4))
        body = self._recv(length)
        if body[0] == FXP["init"]:
            return body[0], 0, body[1:]
        return body[0], struct.unpack(">I", body[1:5])[0], body[5:]

    def _send(self, kind: int, rid: int, payload: bytes) -> None:
        if self.quirk == "huge" and kind == DATA:
            self.sock.sendall(struct.pack(">IB", 2 << 20, kind))
            return
        self.sock.sendall(struct.pack(">IBI", len(payload) + 5, kind, rid) + payload)

    def _status(self, code: int) -> tuple[int, bytes]:
        return STATUS, struct.pack(">I", code) + _string("") + _string("")

    def _answer(self, kind: int, body: bytes) -> tuple[int, bytes] | None:
        (n,) = struct.unpack(">I", body[:4])
        arg = body[4 : 4 + n]
        if kind == FXP["open"]:
            path = arg.decode()
            if path not in FILES:
                return self._status(2)
            handle = f"h{len(self.opened)}".encode()
            self.opened.append(path)
            self.handles[handle] = path
            return HANDLE, _string(handle)
        if kind == FXP["read"]:
            offset, length = struct.unpack(">QI", body[4 + n :])
            if self.quirk == "silent":
                return None
            data = FILES[self.handles[arg]][offset : offset + length]
            if not data:
                return self._status(1)
            if self.quirk == "short":
                data = data[: max(1, len(data) // 2)]
            if self.quirk == "overlong":
                data += b"x"
            return DATA, _string(data)
        if kind == FXP["stat"]:
            path = arg.decode()
            if path in FILES:
                size = len(FILES[path])
                return ATTRS, _attrs(size, 0o100644)[: 8 if self.quirk == "truncated" else None]
            if path in self.dirs:
                return ATTRS, _attrs(0, 0o40755)
            return self._status(2)
        if kind == FXP["opendir"]:
            handle = b"d" + arg
            self.handles[handle] = arg.decode()
            return HANDLE, _string(handle)
        if kind == FXP["readdir"]:
            if arg in self.listed:
                return self._status(1)
            self.listed.add(arg)
            entries = self.dirs[self.handles[arg]]
            names = b"".join(_string(name) + _string(name) + _attrs(1, mode) for name, mode in entries)
            return NAME, struct.pack(">I", len(entries)) + names
        if kind == FXP["close"]:
            self.closed.append(arg)
            return self._status(0)
        return self._status(8)

    def serve(self) -> None:
        try:
            kind, _, _ = self._request()
            assert kind == FXP["init"]
            self.sock.sendall(struct.pack(">IBI", 5, FXP["version"], 3))
            while True:
                batch = [self._request()]
                while self.quirk == "reorder" and select.select([self.sock], [], [], 0.005)[0]:
                    batch.append(self._request())
                for kind, rid, body in reversed(batch) if self.quirk == "reorder" else batch:
                    answer = self._answer(kind, body)
                    if answer is not None:
                        self._send(answer[0], rid, answer[1])
        except (EOFError, OSError):
            pass


@contextmanager
def pipe_to(
    quirk: str = "", timeout: float = 5.0, **dirs: list[tuple[str, int]]
) -> Iterator[tuple[_Pipe, Server]]:
    ours, theirs = socket.socketpair()
    server = Server(theirs, quirk, {f"/s/{k}": v for k, v in dirs.items()})
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    pipe = _Pipe.start(ours, timeout)
    try:
        yield pipe, server
    finally:
        pipe.fail(EOFError("test over"))
        for end in (ours, theirs):  # a close alone does not wake a thread blocked in recv
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()
        thread.join(5)


def _read(pipe: _Pipe, path: str, offset: int, length: int) -> bytes:
    with pipe.opened(path) as handle:
        return pipe.read(handle, offset, length, path)


@pytest.mark.parametrize("quirk", ["", "reorder", "short"])
def test_threads_sharing_the_channel_read_the_files_bytes(quirk: str) -> None:
    rng = random.Random(quirk)
    ranges = []
    for _ in range(48):
        path = rng.choice(sorted(FILES))
        size = len(FILES[path])
        offset = rng.randrange(size + 10) if size else rng.randrange(10)
        ranges.append((path, offset, rng.choice([1, 1000, 40000, 300000])))
    ranges.append(("/s/big", (1 << 20) - 5, 100000))  # the file ends first: its last 5 bytes
    with pipe_to(quirk) as (pipe, server), ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda r: _read(pipe, *r), ranges))
        assert got == [FILES[p][o : o + n] for p, o, n in ranges]
        assert sorted(server.opened) == sorted({p for p, _, _ in ranges})  # one OPEN a file, whoever asked
        assert pipe.broken is None


@pytest.mark.parametrize(
    ("quirk", "call", "error", "message", "broken"),
    [
        ("overlong", "read", OSError, "bytes for a read of", False),
        ("truncated", "stat", OSError, "truncated reply", False),
        ("huge", "read", EOFError, "protocol error: a reply of 2097152 bytes", True),
        ("silent", "read", TimeoutError, "did not answer in time", True),
    ],
)
def test_a_bad_reply_is_an_error_not_bytes(
    quirk: str, call: str, error: type, message: str, broken: bool
) -> None:
    with pipe_to(quirk, timeout=1.0) as (pipe, _):
        with pytest.raises(error, match=message):
            if call == "read":
                _read(pipe, "/s/small", 0, 1000)
            else:
                _expect(pipe.wait(pipe.stat("/s/small")), ATTRS, "/s/small").attrs()
        assert (pipe.broken is not None) == broken
        if broken:  # every later call fails at once (the backend opens a new channel)
            with pytest.raises(EOFError if quirk == "huge" else TimeoutError):
                pipe.request(FXP["stat"], _string("/s/small"))


def test_a_missing_file_is_file_not_found() -> None:
    with pipe_to() as (pipe, _), pytest.raises(FileNotFoundError):
        _read(pipe, "/s/absent", 0, 10)


def test_listdir_keeps_names_a_key_can_hold() -> None:
    entries = [
        (".", 0o40755),
        ("..", 0o40755),
        ("ab", 0o40755),
        ("f", 0o100644),
        ("a/b", 0o100644),
        ("n\0", 0o100644),
    ]
    with pipe_to(top=entries) as (pipe, server):
        assert pipe.listdir("/s/top") == [("ab", 0o40755), ("f", 0o100644)]
        pipe.wait(pipe.stat("/s/small"))  # the CLOSE sent before is answered by now
        assert server.closed == [b"d/s/top"]  # the directory's handle, closed


def test_handles_kept_are_bounded_and_one_in_use_stays_open(monkeypatch: pytest.MonkeyPatch) -> None:
    many = {f"/s/f{i}": bytes([i]) * 10 for i in range(HANDLES + 20)}
    monkeypatch.setattr("tests.test_sftp_pipe.FILES", {**FILES, **many})
    with pipe_to() as (pipe, server):
        with pipe.opened("/s/f0") as held:
            for path in list(many)[1:]:
                assert _read(pipe, path, 0, 10) == many[path]
            assert pipe.read(held, 0, 10, "/s/f0") == many["/s/f0"]
        pipe.wait(pipe.stat("/s/small"))  # every CLOSE sent before is answered by now
        assert held not in server.closed
        assert len(server.opened) - len(server.closed) == HANDLES
        assert len(set(server.closed)) == len(server.closed) == 20


def test_short_reads_ask_for_the_rest_of_each_piece() -> None:
    with pipe_to("short") as (pipe, _):
        assert (
            _read(pipe, "/s/big", 12345, backend_sftp.READ_PIECE * 3 + 7)
            == FILES["/s/big"][12345:][: backend_sftp.READ_PIECE * 3 + 7]
        )


def test_files_opened_ahead_are_read_with_no_open_of_their_own(monkeypatch: pytest.MonkeyPatch) -> None:
    many = {f"/s/f{i}": bytes([i]) * 10 for i in range(HANDLES)}
    monkeypatch.setattr("tests.test_sftp_pipe.FILES", {**FILES, **many})
    with pipe_to() as (pipe, server):
        pipe.open_ahead(["/s/small", "/s/big", "/s/absent", "/s/small"])
        pipe.wait(pipe.stat("/s/small"))  # the OPENs sent before are answered by now
        assert server.opened == ["/s/small", "/s/big"]  # once each, the absent one refused
        assert _read(pipe, "/s/big", 5, 100) == FILES["/s/big"][5:105]
        assert _read(pipe, "/s/small", 0, 10) == FILES["/s/small"][:10]
        assert server.opened == ["/s/small", "/s/big"]  # the reads sent no OPEN of their own
        with pytest.raises(FileNotFoundError):
            _read(pipe, "/s/absent", 0, 1)
        pipe.open_ahead(list(many))  # at most half the handle cache, so that reads keep theirs
        pipe.wait(pipe.stat("/s/small"))
        assert len(server.opened) == HANDLES // 2


def test_the_protocol_numbers_are_paramikos() -> None:
    """The backend frames SFTP itself, with its own copy of the protocol's numbers (so that paramiko
    is imported only to connect): the same as paramiko's, whose client speaks to every server."""
    import paramiko.common
    import paramiko.sftp

    prefixes = ("CMD_", "SFTP_EOF", "SFTP_NO_", "SFTP_PERM", "SFTP_FLAG_")
    names = [n for n in dir(backend_sftp) if n.startswith(prefixes)]
    assert len(names) == 17  # 13 requests and replies, 3 statuses, the read flag
    for name in names:
        assert getattr(backend_sftp, name) == getattr(paramiko.sftp, name), name
    attrs = paramiko.SFTPAttributes
    assert (backend_sftp.ATTR_SIZE, backend_sftp.ATTR_UIDGID, backend_sftp.ATTR_PERMISSIONS) == (
        attrs.FLAG_SIZE, attrs.FLAG_UIDGID, attrs.FLAG_PERMISSIONS,
    )  # fmt: skip
    assert backend_sftp.ATTR_ACMODTIME == attrs.FLAG_AMTIME
    assert backend_sftp.ATTR_EXTENDED == attrs.FLAG_EXTENDED
    assert backend_sftp.MAX_PACKET == paramiko.common.DEFAULT_MAX_PACKET_SIZE


def test_opening_the_backend_imports_no_ssh_library() -> None:
    """A start served from the on-disk cache connects to nothing, and pays no SSH library import
    either (0.1 s): paramiko is imported by the first connection. In a fresh interpreter."""
    import subprocess
    import sys

    code = (
        "import sys; from kloset_blocks.store.backend import open_backend;"
        "from kloset_blocks.store.location import parse_location;"
        "b = open_backend(parse_location('sftp://u@127.0.0.1:1/x'));"
        "print('paramiko' in sys.modules, 'cryptography' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split() == ["False", "False"]
