# Running the chain's tools (qemu-img, losetup, mount...) to completion, and the one line of their
# output that says what went wrong. Every failure is an AttachError naming the phase.
from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from kloset_blocks.errors import KlosetError

TOOL_TIMEOUT = 60.0


class AttachError(KlosetError):
    """A phase of the attach chain failed (the message names the phase and the tool's own words)."""


# --- small tools ---------------------------------------------------------------------------------


def run_tool(argv: Sequence[str], what: str, *, timeout: float = TOOL_TIMEOUT) -> str:
    """Run a tool to completion; failure -> AttachError with its last stderr line."""
    try:
        p = subprocess.run(
            list(argv), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
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
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            return last_line(f.read().decode(errors="replace"))
    except OSError:
        return ""
