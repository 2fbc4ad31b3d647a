"""The SigV4 signer (store/s3sign.py) judged by oracles that are not ours: AWS's published examples
(the S3 API reference's "Signature Calculations for the Authorization Header" examples and cases of
AWS's Signature Version 4 test suite), and MinIO's SDK (its URL builder and `sign_v4_s3`) over a
table of the requests the backend sends and harder ones. Also the parsers of what an S3 server
answers (error documents, ListObjectsV2 pages) and the backend against a real HTTP server answering as
a broken or hostile S3 would: the server is untrusted input."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import ssl
import subprocess
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from kloset_blocks.errors import StoreError
from kloset_blocks.store import s3sign
from kloset_blocks.store.backend_s3 import S3Backend, parse_error, parse_listing
from kloset_blocks.store.location import parse_location
from kloset_blocks.store.options import CONFIG_ENV
from kloset_blocks.store.s3sign import EMPTY_SHA256, UNSIGNED_PAYLOAD, authorization

# The S3 API reference's examples: examplebucket in us-east-1, 20130524T000000Z.
S3_KEY = ("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
S3_HOST = "examplebucket.s3.amazonaws.com"
WELCOME = hashlib.sha256(b"Welcome to Amazon S3.").hexdigest()
S3_EXAMPLES = [
    # (name, method, path, query, extra headers, payload hash, signature)
    (
        "GET Object (a range)",
        "GET",
        "/test.txt",
        [],
        {"Range": "bytes=0-9"},
        EMPTY_SHA256,
        "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41",
    ),
    (
        "PUT Object",
        "PUT",
        "/test$file.text",
        [],
        {"Date": "Fri, 24 May 2013 00:00:00 GMT", "x-amz-storage-class": "REDUCED_REDUNDANCY"},
        WELCOME,
        "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd",
    ),
    (
        "GET Bucket Lifecycle",
        "GET",
        "/",
        [("lifecycle", "")],
        {},
        EMPTY_SHA256,
        "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543",
    ),
    (
        "GET Bucket (List Objects)",
        "GET",
        "/",
        [("prefix", "J"), ("max-keys", "2")],
        {},
        EMPTY_SHA256,
        "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7",
    ),
]


@pytest.mark.parametrize(
    ("method", "path", "query", "extra", "payload", "signature"),
    [e[1:] for e in S3_EXAMPLES],
    ids=[e[0] for e in S3_EXAMPLES],
)
def test_s3_reference_examples(method, path, query, extra, payload, signature) -> None:
    headers = {"Host": S3_HOST, "x-amz-date": "20130524T000000Z", "x-amz-content-sha256": payload, **extra}
    got = authorization(method, path, query, headers, payload, *S3_KEY, "us-east-1")
    signed = ";".join(sorted(h.lower() for h in headers))
    scope = "AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request"
    assert got == f"AWS4-HMAC-SHA256 Credential={scope}, SignedHeaders={signed}, Signature={signature}"


# AWS's Signature Version 4 test suite (service "service", us-east-1, 20150830T123600Z): the cases
# whose canonical URI S3 computes the same way (S3 neither normalizes paths nor encodes twice).
SUITE_KEY = ("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY")
FORM = hashlib.sha256(b"Param1=value1").hexdigest()
UNRESERVED = "-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
SUITE = [
    # (name, method, path, query, extra headers, payload hash, signature)
    (
        "get-vanilla",
        "GET",
        "/",
        [],
        {},
        EMPTY_SHA256,
        "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
    ),
    (
        "get-vanilla-empty-query-key",
        "GET",
        "/",
        [("Param1", "value1")],
        {},
        EMPTY_SHA256,
        "a67d582fa61cc504c4bae71f336f98b97f1ea3c7a6bfe1b6e45aec72011b9aeb",
    ),
    (
        "get-vanilla-query-order-key-case",
        "GET",
        "/",
        [("Param2", "value2"), ("Param1", "value1")],
        {},
        EMPTY_SHA256,
        "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
    ),
    (
        "get-vanilla-query-order-value",
        "GET",
        "/",
        [("Param1", "value2"), ("Param1", "value1")],
        {},
        EMPTY_SHA256,
        "5772eed61e12b33fae39ee5e7012498b51d56abc0abb7c60486157bd471c4694",
    ),
    (
        "get-vanilla-query-order-encoded",
        "GET",
        "/",
        [("Param-3", "Value3"), ("Param", "Value2"), ("\u1234", "Value1")],
        {},
        EMPTY_SHA256,
        "371d3713e185cc334048618a97f809c9ffe339c62934c032af5a0e595648fcac",
    ),
    (
        "get-vanilla-query-unreserved",
        "GET",
        "/",
        [(UNRESERVED, UNRESERVED)],
        {},
        EMPTY_SHA256,
        "9c3e54bfcdf0b19771a7f523ee5669cdf59bc7cc0884027167c21bb143a40197",
    ),
    (
        "get-vanilla-utf8-query",
        "GET",
        "/",
        [("\u1234", "bar")],
        {},
        EMPTY_SHA256,
        "2cdec8eed098649ff3a119c94853b13c643bcf08f8b0a1d91e12c9027818dd04",
    ),
    (
        "get-unreserved",
        "GET",
        "/" + UNRESERVED,
        [],
        {},
        EMPTY_SHA256,
        "07ef7494c76fa4850883e2b006601f940f8a34d404d0cfa977f52a65bbf5f24f",
    ),
    (
        "get-utf8",
        "GET",
        "/\u1234",
        [],
        {},
        EMPTY_SHA256,
        "8318018e0b0f223aa2bbf98705b62bb787dc9c0e678f255a891fd03141be5d85",
    ),
    (
        "get-space",
        "GET",
        "/example space/",
        [],
        {},
        EMPTY_SHA256,
        "652487583200325589f1fba4c7e578f72c47cb61beeca81406b39ddec1366741",
    ),
    (
        "get-special-character",
        "GET",
        "/example/$delete",
        [],
        {},
        EMPTY_SHA256,
        "a853c9b21b528b19643d00910d35b83a10c366a10833ceefb45edd6c80e40f27",
    ),
    (
        "get-header-value-trim",
        "GET",
        "/",
        [],
        {"My-Header1": " value1", "My-Header2": ' "a   b   c"'},
        EMPTY_SHA256,
        "acc3ed3afb60bb290fc8d2dd0098b9911fcaa05412b367055dee359757a9c736",
    ),
    (
        "get-header-value-multiline",
        "GET",
        "/",
        [],
        {"My-Header1": "value1\n  value2\n     value3"},
        EMPTY_SHA256,
        "cfd34249e4b1c8d6b91ef74165d41a32e5fab3306300901bb65a51a73575eefd",
    ),
    (
        "post-vanilla",
        "POST",
        "/",
        [],
        {},
        EMPTY_SHA256,
        "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b",
    ),
    (
        "post-vanilla-query",
        "POST",
        "/",
        [("Param1", "value1")],
        {},
        EMPTY_SHA256,
        "28038455d6de14eafc1f9222cf5aa6f1a96197d7deb8263271d420d138af7f11",
    ),
    (
        "post-header-value-case",
        "POST",
        "/",
        [],
        {"My-Header1": "VALUE1"},
        EMPTY_SHA256,
        "cdbc9802e29d2942e5e10b5bccfdd67c5f22c7c4e8ae67b53629efa58b974b7d",
    ),
    (
        "post-x-www-form-urlencoded",
        "POST",
        "/",
        [],
        {"Content-Type": "application/x-www-form-urlencoded"},
        FORM,
        "ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a",
    ),
]


@pytest.mark.parametrize(
    ("method", "path", "query", "extra", "payload", "signature"),
    [c[1:] for c in SUITE],
    ids=[c[0] for c in SUITE],
)
def test_aws_sigv4_test_suite(method, path, query, extra, payload, signature) -> None:
    headers = {"Host": "example.amazonaws.com", "X-Amz-Date": "20150830T123600Z", **extra}
    got = authorization(method, path, query, headers, payload, *SUITE_KEY, "us-east-1", "service")
    assert got.endswith(f", Signature={signature}")
    assert got.startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, ")


# Requests as the backend and mkstore send them, and harder keys, prefixes and tokens.
ODD_KEY = "dir with space/\u00e9\u1234+=&%~$!'()*,;:@[]#?x"
ORACLE_TABLE = [
    # (method, bucket, key, query, extra headers, payload hash, region)
    ("GET", "fixtures", "golden-plain/CONFIG", {}, {}, UNSIGNED_PAYLOAD, "us-east-1"),
    (
        "GET",
        "b",
        "p/packfiles/ab/" + "ab" * 32,
        {},
        {"range": "bytes=1048576-5242879"},
        UNSIGNED_PAYLOAD,
        "us-east-1",
    ),
    ("GET", "b", "", {"list-type": "2", "prefix": "golden-plain/states/"}, {}, UNSIGNED_PAYLOAD, "us-east-1"),
    (
        "GET",
        "b",
        "",
        {"list-type": "2", "prefix": "a b/+", "continuation-token": "1/Zx+==/%"},
        {},
        EMPTY_SHA256,
        "eu-west-3",
    ),
    ("GET", "b", ODD_KEY, {}, {"Range": "bytes=0-0"}, UNSIGNED_PAYLOAD, "eu-central-1"),
    ("HEAD", "made", "", {}, {}, UNSIGNED_PAYLOAD, "us-east-1"),
    ("PUT", "made", "", {}, {}, EMPTY_SHA256, "us-east-1"),
    ("PUT", "made", "x/states/00/" + "00" * 32, {}, {}, WELCOME, "ap-southeast-2"),
    (
        "GET",
        "b",
        "k",
        {"a": "1", "a-b": "2", "a.b": "", "A": "3"},
        {"X-Amz-Meta-Odd": "  two  spaces "},
        UNSIGNED_PAYLOAD,
        "us-east-1",
    ),
]


@pytest.mark.parametrize(("method", "bucket", "key", "query", "extra", "payload", "region"), ORACLE_TABLE)
def test_same_as_minio(method, bucket, key, query, extra, payload, region) -> None:
    from minio.credentials import Credentials
    from minio.helpers import BaseURL
    from minio.signer import sign_v4_s3

    when = datetime(2026, 12, 1, 23, 59, 59, tzinfo=UTC)
    headers = {
        "Host": "127.0.0.1:9000",
        "x-amz-date": "20261201T235959Z",
        "x-amz-content-sha256": payload,
        **extra,
    }
    url = BaseURL("http://127.0.0.1:9000", region).build(
        method=method, region=region, bucket_name=bucket, object_name=key or None, query_params=query
    )
    path = f"/{bucket}" + (f"/{key}" if key else "")
    assert url.path == s3sign.uri_encode(path, keep_slash=True)  # what we send is what minio would
    theirs = sign_v4_s3(
        method=method,
        url=url,
        region=region,
        headers=dict(headers),
        credentials=Credentials("AKIA-TEST", "s3cr3t/+key"),
        content_sha256=payload,
        date=when,
    )["Authorization"]
    ours = authorization(
        method, path, list(query.items()), headers, payload, "AKIA-TEST", "s3cr3t/+key", region
    )
    assert ours == theirs


def test_the_signature_depends_on_what_is_signed() -> None:
    """Each input changes the signature (a signer ignoring one would pass the tables by luck)."""
    base = ("GET", "/b/k", [("prefix", "p")], {"host": "h", "x-amz-date": "20260101T000000Z"}, EMPTY_SHA256)
    ref = authorization(*base, "AK", "SK", "us-east-1")
    variants = [
        authorization("HEAD", *base[1:], "AK", "SK", "us-east-1"),
        authorization(base[0], "/b/K", *base[2:], "AK", "SK", "us-east-1"),
        authorization(*base[:2], [("prefix", "q")], *base[3:], "AK", "SK", "us-east-1"),
        authorization(*base[:3], {**base[3], "range": "bytes=0-1"}, base[4], "AK", "SK", "us-east-1"),
        authorization(*base[:4], UNSIGNED_PAYLOAD, "AK", "SK", "us-east-1"),
        authorization(*base, "AK", "SK2", "us-east-1"),
        authorization(*base, "AK", "SK", "us-east-2"),
        authorization(
            *base[:3], {**base[3], "x-amz-date": "20260101T000001Z"}, base[4], "AK", "SK", "us-east-1"
        ),
    ]
    sig = lambda a: a.rpartition("Signature=")[2]  # noqa: E731
    assert len({sig(ref), *map(sig, variants)}) == len(variants) + 1


def test_no_date_header_is_refused() -> None:
    with pytest.raises(ValueError, match="x-amz-date"):
        authorization("GET", "/", [], {"host": "h"}, EMPTY_SHA256, "AK", "SK", "us-east-1")


# What S3 servers answer. The error documents are S3's own shape (namespace-less, as AWS sends
# them); the listing is the ListObjectsV2 shape with its namespace.
ERROR = b"""<?xml version="1.0" encoding="UTF-8"?>
<Error><Code>SignatureDoesNotMatch</Code><Message>The request signature we calculated does not match
   the signature you provided.</Message><RequestId>4442587FB7D0A2F9</RequestId></Error>"""


def test_error_documents() -> None:
    e = parse_error(403, ERROR, has_key=True)
    assert (e.status, e.code) == (403, "SignatureDoesNotMatch")
    assert e.message == "The request signature we calculated does not match the signature you provided."
    # without a body, or with one that is not S3's: the code a GET of that status means, if any
    assert parse_error(404, b"", has_key=True).code == "NoSuchKey"
    assert parse_error(404, b"<html>gone</html>", has_key=False).code == "NoSuchBucket"
    assert parse_error(416, b"", has_key=True).code == "InvalidRange"
    assert parse_error(503, b"Service Unavailable", has_key=True).code is None
    assert parse_error(500, ERROR[:60], has_key=True).code is None  # cut short: not XML
    # a DTD (entity expansion) is refused, not expanded
    bomb = b'<?xml version="1.0"?><!DOCTYPE e [<!ENTITY a "aaaaaaaaaa">]><Error><Code>&a;</Code></Error>'
    assert parse_error(400, bomb, has_key=True).code is None
    # a server's message reaches the user as one bounded line
    long = b"<Error><Code>X\nY</Code><Message>" + b"m\n" * 5000 + b"</Message></Error>"
    e = parse_error(400, long, has_key=True)
    assert e.code == "X Y" and "\n" not in e.message and len(e.message) <= 300


NS = 'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"'


def _page(keys: list[str], token: str | None) -> bytes:
    contents = "".join(f"<Contents><Key>{k}</Key><Size>1</Size></Contents>" for k in keys)
    more = (
        f"<IsTruncated>true</IsTruncated><NextContinuationToken>{token}</NextContinuationToken>"
        if token
        else ""
    )
    body = f"<Name>b</Name>{contents}{more}"
    return f'<?xml version="1.0"?><ListBucketResult {NS}>{body}</ListBucketResult>'.encode()


def test_listing_pages() -> None:
    assert parse_listing(_page(["p/a", "p/b"], None)) == (["p/a", "p/b"], None)
    assert parse_listing(_page(["p/c"], "tok+/=")) == (["p/c"], "tok+/=")
    bare = b"<ListBucketResult><Contents><Key>k</Key></Contents><IsTruncated>false</IsTruncated>"
    bare += b"</ListBucketResult>"
    assert parse_listing(bare) == (["k"], None)
    with pytest.raises(StoreError, match="no continuation token"):
        parse_listing(b"<ListBucketResult><IsTruncated>true</IsTruncated></ListBucketResult>")
    with pytest.raises(StoreError, match="bad ListObjectsV2 answer"):
        parse_listing(b"<ListBucketResult><Contents>")
    with pytest.raises(StoreError, match="bad ListObjectsV2 answer"):
        parse_listing(
            b'<!DOCTYPE l [<!ENTITY k "x">]><ListBucketResult><Contents><Key>&k;</Key></Contents>'
            b"</ListBucketResult>"
        )


# A real HTTP server on loopback answering as a broken or hostile S3 would: the backend must give
# the right bytes or one clear error, never wrong bytes, a decompressed bomb or an endless listing.
OBJECT = bytes(range(10))
GZ = gzip.compress(b"\0" * 100_000, mtime=0)  # 100 KB of zeros, 130 bytes compressed


class Hostile(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes, **headers: str) -> None:
        self.send_response(status)
        for k, v in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        assert "AWS4-HMAC-SHA256 Credential=AK/" in self.headers["Authorization"]
        path, _, query = self.path.partition("?")
        name = path.rsplit("/", 1)[1]
        if name in ("ok", "ignores-range"):
            self._send(200, OBJECT)
        elif name == "other-range":
            self._send(206, OBJECT[5:8], Content_Range="bytes 5-7/10")
        elif name == "gzip":
            self._send(200, GZ, Content_Encoding="gzip")
        elif name == "cut":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(OBJECT)
            self.close_connection = True
        elif name == "missing":
            self._send(404, b"<Error><Code>NoSuchKey</Code><Message>gone</Message></Error>")
        elif name == "huge-error":
            self._send(400, b"<Error><Code>Odd</Code><Message>" + b"x" * (1 << 20) + b"</Message></Error>")
        elif "list-type=2" in query:  # a listing whose pages never end
            self._send(200, _page(["p/k"], "same-token"))
        else:
            self._send(500, b"")


@contextlib.contextmanager
def serving(tls_cert: Path | None = None) -> Iterator[int]:
    """The hostile server on a loopback port (over TLS with that certificate and key, if given)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    if tls_cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tls_cert)
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def backend_for(port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **opts: str) -> S3Backend:
    lines = {"access_key": "AK", "secret_access_key": "SK", "retries": "1", "timeout": "5", **opts}
    config = tmp_path / "s3.conf"
    config.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
    monkeypatch.setenv(CONFIG_ENV, str(config))
    return S3Backend(parse_location(f"s3://127.0.0.1:{port}/b/p"))


