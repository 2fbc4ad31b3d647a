# PostgreSQL on a mounted snapshot: find the data directory, start the right server on it, query it.
#
# Strategy: the data directory is the directory holding PG_VERSION (`/` for pg_basebackup tar
# backups, `/data` for plakar's postgres importer); its major version picks the Debian server
# binaries in /usr/lib/postgresql/<major>/bin. The server runs as the `postgres` user (it refuses
# root) via `runuser`, directly as `postgres -D` in its own session, with stdout/stderr on a log in a
# private 0700 directory of the run directory that also holds its Unix socket. We know it is up from
# postmaster.pid's status line ("ready"), polled every 10 ms: finer than pg_ctl -w's 100 ms.
#
# Invariants:
# - No TCP: listen_addresses='' and a private socket directory; so the port only names the socket
#   file and cannot clash with another server (the default 5432 is kept for habit).
# - The origin's settings that would act outside this host are overridden: archive_mode=off (never
#   push WAL into the origin's archive), ssl=off, our own pg_hba.conf (local trust: only the postgres
#   user and root can reach the 0700 socket directory), logging to our log file.
# - Every change to the data directory (ownership, stale postmaster.pid, standby.signal) lands in the
#   overlay, never in the store.
from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from kloset_blocks.errors import PgError
from kloset_blocks.host.procs import proc_alive, proc_record, stop_process, wait_gone
from kloset_blocks.host.progress import Progress
from kloset_blocks.host.rundir import RunDir
from kloset_blocks.host.teardown import USERS, Teardown, register_teardown
from kloset_blocks.postgres.datadir import (
    PG_USER,
    Cluster,
    ensure_traversable,
    fix_ownership,
    locate,
    pg_ids,
    prepare_datadir,
)
from kloset_blocks.store.passphrase import PASSPHRASE_ENV

DEFAULT_PORT = 5432


NO_WAL_PATTERNS = (
    "could not locate required checkpoint record",
    "could not locate a valid checkpoint record",
    "could not find redo location referenced by checkpoint record",
    "could not find required checkpoint record",
)


class NoWalError(PgError):
    """The backup lacks the WAL needed to reach consistency (taken with pg_basebackup -X none)."""


class Server:
    """One postmaster on a mounted data directory, recorded in the run directory's state."""

    def __init__(
        self,
        run: RunDir,
        cluster: Cluster,
        *,
        read_only: bool = False,
        port: int = DEFAULT_PORT,
        timeout: float = 600.0,
        progress: Progress | None = None,
        settings: Sequence[str] = (),
    ) -> None:
        self.run = run
        self.cluster = cluster
        self.read_only = read_only
        self.port = port
        self.timeout = timeout
        self.progress = progress or Progress(quiet=True)
        self.settings = list(settings)
        self.uid, self.gid = pg_ids()
        self.dir = run.private_dir("pg", self.uid, self.gid)  # socket, config files
        self.log = self.dir / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def sockdir(self) -> Path:
        return self.dir

    def start(self) -> None:
        t0 = time.monotonic()
        self._write_config()
        self.run.record(
            postgres={
                "datadir": str(self.cluster.datadir),
                "bindir": str(self.cluster.bindir),
                "sockdir": str(self.dir),
                "port": self.port,
                "log": str(self.log),
            }
        )
        fd = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self.proc = subprocess.Popen(
                ["runuser", "-u", PG_USER, "--", str(self.cluster.bindir / "postgres"), *self._options()],
                stdin=subprocess.DEVNULL,
                stdout=fd,
                stderr=fd,
                start_new_session=True,
                cwd=self.dir,
                env=child_env(),
            )
        finally:
            os.close(fd)
        self._record(runuser=proc_record(self.proc.pid))
        self._wait_ready(t0)

    def _options(self) -> list[str]:
        c = self.cluster
        opts = ["-D", str(c.datadir), "-p", str(self.port), "-k", str(self.dir)]
        settings = [
            "listen_addresses=",
            f"hba_file={self.dir / 'pg_hba.conf'}",
            f"ident_file={self.dir / 'pg_ident.conf'}",
            "archive_mode=off",
            "ssl=off",
            "logging_collector=off",
            "log_destination=stderr",
        ]
        if not (c.datadir / "postgresql.conf").exists():
            # Debian clusters keep it in /etc/postgresql: the backup has none.
            settings.append(f"config_file={self.dir / 'postgresql.conf'}")
        if self.read_only:
            settings.append("default_transaction_read_only=on")
        settings += self.settings
        for s in settings:
            opts += ["-c", s]
        return opts

    def _write_config(self) -> None:
        files = {
            "pg_hba.conf": "# kloset-blocks: only the postgres user and root reach this socket directory\n"
            "local all all trust\n",
            "pg_ident.conf": "",
            "postgresql.conf": "",
        }
        for name, text in files.items():
            p = self.dir / name
            p.write_text(text)
            os.chown(p, self.uid, self.gid)
            os.chmod(p, 0o600)

    def _record(self, **fields: object) -> None:
        rec = dict(self.run.state.get("postgres", {}))
        rec.update(fields)
        self.run.record(postgres=rec)

    def _wait_ready(self, t0: float) -> None:
        assert self.proc is not None
        pidfile = self.cluster.datadir / "postmaster.pid"
        deadline = time.monotonic() + self.timeout
        started = False
        while True:
            lines = _read_lines(pidfile)
            if lines and not started and lines[0].isdigit():
                self._record(postmaster=proc_record(int(lines[0])))
                self.progress.done("start", time.monotonic() - t0)
                started, t1 = True, time.monotonic()
            if len(lines) >= 8 and lines[7].strip() == "ready":
                self.progress.done("recovery", time.monotonic() - t1)
                return
            if self.proc.poll() is not None:
                raise self._start_failure()
            if time.monotonic() > deadline:
                raise PgError(f"postgres not ready within {self.timeout:.0f} s (log: {self.log})")
            time.sleep(0.01)

    def _start_failure(self) -> PgError:
        text = _read_text(self.log)
        for pat in NO_WAL_PATTERNS:
            if pat in text:
                return NoWalError(
                    f"the backup has no WAL to recover from ({pat}): take it with "
                    "`pg_basebackup -X fetch` (or -X stream), not -X none"
                )
        return PgError(f"postgres failed to start: {relevant_lines(text)}")

    def stop(self) -> None:
        stop_recorded(self.run)
        if self.proc is not None:
            with contextlib.suppress(Exception):
                self.proc.wait(timeout=5)

    def psql_argv(self, args: Sequence[str] = ()) -> list[str]:
        psql = self.cluster.bindir / "psql"
        exe = str(psql) if psql.exists() else "psql"
        return ["runuser", "-u", PG_USER, "--", exe, "-h", str(self.dir), "-p", str(self.port), *args]

    def psql(self, args: Sequence[str] = ()) -> int:
        """Interactive or scripted psql on the terminal; returns its exit status. If we are told to
        stop (SIGTERM/SIGHUP raise in our main thread), psql gets SIGTERM (runuser passes it on)."""
        proc = subprocess.Popen(self.psql_argv(args), cwd="/", env=child_env())
        try:
            return proc.wait()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise

    def query(self, sql: str, db: str = "postgres", timeout: float = 60.0) -> str:
        """Unaligned, tuples-only output of one statement (for tests and scripts)."""
        argv = self.psql_argv(["-XAtq", "-v", "ON_ERROR_STOP=1", "-d", db, "-c", sql])
        try:
            p = subprocess.run(
                argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, cwd="/"
            )
        except subprocess.TimeoutExpired as e:
            raise PgError(f"query did not finish within {timeout:.0f} s") from e
        if p.returncode != 0:
            raise PgError(f"query failed: {relevant_lines(p.stderr) or f'psql exited {p.returncode}'}")
        return p.stdout.rstrip("\n")

    def connect_hint(self) -> str:
        return f"psql -h {shlex.quote(str(self.dir))} -p {self.port} -U {PG_USER}"


