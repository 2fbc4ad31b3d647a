# What a chain's qcow2 overlay reads through: its *backing*, brought up in the chain's "serve" phase.
#
# A Backing is an object with one method, start(run, timeout) -> the backing qemu-img opens (an NBD
# URI or a file path). What it starts is recorded in the run directory at once, so the teardown (in
# this process or in `kloset-blocks down`) stops it; the teardown step for what it records is
# registered here, by the layer that owns it (host.teardown.register_teardown). Kinds:
# - NbdkitBacking: its own nbdkit (given argv and environment changes), on a Unix socket of the
#   run directory.
# - SharedExport: one export of an nbdkit that something else runs (a StandaloneServer: `query`
#   serves every snapshot from one nbdkit and one chunk cache); nothing to start or stop.
# - kloset_blocks.fuse.chain.ExposedImage: the image file `kloset-blocks expose` makes.
#
# Invariants: nbdkit listens only on a Unix socket (0600, in a 0700 directory) and is always given
# -r: nothing in a chain can write the backing. It runs in its own session with stdin on /dev/null,
# so a closing terminal (SIGHUP) cannot stop it under a mounted filesystem (references §3.4).
from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from kloset_blocks.host.procs import child_pids, proc_record, spawn, stop_process
from kloset_blocks.host.progress import Progress
from kloset_blocks.host.rundir import RunDir
from kloset_blocks.host.teardown import BACKING, Teardown, register_teardown, teardown_run_dir
from kloset_blocks.host.tools import AttachError, exit_cause

NBD_SOCKET = "nbd.sock"
# In an nbdkit argv, this token stands for the run directory (made only when the chain comes up):
# the plugin's stats=FILE lives there, and is read back at teardown after nbdkit has written it.
RUN_DIR_TOKEN = "{run_dir}"

Environment = Mapping[str, str | None]  # changes to this process's environment; None unsets


class Backing(Protocol):
    def start(self, run: RunDir, timeout: float) -> str:
        """Bring the backing up (recording what it starts in `run`); the name qemu-img opens."""
        ...


def nbd_uri(sock: Path, export: str = "") -> str:
    return f"nbd+unix:///{export}?socket={sock}"


class NbdkitBacking:
    """An nbdkit of the chain's own: `argv` (with RUN_DIR_TOKEN) and its environment changes."""

    def __init__(self, argv: Sequence[str], env: Environment | None = None) -> None:
        self.argv = list(argv)
        self.env = dict(env or {})
        self.socket: Path | None = None

    def __repr__(self) -> str:  # the environment may hold the store's key: never shown
        return f"NbdkitBacking({self.argv!r})"

    def start(self, run: RunDir, timeout: float) -> str:
        sock = run.private_dir("nbd") / NBD_SOCKET
        log_path = run.path / "nbdkit.log"
        argv = nbdkit_command([a.replace(RUN_DIR_TOKEN, str(run.path)) for a in self.argv], sock)
        run.record(socket=str(sock), nbdkit_log=str(log_path))
        # In the foreground nbdkit sets PR_SET_PDEATHSIG (measured on Debian's 1.32.5, with or
        # without --exit-with-parent): it gets SIGTERM when its parent exits. So its parent is a
        # keeper that lives exactly as long as it does, `setsid -w`, never this (short-lived) CLI.
        keeper = spawn(["setsid", "-w", *argv], log_path, "nbdkit", env=self.env)
        run.record(nbdkit_keeper=proc_record(keeper.pid))
        deadline = time.monotonic() + timeout
        nbdkit_pid = None
        while True:
            if keeper.poll() is not None:
                cause = exit_cause(keeper.returncode, log_path, "nbdkit")
                raise AttachError(f"serve: nbdkit exited: {cause}")
            if nbdkit_pid is None and (kids := child_pids(keeper.pid)):
                nbdkit_pid = kids[0]
                run.record(nbdkit=proc_record(nbdkit_pid))
            if nbdkit_pid is not None and sock.exists() and probe_nbd(sock):
                break
            if time.monotonic() > deadline:
                raise AttachError(f"serve: nbdkit did not accept on its socket within {timeout:.0f} s")
            time.sleep(0.005)
        os.chmod(sock, 0o600)
        self.socket = sock
        return nbd_uri(sock)


class SharedExport:
    """One export (named by the full snapshot id) of an nbdkit that someone else runs."""

    def __init__(self, socket: Path, export: str) -> None:
        self.socket = socket
        self.export = export

    def start(self, run: RunDir, timeout: float) -> str:
        # Nothing to start: the export is served already. Recorded for the curious only; teardown
        # stops nothing it did not start.
        run.record(shared_socket=str(self.socket), export=self.export)
        return nbd_uri(self.socket, self.export)


class StandaloneServer:
    """A backing brought up alone in a run directory of its own (recorded there, so `kloset-blocks
    down` stops it too): the shared nbdkit of `query`, whose exports SharedExport chains use."""

    def __init__(self, backing: NbdkitBacking, run_root: Path | str | None = None, timeout: float = 30.0):
        self.backing = backing
        self.run_root = run_root
        self.timeout = timeout
        self.run: RunDir | None = None

    @property
    def socket(self) -> Path:
        assert self.backing.socket is not None, "StandaloneServer.up() first"
        return self.backing.socket

    def up(self) -> StandaloneServer:
        self.run = RunDir.create(self.run_root)
        try:
            self.backing.start(self.run, self.timeout)
        except BaseException:
            self.teardown()
            raise
        return self

    def teardown(self) -> list[str]:
        return [] if self.run is None else teardown_run_dir(self.run.path, Progress(quiet=True))


def nbdkit_command(argv: Sequence[str], sock: Path) -> list[str]:
    """Insert foreground (-f: the pid we hold is nbdkit's), read-only and the socket after argv[0]."""
    if not argv:
        raise AttachError("empty nbdkit command")
    extra = ["-U", str(sock)]
    for flag in ("-r", "-f"):
        if flag not in argv:
            extra.insert(0, flag)
    return [argv[0], *extra, *argv[1:]]


def probe_nbd(sock: Path) -> bool:
    """True when nbdkit completes the start of a fixed-newstyle handshake. We then send NBD_OPT_ABORT
    so that nbdkit logs no error (a bare connect-and-close makes it log "Connection reset by peer")."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2.0)
    try:
        s.connect(str(sock))
        greeting = b""
        while len(greeting) < 18:
            chunk = s.recv(18 - len(greeting))
            if not chunk:
                return False
            greeting += chunk
        if greeting[:16] != b"NBDMAGICIHAVEOPT":
            return False
        # client flags: FIXED_NEWSTYLE | NO_ZEROES; then option NBD_OPT_ABORT (2), no data.
        s.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 2, 0))
        with contextlib.suppress(OSError):
            s.recv(32)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _stop_nbdkit(t: Teardown) -> None:
    stop_process(t.state.get("nbdkit"))
    stop_process(t.state.get("nbdkit_keeper"))  # exits with its child; a signal if it has not yet


register_teardown(BACKING, "nbdkit", _stop_nbdkit)
