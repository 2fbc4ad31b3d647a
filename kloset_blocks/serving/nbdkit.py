# The nbdkit command line that serves a snapshot with this project's plugin (nbdplugin/kloset.py),
# and the environment it needs: nbdkit embeds Debian's /usr/bin/python3, which must find this
# checkout and its virtualenv. No secret is ever in the argv: an encrypted store's key, derived by
# the caller, travels in nbdkit's environment.
from __future__ import annotations

import os
import sys
from pathlib import Path

from kloset_blocks.store.passphrase import PASSPHRASE_ENV

REPO = Path(__file__).resolve().parents[2]


PLUGIN = REPO / "nbdplugin" / "kloset.py"


# nbdkit threads a connection. The plugin is PARALLEL, but Python runs one thread at a time (the
# GIL): nbdkit's default of 16 a connection puts up to 64 threads in the plugin at once (nbdcopy's 4
# connections), and they spend their time handing the GIL to each other. Two a connection keep a
# miss from stalling its connection (a hit or a second fetch goes on meanwhile) for a fraction of
# the switching: bench/RESULTS.md, "nbdkit threads".
NBDKIT_THREADS = 2
# nbdkit 1.32.5 (Debian 12) aborts, killing every connection, when a client dies with replies in
# flight and its connection has more than one thread (`raw_send_socket: Assertion 'sock >= 0'`;
# bench/nbdkit_client_death.py). An nbdkit that serves several chains (`query`) must survive one of
# them dying, so it runs one thread a connection: bench/RESULTS.md, "nbdkit abort".
SHARED_NBDKIT_THREADS = 1
# The plugin's counters (stats=FILE), read back for the "fetched ... from the store" line.
STATS_FILE = "nbdkit-stats.json"
# Store.view() of the store the caller just opened (CONFIG, the list of states), so that the plugin
# does not ask a remote store for them again; left out when longer than VIEW_MAX (an environment
# string has a bound: 128 KiB).
VIEW_ENV = "KLOSET_BLOCKS_STORE_VIEW"
VIEW_MAX = 64 << 10


def nbdkit_argv(
    store: str,
    snap: str,
    path: str | None = None,
    owner: str | None = None,
    *,
    key: bytes | None = None,
    pgdata: bool = False,
    stats: str | None = None,
    journal: bool = False,
    threads: int = NBDKIT_THREADS,
    view: str | None = None,
) -> tuple[list[str], dict[str, str | None]]:
    """(argv, extra environment) for `nbdkit --threads=2 python nbdplugin/kloset.py store=...`.
    An encrypted store's `key`, derived by the caller, goes to nbdkit in its environment (store/
    config.py: KEY_ENV) instead of the passphrase, so that nbdkit does not derive it again."""
    argv = ["nbdkit", f"--threads={threads}", "python", str(PLUGIN)]
    argv += [f"store={store}", f"snapshot={snap}"]
    if path:
        argv.append(f"path={path}")
    if pgdata:
        argv.append("pgdata=true")
    if owner:
        argv.append(f"owner={owner}")
    if stats:
        argv.append(f"stats={stats}")
    if journal:
        argv.append("journal=true")  # the overlay is kept: the filesystem must survive a crash
    # nbdkit embeds Debian's /usr/bin/python3: give it the repo and the venv's site-packages.
    site = (
        REPO / ".venv" / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    )
    env: dict[str, str | None] = {"PYTHONPATH": os.pathsep.join([str(REPO), str(site)])}
    env[VIEW_ENV] = view if view and len(view) <= VIEW_MAX else None
    if key is not None:
        from kloset_blocks.store.passphrase import KEY_ENV

        env[KEY_ENV] = key.hex()
        env[PASSPHRASE_ENV] = None  # nbdkit needs the key only: do not pass the passphrase on
    return argv, env
