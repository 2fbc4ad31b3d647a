# The S3 backend: a Kloset store in a bucket, plakar's layout (`<prefix>CONFIG`,
# `<prefix>states/<xx>/<64 hex>`, `<prefix>packfiles/<xx>/<64 hex>`), read with MinIO's Python SDK
# (the Go one is what plakar's integration uses; it imports in a third of botocore's time, which
# matters because nbdkit starts it). Path-style requests to the endpoint HOST[:PORT].
#
# Invariants:
# - Thread-safe: the Minio client is; its urllib3 pool holds up to `parallelism` connections, so
#   that many requests are really in flight (the GIL is released while waiting on sockets).
# - Every request has socket timeouts (connect and each read: `timeout`, default 30 s) and goes
#   through options.retry(): transient failures (connection errors, timeouts, 5xx, SlowDown) are
#   retried with backoff, `retries` times at most; everything else is one StoreError line naming
#   the object and the S3 error code. NoSuchKey is FileNotFoundError, as on a filesystem.
# - Read-only: no request here writes (upload.py holds the writes mkstore does).
from __future__ import annotations

import errno
import ssl

import urllib3
from minio import Minio
from minio.error import S3Error, ServerError

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

PARALLELISM = 32
_TRANSIENT_CODES = {"InternalError", "SlowDown", "ServiceUnavailable", "RequestTimeout", "503", "500"}
_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken"}


def _transient(e: BaseException) -> bool:
    if isinstance(e, S3Error):
        return e.code in _TRANSIENT_CODES
    if isinstance(e, ServerError):
        return True
    return isinstance(e, urllib3.exceptions.HTTPError | OSError | ssl.SSLError) and not isinstance(
        e, ssl.SSLCertVerificationError
    )


def _describe(e: BaseException) -> str:
    if isinstance(e, S3Error):
        if e.code in _AUTH_CODES:
            return f"{e.code} (check access_key and secret_access_key)"
        return f"{e.code}: {e.message}" if e.message else str(e.code)
    if isinstance(e, ServerError):
        return f"server error {e.status_code}"
    reason = getattr(e, "reason", None) or e
    return f"{type(reason).__name__}: {reason}".split("\n")[0]


def make_client(loc: StoreLocation, opts: dict[str, str], parallelism: int) -> Minio:
    access = opts.get("access_key")
    secret = opts.get("secret_access_key")
    if not access or not secret:
        missing = "access_key" if not access else "secret_access_key"
        env = "AWS_ACCESS_KEY_ID" if not access else "AWS_SECRET_ACCESS_KEY"
        raise StoreError(f"s3 store {loc.display}: no {missing} (set it in --store-config FILE or ${env})")
    secure = parse_bool(opts, "use_tls", True)
    insecure = parse_bool(opts, "tls_insecure_no_verify", False)
    timeout = parse_number(opts, "timeout", DEFAULT_TIMEOUT)
    pool = urllib3.PoolManager(
        num_pools=4,
        maxsize=parallelism,
        timeout=urllib3.Timeout(connect=min(timeout, 10.0), read=timeout),
        retries=False,
        cert_reqs="CERT_NONE" if insecure else "CERT_REQUIRED",
    )
    if insecure:
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    host = f"[{loc.host}]" if ":" in loc.host else loc.host
    endpoint = f"{host}:{loc.port}" if loc.port else host
    return Minio(
        endpoint,
        access_key=access,
        secret_key=secret,
        secure=secure,
        region=opts.get("region") or "us-east-1",
        http_client=pool,
        cert_check=not insecure,
    )


class S3Backend:
    parallelism = PARALLELISM

    def __init__(self, loc: StoreLocation) -> None:
        self.location = loc
        opts = store_options("s3")
        self.attempts = 1 + int(parse_number(opts, "retries", DEFAULT_RETRIES))
        self.client = make_client(loc, opts, self.parallelism)
        self.bucket = loc.bucket
        self.prefix = loc.path

    def describe(self, key: str) -> str:
        port = f":{self.location.port}" if self.location.port else ""
        return f"s3://{self.location.host}{port}/{self.bucket}/{self.prefix}{key}"

    def _call(self, key: str, call, what: str = "read"):  # type: ignore[no-untyped-def]
        def once():  # type: ignore[no-untyped-def]
            try:
                return call()
            except S3Error as e:
                if e.code == "NoSuchKey":
                    raise FileNotFoundError(errno.ENOENT, "no such object", self.describe(key)) from None
                if e.code == "NoSuchBucket":
                    raise StoreError(f"store not found: {self.location.display} (no such bucket)") from None
                raise

        return retry(once, f"cannot {what} {self.describe(key)}", _transient, self.attempts, _describe)

    def _get(self, key: str, offset: int = 0, length: int = 0) -> bytes:
        resp = self.client.get_object(self.bucket, self.prefix + key, offset=offset, length=length)
        try:
            return resp.read()
        finally:
            resp.release_conn()  # back to the pool (close() would drop the connection)

    def read(self, key: str) -> bytes:
        return self._call(key, lambda: self._get(key))

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""

        def get() -> bytes:
            try:
                return self._get(key, offset, length)
            except S3Error as e:
                if e.code == "InvalidRange":  # starts past the end: the object is shorter
                    return b""
                raise

        return self._call(key, get)

    def list(self, prefix: str) -> list[str]:
        def listing() -> list[str]:
            objs = self.client.list_objects(self.bucket, prefix=self.prefix + prefix, recursive=True)
            return sorted(o.object_name[len(self.prefix) :] for o in objs if not o.is_dir)

        return self._call(prefix, listing, "list")

    def close(self) -> None:
        self.client._http.clear()
