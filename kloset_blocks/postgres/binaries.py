# The PostgreSQL server binaries for a snapshot's major version, where the distribution puts them.
from __future__ import annotations

from pathlib import Path

from kloset_blocks.errors import PgError

PG_LIB = Path("/usr/lib/postgresql")


def server_bindir(major: str, lib: Path = PG_LIB) -> Path:
    bindir = lib / major / "bin"
    if not (bindir / "postgres").is_file():
        raise PgError(
            f"the snapshot is PostgreSQL {major}, whose server is not installed here "
            f"({bindir}/postgres missing): apt-get install postgresql-{major}"
        )
    return bindir
