# The S3 backend: a Kloset store in a bucket, plakar's layout (`<prefix>CONFIG`,
# `<prefix>states/<xx>/<64 hex>`, `<prefix>packfiles/<xx>/<64 hex>`), read with three S3 operations
# of our own on urllib3: GET of a whole object, ranged GET (`Range: bytes=A-B`) and ListObjectsV2.
# Path-style requests to the endpoint HOST[:PORT], signed by store/s3sign.py (SigV4, payload
# UNSIGNED-PAYLOAD for a GET). No S3 SDK: importing one costs more than all of this at every start,
# and nbdkit's plugin starts it for each command.
#
# Invariants:
# - Thread-safe: one urllib3 connection pool of up to `parallelism` kept connections, so that many
#   requests are really in flight (the GIL is released while waiting on sockets).
# - Every request has socket timeouts (connect and each read: `timeout`, default 30 s) and goes
#   through options.retry(): transient failures (connection errors, timeouts, 5xx, SlowDown) are
#   retried with backoff, `retries` times at most; everything else is one StoreError line naming
#   the object and the S3 error code. NoSuchKey is FileNotFoundError, as on a filesystem.
# - The server is untrusted input too: an error body or a listing page is read up to a bound and
#   parsed without a DTD (no entities); a body is never decompressed (no Content-Encoding bombs); a
#   ranged GET answered with another range than asked is an error, never wrong bytes; every message
#   from the server reaches the user as one bounded line.
# - Read-only: no method of S3Backend writes (upload.py holds the writes mkstore does, through
#   S3Client.request).
from __future__ import annotations

import errno
import os
import re
import ssl
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar

import urllib3

from kloset_blocks.errors import StoreError
from kloset_blocks.store import s3sign
from kloset_blocks.store.location import StoreLocation
from kloset_blocks.store.options import (
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    parse_bool,
    parse_number,
    retry,
    store_options,
)

PARALLELISM = 32
MAX_ERROR_BODY = 64 << 10  # an S3 error document is a few hundred bytes
MAX_LIST_PAGE = 16 << 20  # a page of 1000 keys is ~300 KiB
_TRANSIENT_CODES = {"InternalError", "SlowDown", "ServiceUnavailable", "RequestTimeout", "503", "500"}
_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken"}
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
T = TypeVar("T")


class S3Error(Exception):
    """An S3 error response: `code` from its XML body (or from the status when it had none)."""

    def __init__(self, status: int, code: str | None, message: str = "") -> None:
        super().__init__(code or f"HTTP {status}")
        self.status, self.code, self.message = status, code, message


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(text.split())[:limit]


def _xml(body: bytes) -> ET.Element:
    """The root element of an XML document from the server; a DTD (entities) is refused."""
    if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
        raise ValueError("XML with a DTD")
    return ET.fromstring(body)


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]  # S3's namespace, or none (some servers omit it)


def parse_error(status: int, body: bytes, has_key: bool) -> S3Error:
    """The S3Error of an error response: Code/Message of its XML body; for a body without them the
    code a GET of that status means (as the SDKs map it), or none (5xx: a server error)."""
    try:
        fields = {_local(e.tag): (e.text or "") for e in _xml(body)} if body.strip() else {}
    except (ET.ParseError, ValueError):
        fields = {}
    if fields.get("Code"):
        return S3Error(status, _one_line(fields["Code"], 64), _one_line(fields.get("Message", "")))
    by_status = {403: "AccessDenied", 404: "NoSuchKey" if has_key else "NoSuchBucket", 416: "InvalidRange"}
    return S3Error(status, by_status.get(status))


def parse_listing(body: bytes) -> tuple[list[str], str | None]:
    """(the keys of a ListObjectsV2 page, the continuation token if the listing goes on)."""
    try:
        root = _xml(body)
    except (ET.ParseError, ValueError) as e:
        raise StoreError(f"bad ListObjectsV2 answer from the server ({e})") from None
    keys, truncated, token = [], False, None
    for child in root:
        tag = _local(child.tag)
        if tag == "Contents":
            key = next((e.text for e in child if _local(e.tag) == "Key"), None)
            if key:
                keys.append(key)
        elif tag == "IsTruncated":
            truncated = (child.text or "").strip().lower() == "true"
        elif tag == "NextContinuationToken":
            token = child.text or None
    if truncated and not token:
        raise StoreError("bad ListObjectsV2 answer from the server (truncated, no continuation token)")
    return keys, token if truncated else None


