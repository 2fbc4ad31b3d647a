# What the CLI says when reads from the store failed during a session: the plugin records each
# failed read (snapshot path, reason, count) in its stats file as it happens (serving/server.py,
# `read_failures`), and when a session fails (Postgres does not start, psql or a query ends in an
# error) its message would blame the wrong thing ("configuration file contains errors", "the
# backup has no WAL"): the files that could not be read are the cause, so they are what is said.
#
# One line, the first failures in full and a count of the rest, so that it fits the CLI's
# one-line error; the stats file is the plugin's own (JSON, rewritten atomically). A teardown step
# also says it, as a progress line, for the sessions that outlive their command (`mount`, `pg
# start`: at `down` / `pg stop`).
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kloset_blocks.errors import CorruptionError
from kloset_blocks.host.teardown import REPORT, Teardown, register_teardown
from kloset_blocks.serving.nbdkit import STATS_FILE

SHOWN = 2  # failures named in full; the rest are counted
REPORTED = "damage-reported"  # in a run directory: its session raised the damage as its error


def read_failures(stats_file: Path | str | None) -> list[dict[str, Any]]:
    """The failed reads recorded in a plugin stats file ([] when there are none or no file)."""
    if stats_file is None:
        return []
    try:
        stats = json.loads(Path(stats_file).read_text())
    except (OSError, ValueError):
        return []
    failures = stats.get("read_failures") if isinstance(stats, dict) else None
    return [f for f in failures if isinstance(f, dict)] if isinstance(failures, list) else []


def damage_message(failures: list[dict[str, Any]], snapshot: str = "") -> str:
    """One line: the store is damaged, and which snapshot paths could not be read, and why."""
    paths = sorted({str(f.get("path") or "") for f in failures})
    what = f"snapshot {snapshot[:8]} of the store" if snapshot else "the store"
    shown = []
    for f in failures[:SHOWN]:
        path, reason = str(f.get("path") or ""), str(f.get("reason") or "")
        shown.append(f"{path}: {reason}" if path else reason)
    more = len(failures) - len(shown)
    tail = f"; and {more} more" if more > 0 else ""
    return (
        f"{what} is damaged: reading {len(paths)} file(s) failed: {'; '.join(shown)}{tail}"
        " (kloset-blocks restore names every damaged file)"
    )


def damage_error(stats_file: Path | str | None, snapshot: str = "") -> CorruptionError | None:
    """The error to raise instead of a session's own when reads of `snapshot` (its full id, the
    export's name; "" for any) from the store failed."""
    failures = [f for f in read_failures(stats_file) if not snapshot or f.get("export") in (snapshot, None)]
    return CorruptionError(damage_message(failures, snapshot)) if failures else None


def session_damage(run_dir: Path | None, state: Mapping[str, Any] | None) -> CorruptionError | None:
    """damage_error for a chain's run directory and the state app.check.Served recorded in it
    (read before the teardown, which removes the directory)."""
    served = (state or {}).get("served")
    if run_dir is None or not served:
        return None
    damage = damage_error(run_dir / served.get("stats", STATS_FILE), str(served.get("snapshot") or ""))
    if damage is not None:
        (run_dir / REPORTED).touch()  # the session says it: the teardown need not say it again
    return damage


def _report_damage(t: Teardown) -> None:
    """At teardown (`down`, `pg stop`, the end of `psql`): a line naming what could not be read."""
    served = t.state.get("served")
    if served and not (t.path / REPORTED).exists():
        damage = damage_error(t.path / served.get("stats", STATS_FILE), str(served.get("snapshot") or ""))
        if damage is not None:
            t.progress.say(str(damage))


register_teardown(REPORT, "damage report", _report_damage)
