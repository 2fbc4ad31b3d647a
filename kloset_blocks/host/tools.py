# Running the chain's tools (qemu-img, losetup, mount...) to completion, and the one line of their
# output that says what went wrong. Every failure is an AttachError naming the phase.
from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from kloset_blocks.errors import KlosetError
from kloset_blocks.store.passphrase import KEY_ENV, PASSPHRASE_ENV

TOOL_TIMEOUT = 60.0


# The store's secrets: the passphrase (PLAKAR_PASSPHRASE) and the key derived from it. Only nbdkit
# needs the key (given explicitly); no child inherits either.
SECRET_ENV = (PASSPHRASE_ENV, KEY_ENV)


def clean_env(extra: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """This process's environment without the secrets, with `extra` applied (None unsets)."""
    env: dict[str, str | None] = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    env.update(extra or {})
    return {k: v for k, v in env.items() if v is not None}


class AttachError(KlosetError):
    """A phase of the attach chain failed (the message names the phase and the tool's own words)."""


# --- small tools ---------------------------------------------------------------------------------


def run_tool(argv: Sequence[str], what: str, *, timeout: float = TOOL_TIMEOUT) -> str:
    """Run a tool to completion; failure -> AttachError with its last stderr line."""
    try:
        p = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=clean_env(),
        )
    except FileNotFoundError as e:
        raise AttachError(f"{what}: {argv[0]} not found (run `make deps`)") from e
    except subprocess.TimeoutExpired as e:
        raise AttachError(f"{what}: {argv[0]} did not finish within {timeout:.0f} s") from e
    if p.returncode != 0:
        raise AttachError(f"{what}: {last_line(p.stderr) or f'{argv[0]} exited with {p.returncode}'}")
    return p.stdout


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def log_tail(path: Path | str) -> str:
    """The last line of a component's log that says something: `setsid -w`'s own line ("child N
    did not exit normally") only repeats that the component died, so the line before it is taken."""
    return _log_lines(path)[0]


def _log_lines(path: Path | str) -> tuple[str, bool]:
    """(last meaningful line, whether setsid said its child died by a signal)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            text = f.read().decode(errors="replace")
    except OSError:
        return "", False
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    said = [ln for ln in lines if not _SETSID_LINE.match(ln)]
    return (said[-1] if said else ""), len(said) < len(lines)


_SETSID_LINE = re.compile(r"^setsid: child \d+ did not exit normally")


def exit_cause(returncode: int | None, log_path: Path | str, what: str) -> str:
    """Why a component exited, for a message that ends in a colon: its log's last line, and how it
    ended (a signal by name, or its exit status), never nothing. Under `setsid -w` (nbdkit) in a
    session of its own, setsid says "child N did not exit normally" and exits with the child's raw
    wait status, the signal's number."""
    tail, by_signal = _log_lines(log_path)
    if returncode is not None and returncode < 0:
        how = f"{what} was killed by {_signame(-returncode)}"
    elif by_signal:  # setsid's exit status is then the child's raw wait status: the signal
        how = f"{what} was killed by {_signame(returncode & 0x7F) if returncode else 'a signal'}"
    elif returncode is not None:
        how = f"{what} exited with status {returncode}"
    else:
        how = f"{what} is gone"
    return f"{tail} ({how})" if tail else f"{how}, and its log {log_path} says nothing more"


def _signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