def _transient(e: BaseException) -> bool:
    if isinstance(e, S3Error):
        return e.code in _TRANSIENT_CODES or (e.code is None and e.status >= 500)
    # a certificate that fails verification fails again: urllib3 wraps ssl's error in its own
    cert_failure = any(isinstance(c, ssl.SSLCertVerificationError) for c in (e, *e.args))
    return isinstance(e, urllib3.exceptions.HTTPError | OSError | ssl.SSLError) and not cert_failure


def _describe(e: BaseException) -> str:
    if isinstance(e, S3Error):
        if e.code in _AUTH_CODES:
            return f"{e.code} (check access_key and secret_access_key)"
        if e.code is None:
            return f"server error {e.status}" if e.status >= 500 else f"HTTP status {e.status}"
        return f"{e.code}: {e.message}" if e.message else e.code
    reason = getattr(e, "reason", None) or e
    return f"{type(reason).__name__}: {reason}".split("\n")[0]


class S3Client:
    """Signed path-style requests to one endpoint over a pool of kept connections."""

    def __init__(self, loc: StoreLocation, opts: dict[str, str], parallelism: int) -> None:
        access = opts.get("access_key")
        secret = opts.get("secret_access_key")
        if not access or not secret:
            missing = "access_key" if not access else "secret_access_key"
            env = "AWS_ACCESS_KEY_ID" if not access else "AWS_SECRET_ACCESS_KEY"
            raise StoreError(
                f"s3 store {loc.display}: no {missing} (set it in --store-config FILE or ${env})"
            )
        self.access_key, self.secret_key = access, secret
        self.region = opts.get("region") or "us-east-1"
        secure = parse_bool(opts, "use_tls", True)
        insecure = parse_bool(opts, "tls_insecure_no_verify", False)
        timeout = parse_number(opts, "timeout", DEFAULT_TIMEOUT)
        host = f"[{loc.host}]" if ":" in loc.host else loc.host
        self.host = f"{host}:{loc.port}" if loc.port else host  # the Host header, as signed
        common = {
            "port": loc.port,
            "maxsize": parallelism,
            "timeout": urllib3.Timeout(connect=min(timeout, 10.0), read=timeout),
            "retries": False,
        }
        if secure:
            # The system's CA store, or the bundle $SSL_CERT_FILE names (as OpenSSL and the S3
            # SDKs do; Debian's urllib3 would otherwise read its fixed system bundle only).
            tls: dict[str, str] = {"cert_reqs": "CERT_NONE" if insecure else "CERT_REQUIRED"}
            if insecure:
                urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
            elif os.environ.get("SSL_CERT_FILE"):
                tls["ca_certs"] = os.environ["SSL_CERT_FILE"]
            self.pool: urllib3.HTTPConnectionPool = urllib3.HTTPSConnectionPool(loc.host, **tls, **common)
        else:
            self.pool = urllib3.HTTPConnectionPool(loc.host, **common)

    def request(
        self,
        method: str,
        path: str,
        params: Iterable[tuple[str, str]] = (),
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        payload_hash: str = s3sign.UNSIGNED_PAYLOAD,
    ) -> urllib3.HTTPResponse:
        """A signed request for `path` ("/bucket/key", unencoded). The response is returned with
        its body unread when the status is 2xx; any other status raises its S3Error."""
        params = list(params)
        signed = {
            "host": self.host,
            "x-amz-date": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
            "x-amz-content-sha256": payload_hash,
            **(headers or {}),
        }
        signed["authorization"] = s3sign.authorization(
            method, path, params, signed, payload_hash, self.access_key, self.secret_key, self.region
        )
        url = s3sign.uri_encode(path, keep_slash=True)
        query = s3sign.canonical_query(params)
        resp = self.pool.urlopen(
            method,
            f"{url}?{query}" if query else url,
            body=body,
            headers=signed,
            retries=False,
            redirect=False,
            preload_content=False,
            release_conn=False,
        )
        if 200 <= resp.status < 300:
            return resp
        if method == "HEAD":  # no body
            resp.release_conn()
        data = read_bounded(resp, MAX_ERROR_BODY) if method != "HEAD" else b""
        raise parse_error(resp.status, data, has_key=path.count("/") > 1)

    def close(self) -> None:
        self.pool.close()