@pytest.fixture
def hostile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Backend]:
    with serving() as port:
        backend = backend_for(port, tmp_path, monkeypatch, use_tls="false")
        try:
            yield backend
        finally:
            backend.close()


def test_a_hostile_server_gives_right_bytes_or_one_error(hostile: S3Backend) -> None:
    assert hostile.read_range("ignores-range", 0, 3) == OBJECT[:3]  # 200 to a range from 0: cut here
    with pytest.raises(StoreError, match=r"answered 'status 200' to bytes=2-4$"):
        hostile.read_range("ignores-range", 2, 3)
    with pytest.raises(StoreError, match=r"answered 'bytes 5-7/10' to bytes=2-4$"):
        hostile.read_range("other-range", 2, 3)
    assert hostile.read("gzip") == GZ  # as stored, not inflated
    with pytest.raises(StoreError, match=r"Connection broken: IncompleteRead.* \(after 2 attempts\)$"):
        hostile.read("cut")
    with pytest.raises(FileNotFoundError):
        hostile.read("missing")
    with pytest.raises(StoreError, match=r"huge-error: HTTP status 400$"):  # read up to 64 KiB: not XML
        hostile.read("huge-error")
    with pytest.raises(StoreError, match=r"server error 500 \(after 2 attempts\)$"):
        hostile.read("anything-else")
    with pytest.raises(StoreError, match="token 'same-token' again"):
        hostile.list("")


def test_tls_certificates_are_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """use_tls (the default): a self-signed certificate is refused at once (not retried); accepted
    from the bundle SSL_CERT_FILE names, or with tls_insecure_no_verify."""
    cert = tmp_path / "server.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-nodes", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-days", "1"),
            *("-keyout", str(cert), "-out", str(tmp_path / "cert.pem")),
        ],
        check=True,
        capture_output=True,
    )
    cert.write_text(cert.read_text() + (tmp_path / "cert.pem").read_text())
    with serving(tls_cert=cert) as port:
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)  # the system's CA store
        refused = backend_for(port, tmp_path, monkeypatch)
        with pytest.raises(StoreError, match=r"/b/p/ok: SSLError: .*certificate verify failed") as e:
            refused.read("ok")
        assert "attempts" not in str(e.value)  # not retried
        refused.close()
        monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "cert.pem"))
        trusted = backend_for(port, tmp_path, monkeypatch)
        assert trusted.read("ok") == OBJECT
        trusted.close()
        monkeypatch.delenv("SSL_CERT_FILE")
        insecure = backend_for(port, tmp_path, monkeypatch, tls_insecure_no_verify="true")
        assert insecure.read_range("ok", 0, 4) == OBJECT[:4]
        insecure.close()
