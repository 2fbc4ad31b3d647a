# plakar's `postgres+bin` importer writes /manifest.json first, then the pg_basebackup tar under
# /data. This module reads that manifest (its version 2 fields that matter here: connector,
# server_version, server_version_num, cluster_config.data_checksums, databases and their relations)
# and gives a snapshot's PostgreSQL major: the manifest's where there is one, checked against
# PG_VERSION (which names the binaries the data directory needs), else PG_VERSION's alone.
#
# A backup is untrusted input: the manifest is read only up to MAX_MANIFEST bytes, every field is
# type-checked, and a manifest that is absent, too large, not JSON, of another connector or version
# is simply not used (PG_VERSION decides); only a manifest that contradicts PG_VERSION is an error.
# Pure rules over pgdata's snapshot interface plus open_file: no store or host knowledge.
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from kloset_blocks.errors import NotFound, PgError
from kloset_blocks.pgdata import PG_VERSION, SnapshotTree, check_major

MANIFEST_PATH = b"/manifest.json"
CONNECTOR = "postgresql+bin"
MAX_MANIFEST = 16 << 20  # a cluster's inventory: columns and indexes of every relation
MAX_PG_VERSION = 64


@dataclass(frozen=True)
class Database:
    name: str
    relations: int  # relations the manifest lists (details of connectable non-templates only)
    is_template: bool = False


@dataclass(frozen=True)
class PgManifest:
    server_version: str  # "17.10"
    server_version_num: int  # 170010
    data_checksums: bool | None  # None: the manifest does not say
    databases: tuple[Database, ...]

    @property
    def major(self) -> str:
        """170010 -> "17"; 90624 -> "9.6" (before 10 the major has two parts)."""
        n = self.server_version_num
        return str(n // 10000) if n >= 100000 else f"{n // 10000}.{n // 100 % 100}"

    @property
    def relations(self) -> int:
        return sum(d.relations for d in self.databases)

    def summary(self, quote: Callable[[str], str] = str) -> str:
        """One line for listings: "PostgreSQL 17.10, checksums on, databases postgres,shop"; quote
        makes the manifest's strings safe for a terminal."""
        checks = {True: ", checksums on", False: ", checksums off", None: ""}[self.data_checksums]
        names = ",".join(quote(d.name) for d in self.databases if not d.is_template)
        return f"PostgreSQL {quote(self.server_version)}{checks}, databases {names or '-'}"


def parse_manifest(raw: bytes) -> PgManifest | None:
    """The manifest if raw is a version-2 postgresql+bin one with a usable version, else None."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(doc, dict) or doc.get("connector") != CONNECTOR or doc.get("version") != 2:
        return None
    version, num = doc.get("server_version"), doc.get("server_version_num")
    if not isinstance(version, str) or type(num) is not int or not 90000 <= num < 10_000_000:
        return None
    config = doc.get("cluster_config")
    checksums = config.get("data_checksums") if isinstance(config, dict) else None
    return PgManifest(
        server_version=version[:64],
        server_version_num=num,
        data_checksums=checksums if isinstance(checksums, bool) else None,
        databases=tuple(_databases(doc.get("databases"))),
    )


def _databases(value: Any) -> list[Database]:
    if not isinstance(value, list):
        return []
    out = []
    for d in value:
        if isinstance(d, dict) and isinstance(d.get("name"), str):
            rels = d.get("relations")
            out.append(
                Database(
                    name=d["name"],
                    relations=len(rels) if isinstance(rels, list) else 0,
                    is_template=d.get("is_template") is True,
                )
            )
    return out


class _File(Protocol):
    @property
    def entry(self) -> Any: ...

    def read(self, offset: int, size: int) -> bytes: ...


class SnapshotFiles(SnapshotTree, Protocol):
    def open_file(self, path: bytes) -> _File: ...


def read_manifest(snapshot: SnapshotFiles) -> PgManifest | None:
    """The snapshot's /manifest.json, parsed, or None (absent, not a file, too large, unusable)."""
    try:
        f = snapshot.open_file(MANIFEST_PATH)  # NotFound also for a directory or a symlink
    except NotFound:
        return None
    size = int(f.entry.size)
    return parse_manifest(f.read(0, size)) if size <= MAX_MANIFEST else None


def snapshot_major(snapshot: SnapshotFiles, root: bytes) -> str:
    """The PostgreSQL major of the data directory at root: the manifest's where plakar's importer
    wrote one (root /data), which PG_VERSION must confirm; else PG_VERSION's."""
    manifest = read_manifest(snapshot) if root == b"/data" else None
    f = snapshot.open_file(root.rstrip(b"/") + b"/" + PG_VERSION)
    text = f.read(0, min(f.entry.size, MAX_PG_VERSION)).decode(errors="replace").strip()
    where = f"snapshot {snapshot.info.short_id}"
    major = check_major(text, where)
    if manifest is not None and manifest.major != major:
        raise PgError(
            f"{where}: its manifest.json says PostgreSQL {manifest.server_version} but its "
            f"PG_VERSION says {major}: the backup is inconsistent"
        )
    return major
