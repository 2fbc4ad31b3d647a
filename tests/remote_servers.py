"""Real remote-store servers on loopback for tests and benchmarks: moto's standalone S3 server,
Debian's OpenSSH sshd (a generated host key and user key, sftp via internal-sftp), and the
project's delaying proxy (scripts/delayproxy.py). Each is a context manager that leaves nothing
running behind it."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port}")


@contextlib.contextmanager
def _process(argv: list[str], port: int, what: str, **kw) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, **kw)
    try:
        _wait_port(port, proc, what)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class S3Server:
    port: int
    access_key: str = "kloset-test"
    secret_key: str = "kloset-test-secret"

    def config(self, path: Path, port: int | None = None, **extra: str) -> Path:
        """A --store-config file for this server (or a proxy in front of it at `port`)."""
        lines = {
            "access_key": self.access_key,
            "secret_access_key": self.secret_key,
            "use_tls": "false",
            "timeout": "10",
            **extra,
        }
        path.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
        return path

    def location(self, bucket: str, prefix: str = "", port: int | None = None) -> str:
        return f"s3://127.0.0.1:{port or self.port}/{bucket}" + (f"/{prefix}" if prefix else "")

    def client(self):  # type: ignore[no-untyped-def]
        from minio import Minio

        return Minio(
            f"127.0.0.1:{self.port}", self.access_key, self.secret_key, secure=False, region="us-east-1"
        )

    def put_tree(self, root: Path, bucket: str, prefix: str = "") -> None:
        """Copy a store directory into the bucket, keys as plakar lays them out."""
        client = self.client()
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)
        for path in sorted(root.rglob("*")):
            if path.is_file():
                key = (prefix + "/" if prefix else "") + str(path.relative_to(root))
                client.fput_object(bucket, key, str(path))

    def listing(self, bucket: str) -> list[tuple[str, str, int]]:
        """(key, etag, size) of every object: to show that nothing was written."""
        objs = self.client().list_objects(bucket, recursive=True)
        return sorted((o.object_name, o.etag, o.size) for o in objs)


# moto under waitress, ranged GETs reading only their range: see tests/moto_serve.py.
_MOTO = REPO / "tests" / "moto_serve.py"


# With auth=True moto checks every request's SigV4 signature (botocore's signer recomputes it)
# and the key's IAM policy, after its first INITIAL_NO_AUTH_ACTION_COUNT requests: those create
# the IAM user, its allow-all policy and its access key, the only key the server then accepts.
_IAM_SETUP_REQUESTS = 3


@contextlib.contextmanager
def moto_server(auth: bool = False) -> Iterator[S3Server]:
    port = free_port()
    argv = [sys.executable, str(_MOTO), str(port)]
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(_IAM_SETUP_REQUESTS)} if auth else None
    with _process(argv, port, "moto_server", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env):
        yield _iam_user(port) if auth else S3Server(port)


def _iam_user(port: int) -> S3Server:
    import json

    import boto3

    iam = boto3.client(
        "iam",
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name="us-east-1",
        aws_access_key_id="setup",
        aws_secret_access_key="setup",
    )
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    iam.create_user(UserName="kloset")
    iam.put_user_policy(UserName="kloset", PolicyName="all", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="kloset")["AccessKey"]
    return S3Server(port, key["AccessKeyId"], key["SecretAccessKey"])


@dataclass
class SshServer:
    port: int
    dir: Path
    user: str
    identity: Path
    known_hosts: Path
    host_pub: str
    sftp_log: Path | None = None  # sftp-server's log of every request (count_requests=True)

    def config(self, path: Path, **extra: str) -> Path:
        lines = {
            "identity": str(self.identity),
            "known_hosts": str(self.known_hosts),
            "timeout": "10",
            **extra,
        }
        path.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
        return path

    def location(self, path: Path, port: int | None = None) -> str:
        return f"sftp://{self.user}@127.0.0.1:{port or self.port}{path}"

    def known_hosts_for(self, port: int) -> Path:
        """A known_hosts file naming this server's key at another port (a proxy in front of it)."""
        out = self.dir / f"known_hosts.{port}"
        out.write_text(f"[127.0.0.1]:{port} {self.host_pub}\n")
        return out

    def sftp_requests(self) -> dict[str, int]:
        """The SFTP requests served so far (reads of at most 32 KiB, opens, stats...) and the ranges
        read (runs of contiguous reads of one file: about one ranged read of a client each)."""
        assert self.sftp_log is not None, "sshd_server(count_requests=True)"
        reads = others = ranges = 0
        ends: dict[str, int] = {}
        text = self.sftp_log.read_text(errors="replace") if self.sftp_log.exists() else ""
        for line in text.splitlines():
            m = _SFTP_READ.search(line)
            if m:
                reads += 1
                path, off, n = m.group(1), int(m.group(2)), int(m.group(3))
                ranges += ends.get(path) != off
                ends[path] = off + n
            elif _SFTP_OTHER.search(line):
                others += 1
        return {"requests": reads + others, "reads": reads, "ranges": ranges}


