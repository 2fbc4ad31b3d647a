# Signals around a chain: SIGTERM and SIGHUP unwind like Ctrl-C (so every `with`/`finally` tears
# down), teardown runs with SIGINT/SIGTERM/SIGHUP blocked (a second Ctrl-C cannot leave half a chain
# behind), and Ctrl-C belongs to an interactive child while it owns the terminal. Only the main
# thread touches signal dispositions; elsewhere these are no-ops.
from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: unwinds like Ctrl-C so every `with`/`finally` tears down."""


# --- signals -------------------------------------------------------------------------------------


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signal.Signals(signum).name)


@contextlib.contextmanager
def signals_unwind() -> Iterator[None]:
    """SIGTERM and SIGHUP raise Terminated (a KeyboardInterrupt) in the main thread while inside."""
    if not _is_main_thread():
        yield
        return
    old = {s: signal.signal(s, _raise_terminated) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Hold off SIGINT/SIGTERM/SIGHUP (delivered after) while a teardown runs."""
    if not _is_main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """While an interactive child (psql) owns the terminal, Ctrl-C is its business, not ours."""
    if not _is_main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
