# AWS Signature Version 4 for S3 requests in the Authorization header, as a pure function: no I/O,
# no clock (the time is the request's x-amz-date header), so it can be judged against AWS's
# published examples and other implementations byte for byte.
#
# Invariants:
# - The path and query given here are the unencoded ones; uri_encode() and canonical_query() give
#   the exact strings the request must carry on the wire (the caller sends those, so what is signed
#   is what is sent). Encoding is RFC 3986's: every byte but A-Z a-z 0-9 - _ . ~ is %XX (upper
#   case); in a path "/" stays. S3 paths are encoded once and never normalized ("//", "." kept).
# - Every header given is signed: names lower-cased and sorted, values trimmed with inner runs of
#   white space made one space. The caller includes host and x-amz-date (and, for S3,
#   x-amz-content-sha256, whose value is also the payload hash here).
from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from urllib.parse import quote

ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"


def uri_encode(text: str, keep_slash: bool = False) -> str:
    """RFC 3986 percent-encoding of the UTF-8 bytes of `text` (S3's UriEncode)."""
    return quote(text, safe="/~" if keep_slash else "~")


def canonical_query(params: Iterable[tuple[str, str]]) -> str:
    """`k=v` pairs, encoded, sorted by key then value (so `a` sorts before `a-b`, which `a=`
    would not), joined by '&'; a key without a value is `k=`."""
    pairs = sorted((uri_encode(k), uri_encode(v)) for k, v in params)
    return "&".join(f"{k}={v}" for k, v in pairs)


def _canonical_headers(headers: Mapping[str, str]) -> tuple[str, str]:
    items = sorted((name.lower(), " ".join(value.split())) for name, value in headers.items())
    return "".join(f"{n}:{v}\n" for n, v in items), ";".join(n for n, _ in items)


def canonical_request(
    method: str,
    path: str,
    params: Iterable[tuple[str, str]],
    headers: Mapping[str, str],
    payload_hash: str,
) -> tuple[str, str]:
    """(the canonical request, its SignedHeaders list)."""
    canonical, signed = _canonical_headers(headers)
    text = "\n".join(
        [method, uri_encode(path, keep_slash=True), canonical_query(params), canonical, signed, payload_hash]
    )
    return text, signed


def signing_key(secret_key: str, day: str, region: str, service: str) -> bytes:
    key = ("AWS4" + secret_key).encode()
    for part in (day, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def _header(headers: Mapping[str, str], name: str) -> str:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    raise ValueError(f"SigV4: the request has no {name} header")


def authorization(
    method: str,
    path: str,
    params: Iterable[tuple[str, str]],
    headers: Mapping[str, str],
    payload_hash: str,
    access_key: str,
    secret_key: str,
    region: str,
    service: str = "s3",
) -> str:
    """The Authorization header's value for this request."""
    amz_date = _header(headers, "x-amz-date")
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    creq, signed = canonical_request(method, path, params, headers, payload_hash)
    to_sign = "\n".join([ALGORITHM, amz_date, scope, hashlib.sha256(creq.encode()).hexdigest()])
    key = signing_key(secret_key, amz_date[:8], region, service)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    return f"{ALGORITHM} Credential={access_key}/{scope}, SignedHeaders={signed}, Signature={signature}"
