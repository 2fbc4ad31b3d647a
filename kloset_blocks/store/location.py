# Store locations as plakar spells them (§1.1): `fs:/path`, `fs:///path` or a bare path for the
# local filesystem; `s3://HOST[:PORT]/BUCKET[/PREFIX]` (plakar's S3 integration: the host is the
# endpoint, the first path element the bucket, the rest a key prefix); `sftp://[USER@]HOST[:PORT]/PATH`
# (the fs layout under PATH on the remote host). The protocol is the longest [A-Za-z0-9+.-] prefix of
# at least 2 characters before ':' (so `C:\x` is a path). Anything else is refused by name.
#
# parse_location() only parses: it checks nothing on the network or the disk, and never holds a
# credential (those come from the store options, kloset_blocks/store/options.py).
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from kloset_blocks.errors import StoreError

_PROTO = re.compile(r"^([A-Za-z0-9+.-]{2,}):(.*)$", re.DOTALL)
_HOSTPORT = re.compile(r"^(?:\[([0-9A-Fa-f:.]+)\]|([^:\[\]/]+))(?::(\d{1,5}))?$")
SUPPORTED = ("fs", "s3", "sftp")


@dataclass(frozen=True)
class StoreLocation:
    """A parsed location: `scheme` is fs, s3 or sftp. For fs only `path` (absolute) is set; for s3
    `host`, `port`, `bucket` and `path` (the key prefix, "" or ending in "/"); for sftp `host`,
    `port`, `user` and `path` (the remote directory)."""

    scheme: str
    path: str
    display: str
    host: str = ""
    port: int | None = None
    user: str | None = None
    bucket: str = ""

    @property
    def remote(self) -> bool:
        return self.scheme != "fs"


def parse_location(location: str) -> StoreLocation:
    """The parsed store location (nothing is checked for existence)."""
    if not location:
        raise StoreError("empty store location")
    m = _PROTO.match(location)
    proto, rest = (m.group(1).lower(), m.group(2)) if m else ("fs", location)
    if proto not in SUPPORTED:
        raise StoreError(f"unsupported store backend: {proto} (supported: {', '.join(SUPPORTED)})")
    if proto == "s3":
        return _parse_s3(location, rest)
    if proto == "sftp":
        return _parse_sftp(location, rest)
    if m and rest.startswith("//"):
        rest = rest[2:]
    if not rest:
        raise StoreError(f"store location {location!r} has no path")
    if rest.endswith(".ptar"):
        raise StoreError(f"unsupported store backend: ptar (supported: {', '.join(SUPPORTED)})")
    path = os.path.abspath(os.path.expanduser(rest))
    return StoreLocation("fs", path, location if m else path)


def fs_root(location: str) -> str:
    """The directory of an fs location (StoreError for a remote one): for code that only does fs."""
    loc = parse_location(location)
    if loc.remote:
        raise StoreError(f"{location}: this needs a local (fs) store")
    return loc.path


def _authority(location: str, rest: str) -> tuple[str, str]:
    if not rest.startswith("//"):
        raise StoreError(f"store location {location!r}: expected {location.split(':')[0]}://HOST/...")
    authority, _, path = rest[2:].partition("/")
    if not authority:
        raise StoreError(f"store location {location!r} has no host")
    return authority, path


def _host_port(location: str, hostport: str) -> tuple[str, int | None]:
    m = _HOSTPORT.match(hostport)
    if not m:
        raise StoreError(f"store location {location!r}: bad host {hostport!r}")
    port = int(m.group(3)) if m.group(3) else None
    if port is not None and not 0 < port < 65536:
        raise StoreError(f"store location {location!r}: bad port {port}")
    return m.group(1) or m.group(2), port


def _parse_s3(location: str, rest: str) -> StoreLocation:
    authority, path = _authority(location, rest)
    host, port = _host_port(location, authority)
    bucket, _, prefix = path.strip("/").partition("/")
    if not bucket:
        raise StoreError(f"store location {location!r} has no bucket (s3://HOST[:PORT]/BUCKET[/PREFIX])")
    prefix = prefix.strip("/")
    return StoreLocation("s3", prefix + "/" if prefix else "", location, host, port, None, bucket)


def _parse_sftp(location: str, rest: str) -> StoreLocation:
    authority, path = _authority(location, rest)
    user, at, hostport = authority.rpartition("@")
    host, port = _host_port(location, hostport)
    if not path.strip("/"):
        raise StoreError(f"store location {location!r} has no path (sftp://[USER@]HOST[:PORT]/PATH)")
    return StoreLocation("sftp", "/" + path.strip("/"), location, host, port, user if at else None)
