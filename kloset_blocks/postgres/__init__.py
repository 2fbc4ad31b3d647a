# PostgreSQL on a mounted snapshot: the server binaries of its major version (binaries.py), its data
# directory made ready on the overlay (datadir.py), and the server itself (server.py). This facade
# is the API the layers above use (`from kloset_blocks import postgres`).
from __future__ import annotations

from kloset_blocks.errors import PgError
from kloset_blocks.pgdata import check_major, find_data_dir, read_major
from kloset_blocks.postgres.binaries import server_bindir
from kloset_blocks.postgres.datadir import (
    PG_USER,
    Cluster,
    ensure_traversable,
    fix_ownership,
    locate,
    pg_ids,
    prepare_datadir,
)
from kloset_blocks.postgres.server import (
    NoWalError,
    Server,
    child_env,
    relevant_lines,
    start_server,
    stop_recorded,
)

__all__ = [
    "PG_USER",
    "Cluster",
    "NoWalError",
    "PgError",
    "Server",
    "check_major",
    "child_env",
    "ensure_traversable",
    "find_data_dir",
    "fix_ownership",
    "locate",
    "pg_ids",
    "prepare_datadir",
    "read_major",
    "relevant_lines",
    "server_bindir",
    "start_server",
    "stop_recorded",
]
