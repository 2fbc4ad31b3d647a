# `kloset-blocks ui STORE`: the viewer, a local web page over kloset_blocks.web.
#
# The store is opened here (a passphrase from --passphrase-file, $PLAKAR_PASSPHRASE or a prompt:
# never from a URL), the socket is bound before anything is printed, and the first line on stdout
# is the URL with the one-time token. uvicorn runs in the main thread and turns Ctrl-C and SIGTERM
# (SIGHUP here too) into a graceful stop; then every chain the page opened is torn down, and the
# exit status is 0.
from __future__ import annotations

import argparse
import re
import signal
import socket
from typing import Any

from kloset_blocks.errors import UsageError
from kloset_blocks.host.progress import Progress

DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)?")
UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str) -> float:
    """`10m`, `30s`, `1h`, `250ms`, or plain seconds."""
    m = DURATION.fullmatch(text.strip())
    if not m:
        raise UsageError(f"bad duration {text!r} (use e.g. 30s, 10m, 1h)")
    return float(m.group(1)) * UNIT_SECONDS[m.group(2)]


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(64)
    sock.set_inheritable(True)
    return sock


def cmd_ui(args: argparse.Namespace) -> int:
    import uvicorn

    from kloset_blocks.app.query import opened_store
    from kloset_blocks.app.warden import Warden
    from kloset_blocks.commands.run import require_root
    from kloset_blocks.host.rundir import run_root
    from kloset_blocks.web.app import Guard, create_app
    from kloset_blocks.web.sessions import Sessions

    require_root()
    idle, timeout = parse_duration(args.idle), parse_duration(args.timeout)
    export_timeout = parse_duration(args.export_timeout)
    if args.max_open < 1 or args.row_cap < 1:
        raise UsageError("--max-open and --row-cap must be at least 1")
    progress = Progress(args.quiet)
    # The warden tears down the page's chains if this process is killed outright (kill -9).
    with opened_store(args.store, args.passphrase_file) as store, Warden(run_root()):
        sock = bind(args.bind, args.port)
        guard = Guard(args.bind, sock.getsockname()[1])
        sessions = Sessions(args.store, store, idle=idle, max_open=args.max_open)
        app = None
        try:
            app = create_app(
                sessions, guard, timeout=timeout, export_timeout=export_timeout, cap=args.row_cap
            )
            config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, access_log=False)
            server = uvicorn.Server(config)
            if args.bind not in ("127.0.0.1", "localhost", "::1"):
                progress.say(f"warning: listening on {args.bind}, not only on loopback")
            print(guard.first_url, flush=True)
            progress.say("open the URL above in a browser (it works once); Ctrl-C to stop")
            stop = _StopOnSignal(server)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, stop)
            server.run(sockets=[sock])  # handles SIGINT/SIGTERM itself, then hands them to `stop`
        finally:
            for job in list(app.state.jobs.values()) if app is not None else []:
                job.cancel()
                job.thread.join(60)
            sessions.close_all()
            sock.close()
    progress.say("ui: stopped; every chain torn down")
    return 0


class _StopOnSignal:
    """Our handler for the stop signals: uvicorn replays the signals it caught to the handlers it
    found when it exits, so this one must not kill the process (the teardown comes after). SIGHUP,
    which uvicorn leaves alone, stops the server too."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def __call__(self, signum: int, frame: object) -> None:
        self.server.should_exit = True


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ui",
        help="a local web page: browse and query every backup in the store, nothing restored",
        description="Serve a page on loopback to open snapshots, browse tables, run SQL, compare "
        "backups and take rows back. The first line on stdout is the URL with a one-time token.",
    )
    p.add_argument("store", metavar="STORE", help="Kloset store, e.g. fs:/var/backups")
    p.add_argument("--bind", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    p.add_argument("--idle", default="10m", help="close a snapshot unused for this long (default: 10m)")
    p.add_argument("--max-open", type=int, default=3, help="snapshots open at once (default: 3)")
    p.add_argument("--timeout", default="30s", help="statement_timeout of each statement (default: 30s)")
    p.add_argument(
        "--export-timeout", default="10m", help="statement_timeout of an export, CSV or JSON (default: 10m)"
    )
    p.add_argument("--row-cap", type=int, default=1000, help="rows a result shows (default: 1000)")
    p.add_argument(
        "--passphrase-file",
        metavar="FILE",
        help="passphrase of an encrypted store (else $PLAKAR_PASSPHRASE, else a prompt)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="nothing on stderr but errors")
    p.set_defaults(handler=cmd_ui)