# sftp-server -l DEBUG1: `debug1: request 7: read "PATH" (handle 0) off 0 len 32768`, other requests
# as `request N: VERB` or (open, opendir, close) `VERB "PATH" ...`; replies as `request N: sent ...`.
_SFTP_READ = re.compile(r'request \d+: read "(.*)" \(handle \d+\) off (\d+) len (\d+)$')
_SFTP_OTHER = re.compile(r'request \d+: (?!read |sent )\w+|^(open|opendir|close) "')


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().strip()


def _logging_sftp_server(d: Path, log: Path) -> str:
    """A subsystem command: OpenSSH's own sftp-server logging every request (`-l DEBUG1`: one line
    per open, read, stat...) to `log`, for counting the requests a client sends."""
    wrapper = d / "sftp-logged"
    wrapper.write_text(f"#!/bin/sh\nexec /usr/lib/openssh/sftp-server -e -l DEBUG1 2>>'{log}'\n")
    os.chmod(wrapper, 0o755)
    return str(wrapper)


@contextlib.contextmanager
def sshd_server(base: Path, count_requests: bool = False) -> Iterator[SshServer]:
    """OpenSSH's sshd on a loopback port, accepting only a generated user key for the current
    user; its sftp is internal-sftp, or with `count_requests` the sftp-server program (the same
    OpenSSH code, a process per session) logging each request for SshServer.sftp_requests."""
    import getpass

    d = base / "sshd"
    d.mkdir(parents=True)
    sftp_log = d / "sftp-server.log" if count_requests else None
    subsystem = _logging_sftp_server(d, sftp_log) if sftp_log else "internal-sftp"
    host_pub = _keygen(d / "host_ed25519")
    user_pub = _keygen(d / "user_ed25519")
    (d / "authorized_keys").write_text(user_pub + "\n")
    os.chmod(d / "authorized_keys", 0o600)
    port = free_port()
    user = getpass.getuser()
    cfg = d / "sshd_config"
    cfg.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_ed25519'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile {d / 'sshd.pid'}\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        "PermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\nMaxSessions 64\nMaxStartups 64\n"
        f"Subsystem sftp {subsystem}\nLogLevel ERROR\n"
        # sshd starts the sftp-server program through the user's login shell, and bash sources
        # ~/.bashrc when sshd runs it: this machine's root runs `pyenv init` there (0.2 s a
        # session). A session's home is this directory, with no rc file, as a backup account's is.
        f"SetEnv HOME={d}\n"
    )
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    known = d / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {' '.join(host_pub.split()[:2])}\n")
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    with _process([sshd, "-D", "-e", "-f", str(cfg)], port, "sshd", stderr=subprocess.DEVNULL):
        yield SshServer(port, d, user, d / "user_ed25519", known, " ".join(host_pub.split()[:2]), sftp_log)


@dataclass
class DelayProxy:
    port: int
    stats_file: Path
    proc: subprocess.Popen | None = None

    def stats(self) -> dict[str, int]:
        """The counters so far (asks a running proxy to write them) or at its exit."""
        import json
        import signal

        if self.proc is not None and self.proc.poll() is None:
            before = self.stats_file.stat().st_mtime_ns if self.stats_file.exists() else 0
            self.proc.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if self.stats_file.exists() and self.stats_file.stat().st_mtime_ns != before:
                    break
                time.sleep(0.01)
        return json.loads(self.stats_file.read_text())


@contextlib.contextmanager
def delay_proxy(
    target_port: int, base: Path, delay_ms: float = 25, rate_mbit: float = 200
) -> Iterator[DelayProxy]:
    port = free_port()
    stats = base / f"proxy-{port}.json"
    argv = [
        sys.executable,
        str(REPO / "scripts" / "delayproxy.py"),
        "--listen",
        f"127.0.0.1:{port}",
        "--target",
        f"127.0.0.1:{target_port}",
        "--delay-ms",
        str(delay_ms),
        "--rate-mbit",
        str(rate_mbit),
        "--stats",
        str(stats),
    ]
    with _process(argv, port, "delayproxy", stdout=subprocess.DEVNULL) as proc:
        proxy = DelayProxy(port, stats, proc)
        deadline = time.monotonic() + 5
        while proxy.stats()["connections"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)  # the readiness probe is counted before anything else
        yield proxy
