# `kloset-blocks ui` as a child process, and the login a browser does, for the tests, bench/ and
# scripts/: the real command exactly as a user starts it, in a run root of the caller's choosing
# (so that "nothing left behind" is checkable and no one else's chains are touched).
from __future__ import annotations

import http.client
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

from kloset_blocks.host.rundir import RUN_ROOT_ENV

REPO = Path(__file__).resolve().parents[2]


def spawn(
    store: Path | str, run_root: Path | str, *args: str, passphrase: str | None = None
) -> tuple[subprocess.Popen[str], str]:
    """Start `kloset-blocks ui STORE ARGS...`; returns the process and the first line on its
    stdout (the URL with the one-time token)."""
    env = {**os.environ, RUN_ROOT_ENV: str(run_root)}
    env.pop("PLAKAR_PASSPHRASE", None)
    if passphrase is not None:
        env["PLAKAR_PASSPHRASE"] = passphrase
    proc = subprocess.Popen(
        [sys.executable, "-m", "kloset_blocks", "ui", str(store), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
        env=env,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def login(url: str) -> str:
    """Trade the URL's token for the session cookie, as the browser does: the Cookie header value."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 0, timeout=60)
    try:
        conn.request("GET", f"/?{parts.query}")
        resp = conn.getresponse()
        resp.read()
    finally:
        conn.close()
    if resp.status != 303:
        raise RuntimeError(f"login refused: {resp.status}")
    return resp.getheader("set-cookie", "").split(";", 1)[0]
