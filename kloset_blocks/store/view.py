# A Store's view: its raw CONFIG and its list of states as it read them, one line of JSON
# (make_view, parse_view). A command hands it to the nbdkit it starts (in the environment: the
# plugin then asks the store for neither), and the last one read from each remote store is kept in
# the on-disk cache directory, so that the next command on the same store can start at once from
# it, with no round trip, while it checks in the background that the store still holds the same
# (app/check.py: nothing is answered before that check agrees; when the store changed, it starts
# again on what it holds now).
#
# Strategy: one file per location, DIR/views/<sha256 of the location>, written to a temporary file
# renamed into place (a reader never sees half of one), by every open that read the store itself.
# Read back bounded (MAX_VIEW); a file that is missing, too large or not a view of this location
# is no view.
#
# Invariants: a hint only. Nothing in it is trusted beyond what the store would say: parse_view
# checks its shape, the states it names are read through the MAC-checked cache, its CONFIG is
# unlocked like the store's, and a kept view is compared with the store's own before any answer.
# Errors writing or reading the file are ignored: it only saves time.
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
from pathlib import Path

MAX_VIEW = 64 << 20  # ~400,000 states


def make_view(location: str, raw_config: bytes, listed: list[tuple[bytes, str]]) -> str:
    return json.dumps(
        {
            "location": location,
            "config": base64.b64encode(raw_config).decode(),
            "states": [[ident.hex(), key] for ident, key in listed],
        },
        separators=(",", ":"),
    )


def parse_view(view: str, display: str) -> tuple[bytes, list[tuple[bytes, str]]] | None:
    """(raw CONFIG, listed states) of a Store.view() of the store at `display`; None otherwise."""
    try:
        data = json.loads(view)
        if data.get("location") != display:
            return None
        raw = base64.b64decode(data["config"], validate=True)
        listed = [(bytes.fromhex(ident), str(key)) for ident, key in data["states"]]
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    if not all(_state_key(ident, key) for ident, key in listed):
        return None
    return raw, listed


def _state_key(ident: bytes, key: str) -> bool:
    """A key as list_bucketed gives them: states/<bucket>/<the id in hex>, nothing else."""
    parts = key.split("/")
    return (
        len(ident) == 32
        and len(parts) == 3
        and parts[0] == "states"
        and parts[1] not in ("", ".", "..")
        and parts[2] == ident.hex()
    )


def view_path(cache_dir: str, location: str) -> Path:
    return Path(cache_dir) / "views" / hashlib.sha256(location.encode()).hexdigest()


def load_view(cache_dir: str, location: str) -> str | None:
    """The view last saved for the store at `location` (Store.location), or None."""
    try:
        with open(view_path(cache_dir, location), "rb") as f:
            data = f.read(MAX_VIEW + 1)
    except OSError:
        return None
    if len(data) > MAX_VIEW:
        return None
    try:
        view = data.decode()
    except UnicodeDecodeError:
        return None
    return view if parse_view(view, location) is not None else None


def save_view(cache_dir: str, location: str, view: str) -> None:
    path = view_path(cache_dir, location)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(view)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
