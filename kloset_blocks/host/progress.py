# Progress for a human on stderr: one line per phase with its time ("serve 0.12 s"), and the bytes
# fetched from the store at the end. quiet=True silences the lines; the times are kept either way.
from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator

# --- progress ------------------------------------------------------------------------------------


class Progress:
    """Phase timings for a human on stderr ("serve 0.12 s"); quiet=True silences, times are kept."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.times: dict[str, float] = {}
        self.fetched_bytes: int | None = None  # from the store, set at teardown (nbdkit's counters)
        self.logical_size: int | None = None

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        yield
        self.done(name, time.monotonic() - t0)

    def done(self, name: str, seconds: float) -> None:
        self.times[name] = seconds
        self.say(f"{name} {seconds:.2f} s")

    def fetched(self, fetched: int, size: int) -> None:
        from kloset_blocks.units import format_size

        self.fetched_bytes, self.logical_size = fetched, size
        share = f" ({100 * fetched / size:.1f} %)" if size else ""
        self.say(f"fetched {format_size(fetched)} of {format_size(size)}{share} from the store")

    def say(self, line: str) -> None:
        if not self.quiet:
            print(line, file=sys.stderr, flush=True)
