"""moto's S3 server for the tests and benchmarks: `python tests/moto_serve.py PORT`.

Two changes to how `moto_server` serves, neither to what it answers:
- waitress instead of werkzeug: moto's own `moto_server` closes the connection after every
  response, so each request would pay a TCP handshake that no real S3 endpoint makes a client pay.
- Ranged GETs read only their range. moto 5 answers `Range: bytes=A-B` by reading the whole
  object into memory and slicing it (`FakeKey.value`, then `_handle_range_header`): about 55 ms per
  GET of 16 KiB from a 64 MiB packfile (Kloset's packfile size) against 6 ms from a 70 KB one, so
  every figure taken through it measured moto's copy, not the client or the link. Here a GET with
  one closed or open-ended byte range (`bytes=A-B`, `bytes=A-`; what the reader sends) seeks in the
  key's buffer and reads that window; every other request (suffix ranges, several ranges, invalid
  ones, HEAD) takes moto's own path unchanged. Headers and status are moto's: the window goes
  through `_handle_range_header` as the whole value would, with the object's length known.
"""

from __future__ import annotations

import re
import sys
import threading
from typing import Any

import waitress
from moto.s3 import models, responses
from moto.server import DomainDispatcherApplication, create_backend_app

_SIMPLE_RANGE = re.compile(r"bytes=(\d+)-(\d*)")
_wanted = threading.local()  # the range the current request asks for, in this server thread


class Window(bytes):
    """The bytes [begin, begin + len) of an object of `total` bytes."""

    begin: int
    total: int


_whole_value = models.FakeKey.value.fget  # type: ignore[attr-defined]


def _value(self: models.FakeKey) -> bytes:
    spec = getattr(_wanted, "range", None)
    if spec is None:
        return _whole_value(self)
    begin, end = spec
    total = self.contentsize
    if begin >= total:
        return _whole_value(self)  # moto's own 416
    last = total - 1 if end is None else min(end, total - 1)
    with self.lock:
        self._value_buffer.seek(begin)
        window = Window(self._value_buffer.read(last - begin + 1))
    window.begin, window.total = begin, total
    return window


_moto_handle_range = responses.S3Response._handle_range_header


def _handle_range(self: Any, request: Any, headers: dict[str, Any], content: Any) -> Any:
    if not isinstance(content, Window):
        return _moto_handle_range(self, request, headers, content)
    end = content.begin + len(content) - 1
    if content.begin or end < content.total - 1:
        for key in [h for h in headers if h.startswith("x-amz-checksum-")]:
            del headers[key]
    headers["content-range"] = f"bytes {content.begin}-{end}/{content.total}"
    headers["content-length"] = str(len(content))
    return 206, headers, bytes(content)


_moto_key_response = responses.S3Response.key_response


def _key_response(self: Any, request: Any, *args: Any) -> Any:
    match = _SIMPLE_RANGE.fullmatch(request.headers.get("range", "").strip())
    if request.method != "GET" or match is None:
        return _moto_key_response(self, request, *args)
    begin, end = int(match[1]), int(match[2]) if match[2] else None
    if end is not None and end < begin:
        return _moto_key_response(self, request, *args)
    _wanted.range = (begin, end)
    try:
        return _moto_key_response(self, request, *args)
    finally:
        _wanted.range = None


models.FakeKey.value = property(_value, models.FakeKey.value.fset)  # type: ignore[attr-defined]
responses.S3Response._handle_range_header = _handle_range
responses.S3Response.key_response = _key_response


def main() -> None:
    app = DomainDispatcherApplication(create_backend_app)
    waitress.serve(app, host="127.0.0.1", port=int(sys.argv[1]), threads=16, _quiet=True)


if __name__ == "__main__":
    main()
