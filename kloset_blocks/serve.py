# The nbdkit command line that serves a snapshot as an ext4 image (owned by the lead; the attach
# chain takes any argv, minus the socket option, which it adds itself together with -f and -r).
#
# Invariants: no secret in argv (the passphrase travels in PLAKAR_PASSPHRASE in the environment);
# no --exit-with-parent: for `mount` and `pg start` nbdkit must outlive the CLI that started it
# (it runs in its own session and is stopped by `kloset-blocks down`).
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PLUGIN = REPO / "nbdplugin" / "kloset.py"


def nbdkit_argv(
    store: str,
    snap: str,
    path: str | None = None,
    owner: str | None = None,
    passphrase: str | None = None,
) -> tuple[list[str], dict[str, str]]:
    """(argv, extra environment) for `nbdkit python nbdplugin/kloset.py store=... snapshot=...`."""
    argv = ["nbdkit", "python", str(PLUGIN), f"store={store}", f"snapshot={snap}"]
    if path:
        argv.append(f"path={path}")
    if owner:
        argv.append(f"owner={owner}")
    # nbdkit embeds Debian's /usr/bin/python3: give it the repo and the venv's site-packages.
    site = (
        REPO / ".venv" / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    )
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(site)])}
    if passphrase is not None:
        env["PLAKAR_PASSPHRASE"] = passphrase
    return argv, env