def read_bounded(resp: urllib3.HTTPResponse, limit: int) -> bytes:
    """Up to `limit` bytes of the body; the connection goes back to the pool only if the body
    ended there (otherwise it is closed: the rest is not worth reading)."""
    try:
        data = resp.read(limit + 1, decode_content=False)
    except BaseException:
        resp.close()
        resp.release_conn()
        raise
    if len(data) > limit:
        resp.close()
    resp.release_conn()
    return data[:limit]


def read_all(resp: urllib3.HTTPResponse, expected: int | None = None) -> bytes:
    """The whole body, which must be `expected` bytes long (or Content-Length's): a connection cut
    short is a (transient) protocol error, never a short object."""
    try:
        data = resp.read(decode_content=False)
    except BaseException:
        resp.close()
        raise
    finally:
        resp.release_conn()  # back to the pool (a closed one is replaced on its next use)
    length = resp.headers.get("content-length")
    if expected is None and length and length.isdigit():
        expected = int(length)
    if expected is not None and len(data) != expected:
        raise urllib3.exceptions.ProtocolError(f"body cut short ({len(data)} of {expected} bytes)")
    return data


class S3Backend:
    parallelism = PARALLELISM

    def __init__(self, loc: StoreLocation) -> None:
        self.location = loc
        opts = store_options("s3")
        self.attempts = 1 + int(parse_number(opts, "retries", DEFAULT_RETRIES))
        self.client = S3Client(loc, opts, self.parallelism)
        self.bucket = loc.bucket
        self.prefix = loc.path

    def describe(self, key: str) -> str:
        port = f":{self.location.port}" if self.location.port else ""
        return f"s3://{self.location.host}{port}/{self.bucket}/{self.prefix}{key}"

    def connect_in_background(self, soon: Sequence[str] = ()) -> None:
        pass  # a connection costs one round trip here (two or three with TLS), made by the request

    def _call(self, key: str, call: Callable[[], T], what: str = "read") -> T:
        def once() -> T:
            try:
                return call()
            except S3Error as e:
                if e.code == "NoSuchKey":
                    raise FileNotFoundError(errno.ENOENT, "no such object", self.describe(key)) from None
                if e.code == "NoSuchBucket":
                    raise StoreError(f"store not found: {self.location.display} (no such bucket)") from None
                raise

        return retry(once, f"cannot {what} {self.describe(key)}", _transient, self.attempts, _describe)

    def _object(self, key: str) -> str:
        return f"/{self.bucket}/{self.prefix}{key}"

    def read(self, key: str) -> bytes:
        return self._call(key, lambda: read_all(self.client.request("GET", self._object(key))))

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""

        def get() -> bytes:
            want = {"range": f"bytes={offset}-{offset + length - 1}"}
            try:
                resp = self.client.request("GET", self._object(key), headers=want)
            except S3Error as e:
                if e.code == "InvalidRange":  # starts past the end: the object is shorter
                    return b""
                raise
            if resp.status == 200 and offset == 0:  # the whole object (a server may ignore Range)
                return read_bounded(resp, length)
            m = _CONTENT_RANGE.fullmatch(resp.headers.get("content-range", "").strip())
            if resp.status != 206 or not m or int(m[1]) != offset or int(m[2]) >= offset + length:
                read_bounded(resp, 0)
                got = _one_line(resp.headers.get("content-range") or f"status {resp.status}", 80)
                raise StoreError(
                    f"cannot read {self.describe(key)}: the server answered {got!r} to {want['range']}"
                )
            return read_all(resp, int(m[2]) - offset + 1)

        return self._call(key, get)

    def list(self, prefix: str) -> list[str]:
        full = self.prefix + prefix

        def listing() -> list[str]:
            keys: list[str] = []
            token: str | None = None
            seen: set[str] = set()
            while True:
                params = [("list-type", "2"), ("prefix", full)]
                if token:
                    params.append(("continuation-token", token))
                resp = self.client.request("GET", f"/{self.bucket}", params)
                page = read_bounded(resp, MAX_LIST_PAGE + 1)
                if len(page) > MAX_LIST_PAGE:
                    raise StoreError(
                        f"bad ListObjectsV2 answer from the server (a page over {MAX_LIST_PAGE} bytes)"
                    )
                found, token = parse_listing(page)
                keys += found
                if token is None:
                    break
                if token in seen:  # a server going round in circles
                    raise StoreError(f"bad ListObjectsV2 answer from the server (token {token[:64]!r} again)")
                seen.add(token)
            return sorted(k[len(self.prefix) :] for k in keys if k.startswith(full) and not k.endswith("/"))

        return self._call(prefix, listing, "list")

    def close(self) -> None:
        self.client.close()