def start_server(
    run: RunDir,
    mount_root: Path,
    *,
    read_only: bool = False,
    progress: Progress | None = None,
    settings: Sequence[str] = (),
) -> Server:
    """Find the data directory on the mounted snapshot, make it ready (owner, traversal, stale
    files: all in the overlay), and start its major's server on it; ready when this returns."""
    progress = progress or Progress(quiet=True)
    with progress.phase("prepare"):
        cluster = locate(mount_root)
        uid, gid = pg_ids()
        ensure_traversable(mount_root, cluster.datadir, uid)
        changed = fix_ownership(cluster.datadir, uid, gid)
        prepare_datadir(cluster.datadir, progress)
    if changed:
        progress.say(f"gave {changed} inode(s) to the postgres user (in the overlay)")
    server = Server(run, cluster, read_only=read_only, progress=progress, settings=settings)
    server.start()
    return server


def stop_recorded(run: RunDir, timeout: float = 60.0) -> None:
    """Stop the server recorded in run's state: `pg_ctl stop -m fast`, then SIGQUIT, then SIGKILL."""
    rec = run.state.get("postgres")
    if not rec:
        return
    post = rec.get("postmaster")
    if proc_alive(post):
        pg_ctl = Path(rec["bindir"]) / "pg_ctl"
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            subprocess.run(
                ["runuser", "-u", PG_USER, "--", str(pg_ctl), "stop", "-D", rec["datadir"], "-m", "fast",
                 "-w", "-t", str(int(timeout)), "-s"],
                capture_output=True, stdin=subprocess.DEVNULL, timeout=timeout + 5, cwd="/",
            )  # fmt: skip
        if not wait_gone(post, 1.0):
            stop_process(post, sig=signal.SIGQUIT, timeout=10.0)  # immediate shutdown
    # Children of a killed postmaster notice on their own; runuser exits with it.
    stop_process(rec.get("runuser"), timeout=5.0)
    run.forget("postgres")


def _stop_for_teardown(t: Teardown) -> None:
    if "postgres" in t.state:
        # A backing that died (nbdkit killed, qemu-storage-daemon gone) fails every read: a clean
        # shutdown would wait out its whole timeout on a checkpoint that cannot be written.
        dead = [k for k in ("nbdkit", "qsd") if k in t.state and k not in t.alive_at_start]
        stop_recorded(t.run, timeout=2.0 if dead else 60.0)


register_teardown(USERS, "postgres", _stop_for_teardown)


def child_env() -> dict[str, str]:
    """Our environment minus the store's passphrase: the server and psql have no use for it."""
    return {k: v for k, v in os.environ.items() if k != PASSPHRASE_ENV}


def relevant_lines(text: str, n: int = 3) -> str:
    """The last few FATAL/PANIC/ERROR lines of a server log (else its last lines), on one line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    hits = [ln for ln in lines if re.search(r"\b(FATAL|PANIC|ERROR|error)\b", ln)]
    return " / ".join((hits or lines)[-n:])


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return []


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
