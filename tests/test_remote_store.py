"""Remote stores against real servers on loopback: moto's S3 server and OpenSSH's sshd. Every answer
over S3 and SFTP must equal the one over fs (Kloset's own fixture stores, copied into the bucket or
the remote directory), the bucket and directory must be unchanged by every command but mkstore, and
every failure (wrong key, missing bucket, unreachable host, unknown or changed host key) is one line
and exit 1."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kloset_blocks.errors import StoreError
from kloset_blocks.pgdata import find_pgdata
from kloset_blocks.store import open_store
from kloset_blocks.store.options import CONFIG_ENV
from tests.conftest import server_for
from tests.remote_servers import S3Server, SshServer, free_port

PASS = "correct horse battery staple"
FIXTURES = ["golden-plain", "golden-enc"]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("remote")


@pytest.fixture(scope="module")
def remotes(s3: S3Server, ssh: SshServer, fixtures_dir: Path, base: Path) -> dict[str, tuple[str, Path]]:
    """(location, store-config file) of each fixture on each backend: remote name -> ..."""
    out = {}
    for name in FIXTURES:
        s3.put_tree(fixtures_dir / name, "fixtures", name)
        out[f"s3-{name}"] = (s3.location("fixtures", name), s3.config(base / "s3.conf"))
        shutil.copytree(fixtures_dir / name, base / "sftp" / name)
        out[f"sftp-{name}"] = (ssh.location(base / "sftp" / name), ssh.config(base / "sftp.conf"))
    return out


def _with_config(monkeypatch: pytest.MonkeyPatch, config: Path) -> None:
    monkeypatch.setenv(CONFIG_ENV, str(config))
    monkeypatch.setenv("PLAKAR_PASSPHRASE", PASS)


def _tree(location: str) -> dict[str, object]:
    """Every snapshot's every entry (mode, size, mtime, owner, link) and file content, as the
    sha256 of each of its chunks (each distinct chunk fetched once, in parallel: the snapshots
    share most of them)."""
    out: dict[str, object] = {}
    with open_store(location, PASS) as st:
        files: dict[str, list[bytes]] = {}
        for info in st.snapshots():
            snap = st.open_snapshot(info.hex_id)
            for path, entry in snap.walk(b"/"):
                key = f"{info.hex_id}:{os.fsdecode(path)}"
                out[key] = (
                    entry.st_mode,
                    entry.size,
                    entry.mtime_ns,
                    entry.uid,
                    entry.gid,
                    entry.symlink_target,
                )
                if entry.is_reg and entry.size:
                    files[key] = snap.open_file(path).macs
        distinct = sorted({m for macs in files.values() for m in macs})
        digests = dict(
            zip(
                distinct,
                st.executor.map(lambda m: hashlib.sha256(st.read_chunk(m)).hexdigest(), distinct),
                strict=False,
            )
        )
        for key, macs in files.items():
            out[key + "#content"] = [digests[m] for m in macs]
    return out


@pytest.mark.parametrize("backend", ["s3", "sftp"])
@pytest.mark.parametrize("fixture", FIXTURES)
def test_same_answers_as_fs(
    backend: str,
    fixture: str,
    remotes: dict[str, tuple[str, Path]],
    fixtures_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    location, config = remotes[f"{backend}-{fixture}"]
    _with_config(monkeypatch, config)
    remote = _tree(location)
    assert remote == _tree(str(fixtures_dir / fixture))
    assert len(remote) > 1300  # every path of the pg cluster, not an empty walk


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kloset_blocks", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def _snapshot_of_bucket(s3: S3Server, ssh_dir: Path) -> tuple[object, object]:
    files = sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in ssh_dir.rglob("*"))
    return s3.listing("fixtures"), files


@pytest.mark.parametrize("backend", ["s3", "sftp"])
def test_cli_over_remote_equals_fs(
    backend: str,
    remotes: dict[str, tuple[str, Path]],
    fixtures_dir: Path,
    s3: S3Server,
    base: Path,
    tmp_path: Path,
) -> None:
    location, config = remotes[f"{backend}-golden-plain"]
    before = _snapshot_of_bucket(s3, base / "sftp")
    fs = str(fixtures_dir / "golden-plain")
    for args in (["snapshots"], ["ls", "bf6a:/base", "-l"], ["cat", "3b11:/PG_VERSION"]):
        remote = _cli("--store-config", str(config), args[0], location, *args[1:])
        local = _cli(args[0], fs, *args[1:])
        assert remote.returncode == 0, remote.stderr
        assert remote.stdout == local.stdout and remote.stdout
    trees = []
    for where in (location, fs):  # a whole snapshot: the remote restore reads files ahead, in parallel
        dest = tmp_path / f"restored-{len(trees)}"
        r = _cli("restore", where, "3b11", str(dest), "--store-config", str(config))
        assert r.returncode == 0, r.stderr
        trees.append(_dir_digest(dest))
    assert trees[0] == trees[1] and len(trees[0]) > 1300
    assert _snapshot_of_bucket(s3, base / "sftp") == before  # nothing written to the bucket or directory


def _dir_digest(root: Path) -> dict[str, tuple]:
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_uid, digest)
    return out


def _one_line_failure(r: subprocess.CompletedProcess, needle: str) -> None:
    assert r.returncode == 1, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_s3_errors(s3: S3Server, remotes: dict[str, tuple[str, Path]], tmp_path: Path) -> None:
    # (a wrong key needs a server that checks signatures: tests/test_remote_s3_auth.py)
    location, _ = remotes["s3-golden-plain"]
    good = s3.config(tmp_path / "good.conf")
    _one_line_failure(
        _cli("snapshots", s3.location("no-such-bucket"), "--store-config", str(good)), "no such bucket"
    )
    _one_line_failure(
        _cli("snapshots", s3.location("fixtures", "nothing-here"), "--store-config", str(good)),
        "not a kloset store",
    )
    closed = s3.location("fixtures", "golden-plain", port=free_port())
    quick = s3.config(tmp_path / "quick.conf", retries="1", timeout="2")
    _one_line_failure(_cli("snapshots", closed, "--store-config", str(quick)), "Connection refused")
    env = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}
    _one_line_failure(_cli("snapshots", location, env=env), "no access_key")


def test_sftp_errors(ssh: SshServer, remotes: dict[str, tuple[str, Path]], tmp_path: Path) -> None:
    location, config = remotes["sftp-golden-plain"]
    other = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    wrong = tmp_path / "known_hosts"
    wrong.write_text(
        f"[127.0.0.1]:{ssh.port} {' '.join(other.with_suffix('.pub').read_text().split()[:2])}\n"
    )
    mismatch = ssh.config(tmp_path / "mismatch.conf", known_hosts=str(wrong))
    _one_line_failure(_cli("snapshots", location, "--store-config", str(mismatch)), "host key mismatch")
    unknown = ssh.config(tmp_path / "unknown.conf", known_hosts=str(tmp_path / "empty"))
    (tmp_path / "empty").write_text("")
    _one_line_failure(_cli("snapshots", location, "--store-config", str(unknown)), "unknown host key")
    ignoring = ssh.config(
        tmp_path / "ign.conf", known_hosts=str(tmp_path / "empty"), insecure_ignore_host_key="true"
    )
    assert _cli("snapshots", location, "--store-config", str(ignoring)).returncode == 0
    bad_key = ssh.config(tmp_path / "badkey.conf", identity=str(other))
    _one_line_failure(_cli("snapshots", location, "--store-config", str(bad_key)), "authentication failed")
    _one_line_failure(
        _cli("snapshots", ssh.location(tmp_path / "absent"), "--store-config", str(config)), "store not found"
    )
    closed = ssh.location(tmp_path, port=free_port())
    _one_line_failure(_cli("snapshots", closed, "--store-config", str(config)), "cannot connect")


@pytest.mark.parametrize("backend", ["s3", "sftp"])
def test_mkstore_writes_a_remote_store(
    backend: str, s3: S3Server, ssh: SshServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mkstore creates the store, then adds a second snapshot to it (only new blobs uploaded)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(os.urandom(300_000))
    if backend == "s3":
        location, config = s3.location("made", "x"), s3.config(tmp_path / "c.conf")
    else:
        location, config = ssh.location(tmp_path / "made" / "x"), ssh.config(tmp_path / "c.conf")
    first = _cli("mkstore", location, "--from-dir", str(src), "--plaintext", "--store-config", str(config))
    assert first.returncode == 0, first.stderr
    (src / "b.txt").write_bytes(b"second\n")
    second = _cli("mkstore", location, "--from-dir", str(src), "--store-config", str(config))
    assert second.returncode == 0, second.stderr
    monkeypatch.setenv(CONFIG_ENV, str(config))
    with open_store(location) as st:
        ids = [i.hex_id for i in st.snapshots()]
        assert ids == [first.stdout.strip(), second.stdout.strip()]
        snap = st.open_snapshot(ids[1])
        assert snap.open_file(b"/a.txt").read(0, 300_000) == (src / "a.txt").read_bytes()
        assert snap.open_file(b"/b.txt").read(0, 7) == b"second\n"


def test_store_config_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.conf"
    bad.write_text("access_key\n")
    _one_line_failure(
        _cli("--store-config", str(bad), "snapshots", "s3://127.0.0.1:1/b"), "expected key=value"
    )
    unknown = tmp_path / "unknown.conf"
    unknown.write_text("acces_key=x\n")
    r = _cli("snapshots", "s3://127.0.0.1:1/b", "--store-config", str(unknown))
    _one_line_failure(r, "unknown option acces_key")
    with pytest.raises(StoreError, match="cannot read store config"):
        from kloset_blocks.store.options import use_config_file

        use_config_file(str(tmp_path / "missing"))


def test_startup_profile_prefetches_what_the_last_start_read(
    remotes: dict[str, tuple[str, Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plugin over S3: the on-disk cache is on by default (XDG cache dir); the chunks the client
    read are recorded at exit, and the next start (here: of the other snapshot) prefetches them."""
    from kloset_blocks.serving.server import Server
    from kloset_blocks.serving.startup import at_positions
    from kloset_blocks.store import codec as c

    location, config = remotes["s3-golden-plain"]
    _with_config(monkeypatch, config)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    def start(snapshot: str) -> Server:
        return server_for(location, "pgdata=true", snapshot=snapshot)

    first = start("bf6afbae")
    assert first.disk is not None and str(first.disk.dir).startswith(str(tmp_path / "kloset-blocks"))
    assert first._startup_macs == []  # nothing recorded yet
    export = first.open("")
    buf = bytearray(4 << 20)
    for offset in range(0, min(export.image.size, 64 << 20), len(buf)):
        first.pread(export, memoryview(buf)[: min(len(buf), export.image.size - offset)], offset)
    first.cleanup()
    first.store.close()
    recorded = first.startup.load()
    assert recorded and all(first.store.index.locations(c.RT_CHUNK, m) for m in recorded)
    # Where those chunks were: placed back in the same snapshot, the places give the same chunks.
    positions = first.startup.load_positions()
    assert positions
    back = at_positions(export.image, positions)
    assert len(back) == len(positions) and set(back) <= set(recorded)

    second = start("3b116f40")
    assert second._startup_macs == recorded
    assert second._startup_positions == positions
    second.open("")
    second.cache.wait_idle()
    assert second.cache.stats.prefetched >= len(recorded) // 2  # some may be cached already
    second.cleanup()
    second.store.close()


# The test server's ranged GETs (tests/moto_serve.py reads only the range) against Python's own
# slicing of the object: (offset, length) as the reader asks, 0 meaning "to the end".
RANGES = [(0, 1), (5, 100), (1 << 20, 4 << 20), (9_000_000 - 10, 0), (9_000_000 - 10, 100), (0, 9_000_000)]


def test_moto_ranged_gets_equal_the_object(s3: S3Server) -> None:
    import io

    from minio.error import S3Error

    data = os.urandom(9_000_000)
    client = s3.client()
    if not client.bucket_exists("ranges"):
        client.make_bucket("ranges")
    client.put_object("ranges", "blob", io.BytesIO(data), len(data))
    for offset, length in RANGES:
        resp = client.get_object("ranges", "blob", offset=offset, length=length or None)
        try:
            body, content_range = resp.read(), resp.headers.get("content-range")
        finally:
            resp.release_conn()
        want = data[offset : offset + length] if length else data[offset:]
        assert body == want, (offset, length)
        assert content_range == f"bytes {offset}-{offset + len(want) - 1}/{len(data)}"
    with pytest.raises(S3Error) as past_the_end:
        client.get_object("ranges", "blob", offset=len(data), length=10)
    assert past_the_end.value.code == "InvalidRange"


def _counted_calls(monkeypatch: pytest.MonkeyPatch, backend_class: type) -> list[str]:
    """Every read, read_range and list call on `backend_class`'s backends, as "NAME KEY" (appended
    to the list returned as they happen)."""
    calls: list[str] = []
    for name in ("read", "read_range", "list"):
        original = getattr(backend_class, name)

        def counted(self, key, *a, _original=original, _name=name):  # type: ignore[no-untyped-def]
            calls.append(f"{_name} {key}")
            return _original(self, key, *a)

        monkeypatch.setattr(backend_class, name, counted)
    return calls


def test_plugin_start_over_s3_warm_reads_only_config_and_the_state_list(
    remotes: dict[str, tuple[str, Path]], fixtures_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cold: the warm-up fetches every file's object at start (reading any file's chunk list then
    costs no request). Warm (the on-disk cache kept): the start asks the server for CONFIG and the
    list of states only, and the same reads return the same bytes as the fs store's, from the disk."""
    from kloset_blocks.serving.nbdkit import VIEW_ENV
    from kloset_blocks.serving.server import Server
    from kloset_blocks.store.backend_s3 import S3Backend

    location, config = remotes["s3-golden-plain"]
    _with_config(monkeypatch, config)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = _counted_calls(monkeypatch, S3Backend)

    def start(store: str) -> tuple[Server, bytes]:
        server = server_for(store, "pgdata=true")
        export = server.open("")
        if server.startup_prefetch is not None:  # the first open's (the WAL recovery begins with)
            server.startup_prefetch.join()
        server.cache.wait_idle()
        files = [r.source for r in export.image.regions if getattr(r.source, "entry", None)]
        before = len(calls)
        assert all(isinstance(f.macs, list) for f in files)  # every chunk list
        assert store.startswith("fs:") or len(calls) == before  # at hand after the warm-up
        buf = bytearray(min(export.image.size, 32 << 20))
        server.pread(export, memoryview(buf), 0)
        server.cleanup()
        server.store.close()
        return server, bytes(buf)

    _, cold = start(location)
    calls.clear()
    _, warm = start(location)
    assert sorted(calls) == ["list states/", "read CONFIG"]
    # Handed what the command that starts it read (Store.view), it asks the server for nothing.
    with open_store(location, cache_dir=str(tmp_path / "kloset-blocks")) as parent:
        view = parent.view()
    calls.clear()
    monkeypatch.setenv(VIEW_ENV, view)
    _, handed = start(location)
    assert calls == []
    monkeypatch.setenv(VIEW_ENV, view.replace(location, location + "-elsewhere"))  # not this store's
    _, ignored = start(location)
    assert sorted(calls) == ["list states/", "read CONFIG"]
    monkeypatch.delenv(VIEW_ENV)
    _, local = start(f"fs:{fixtures_dir / 'golden-plain'}")
    assert cold == warm == handed == ignored == local


@pytest.mark.parametrize(("backend", "mode"), [("s3", "daemon"), ("sftp", "daemon"), ("sftp", "captive")])
def test_a_forking_nbdkit_serves_and_exits(
    backend: str,
    mode: str,
    remotes: dict[str, tuple[str, Path]],
    fixtures_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """nbdkit without -f forks (C's fork: no Python at-fork handler runs) once the plugin is ready,
    and so does a captive nbdkit (-f --run CMD: the server is the child): no thread of ours may be
    alive then (the fetch pool, the on-disk cache's writer, an SSH transport), or the child queues
    work that never runs, or waits for a lock a thread left held. The copy equals the fs store's
    image; SIGTERM ends the daemon, the captive one ends with its command."""
    import signal
    import time

    from kloset_blocks.serving.nbdkit import PLUGIN, nbdkit_argv

    location, config = remotes[f"{backend}-golden-plain"]
    _with_config(monkeypatch, config)
    sock, pidfile, copied = tmp_path / "nbd.sock", tmp_path / "nbdkit.pid", tmp_path / "copy.img"
    argv, extra = nbdkit_argv(location, "bf6afbae", pgdata=True)
    env = {**os.environ, **{k: v for k, v in extra.items() if v is not None}}
    params = [*argv[argv.index(str(PLUGIN)) + 1 :], f"cache-dir={tmp_path / 'cache'}"]
    if mode == "captive":  # twice: the second from the on-disk cache and the store's view, as a command
        # starts it, connecting in the background (the case that hung, that thread's lock held)
        for _ in range(2):
            captive = ["nbdkit", "-f", "-r", "-U", "-", "--run", f'nbdcopy "$uri" {copied}']
            subprocess.run([*captive, "python", str(PLUGIN), *params], check=True, env=env, timeout=60)
            st = open_store(location, cache_dir=str(tmp_path / "cache"))
            view_env = nbdkit_argv(location, "bf6afbae", view=st.view())[1]
            env = {**env, **{k: v for k, v in view_env.items() if v is not None}}
            st.close()
    else:
        subprocess.run(
            ["nbdkit", "-r", "-U", str(sock), "-P", str(pidfile), "python", str(PLUGIN), *params],
            check=True, env=env, timeout=60,
        )  # fmt: skip
        pid = int(pidfile.read_text())
        try:
            subprocess.run(["nbdcopy", f"nbd+unix:///?socket={sock}", str(copied)], check=True, timeout=120)
        finally:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
                time.sleep(0.1)
            assert not os.path.exists(f"/proc/{pid}"), "nbdkit did not exit after SIGTERM"
    oracle = server_for(f"fs:{fixtures_dir / 'golden-plain'}", "pgdata=true")
    expected = tmp_path / "expected.img"
    oracle.exports[oracle.default_export].image.write_sparse(expected)
    oracle.cleanup()
    with open(copied, "rb") as a, open(expected, "rb") as b:
        while block := a.read(1 << 20):
            assert block == b.read(1 << 20)
        assert b.read(1) == b""


def test_sftp_threads_share_one_session_and_a_warm_start_connects_to_nothing(
    fixtures_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counted by OpenSSH's sftp-server (a process, and a "session opened" line, per SFTP channel;
    a line per OPEN): a cold start and a 32 MiB read by the plugin's fetch threads use one channel
    and open each packfile once. Warm (the on-disk cache kept) and handed the command's view, the
    start and the same read make no connection at all, and after nbdkit's fork the connection is
    made in the background. The bytes equal the fs store's."""
    from kloset_blocks.serving.nbdkit import VIEW_ENV
    from tests.remote_servers import sshd_server

    with sshd_server(tmp_path / "srv", count_requests=True) as ssh:
        shutil.copytree(fixtures_dir / "golden-plain", tmp_path / "store")
        location = ssh.location(tmp_path / "store")
        _with_config(monkeypatch, ssh.config(tmp_path / "sftp.conf"))
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        assert ssh.sftp_log is not None

        def log() -> list[str]:
            return ssh.sftp_log.read_text().splitlines() if ssh.sftp_log.exists() else []

        def sessions() -> int:
            return sum("session opened" in line for line in log())

        def read_all(store: str) -> tuple[bytes, object]:
            server = server_for(store, "pgdata=true")
            export = server.open("")
            buf = bytearray(min(export.image.size, 32 << 20))
            server.pread(export, memoryview(buf), 0)
            server.settle()
            return bytes(buf), server

        cold, server = read_all(location)
        server.cleanup()
        server.store.close()
        opens = [line.split('"')[1] for line in log() if re.search(r'open "[^"]*/packfiles/', line)]
        assert sessions() == 1
        assert opens and len(opens) == len(set(opens))  # each packfile opened once, by one thread

        with open_store(location) as parent:  # the command's own session, as psql's
            view = parent.view()
        monkeypatch.setenv(VIEW_ENV, view)
        deadline = time.monotonic() + 10  # its last CLOSEs are not waited for: until the server logs the end
        while sum("session closed" in line for line in log()) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        before = len(log())
        warm, server = read_all(location)
        assert len(log()) == before and sessions() == 2  # not even a connection
        server.after_fork()
        server.store.backend.list("states/")  # waits for the background connect, then asks
        assert sessions() == 3
        server.cleanup()
        server.store.close()
        monkeypatch.delenv(VIEW_ENV)
        local, _ = read_all(f"fs:{fixtures_dir / 'golden-plain'}")
        assert cold == warm == local


@pytest.mark.parametrize("backend", ["s3", "sftp"])
def test_the_commands_warm_up_leaves_the_plugin_nothing_to_fetch_to_get_ready(
    backend: str,
    remotes: dict[str, tuple[str, Path]],
    fixtures_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A command that starts nbdkit warms the snapshot up on its own connection (prepare():
    warm_snapshot) and hands over its view: the plugin's start, cold otherwise, then asks the server
    for nothing (the spans it plans are the command's, read from the on-disk cache), and its image
    reads the bytes the fs store's does."""
    from kloset_blocks.serving.nbdkit import VIEW_ENV
    from kloset_blocks.serving.startup import warm_snapshot
    from kloset_blocks.store.backend_s3 import S3Backend
    from kloset_blocks.store.backend_sftp import SftpBackend

    location, config = remotes[f"{backend}-golden-plain"]
    _with_config(monkeypatch, config)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = _counted_calls(monkeypatch, S3Backend if backend == "s3" else SftpBackend)
    with open_store(location, cache_dir=str(tmp_path / "kloset-blocks")) as st:
        snapshot = st.open_snapshot("bf6afbae")
        assert st.disk is not None
        assert warm_snapshot(snapshot, find_pgdata(snapshot), st.disk) > 0
        view = st.view()
    calls.clear()
    monkeypatch.setenv(VIEW_ENV, view)
    server = server_for(location, "pgdata=true")
    assert calls == []  # ready: view, metadata and every warm-up span from the command
    export = server.open("")
    got = bytearray(min(export.image.size, 8 << 20))
    server.pread(export, memoryview(got), 0)
    server.cleanup()
    server.store.close()
    monkeypatch.delenv(VIEW_ENV)
    local = server_for(f"fs:{fixtures_dir / 'golden-plain'}", "pgdata=true")
    want = bytearray(len(got))
    local.pread(local.open(""), memoryview(want), 0)
    assert got == want


def _descendants(pid: int) -> list[int]:
    parents: dict[int, int] = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
            parents[int(stat_file.parent.name)] = int(fields[1])
    out, todo = [], [pid]
    while todo:
        below = todo.pop()
        children = [p for p, parent in parents.items() if parent == below]
        out += children
        todo += children
    return out


def test_sftp_reconnects_after_the_server_drops_the_channel_or_the_connection(
    fixtures_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shared channel's server process killed (sftp-server), then the connection's (sshd's
    process for it): the next read opens a new channel, then connects again, and returns the
    packfile's bytes each time; with the server gone, a read is one StoreError line, in bounded
    time."""
    import signal

    from kloset_blocks.store.backend import open_backend
    from kloset_blocks.store.location import parse_location
    from tests.remote_servers import sshd_server

    with sshd_server(tmp_path / "srv", count_requests=True) as ssh:
        shutil.copytree(fixtures_dir / "golden-plain", tmp_path / "store")
        _with_config(monkeypatch, ssh.config(tmp_path / "sftp.conf", timeout="3", retries="2"))
        backend = open_backend(parse_location(ssh.location(tmp_path / "store")))
        key = backend.list("packfiles/")[0]
        want = (tmp_path / "store" / key).read_bytes()[100:300100]
        listener = int((ssh.dir / "sshd.pid").read_text())
        assert ssh.sftp_log is not None

        def sessions() -> int:
            return ssh.sftp_log.read_text().count("session opened")

        assert backend.read_range(key, 100, 300000) == want and sessions() == 1
        for pid in _descendants(listener):
            with contextlib.suppress(OSError):
                if b"sftp-server" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
        assert backend.read_range(key, 100, 300000) == want and sessions() == 2
        for pid in _descendants(listener):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)  # every process of the connection: it is gone
        assert backend.read_range(key, 100, 300000) == want and sessions() == 3
        last = _descendants(listener)  # the third connection's: they outlive the listener
    for pid in last:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(
        StoreError, match=r"^cannot read sftp://.*: .*\(after 3 attempts\)$|^sftp .*cannot connect"
    ):
        backend.read_range(key, 100, 300000)
    assert time.monotonic() - started < 30
    backend.close()


def test_a_packfiles_header_is_read_in_flight_with_its_first_blob_and_still_checked(
    s3: S3Server,
    remotes: dict[str, tuple[str, Path]],
    fixtures_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first read of a blob far from its packfile's start sends the header's request and the
    blob's together (the header's is held here until the blob's has been sent: one after the other,
    this read would wait out the hold); the header is checked all the same."""
    from kloset_blocks.errors import CorruptionError
    from kloset_blocks.store import codec as c
    from kloset_blocks.store.backend_s3 import S3Backend
    from kloset_blocks.store.packfile import MAX_GAP, Packfiles

    location, config = remotes["s3-golden-plain"]
    _with_config(monkeypatch, config)
    local = open_store(str(fixtures_dir / "golden-plain"))
    loc = next(
        loc for _, _, loc in local.index.blobs_of_types(frozenset({c.RT_CHUNK})) if loc.offset > 2 * MAX_GAP
    )
    blob_sent = threading.Event()
    waited: list[bool] = []
    read_range = S3Backend.read_range

    def held(self: S3Backend, key: str, offset: int, length: int) -> bytes:
        if (offset, length) == (0, c.HEADER_SIZE):
            waited.append(blob_sent.wait(10))
        else:
            blob_sent.set()
        return read_range(self, key, offset, length)

    monkeypatch.setattr(S3Backend, "read_range", held)
    with open_store(location) as remote:
        fresh = Packfiles(remote.backend, remote.codec, remote.index)  # no header checked yet
        waited.clear()  # (the store's open read headers of its own)
        blob_sent.clear()
        assert fresh.pread(loc) == local.packfiles.pread(loc)
    assert waited == [True]
    # The same read of a packfile whose magic is damaged is an error, not the blob's bytes.
    damaged = tmp_path / "damaged"
    shutil.copytree(fixtures_dir / "golden-plain", damaged)
    path = damaged / Packfiles.key(loc.packfile)
    path.write_bytes(b"X" + path.read_bytes()[1:])
    s3.put_tree(damaged, "fixtures", "damaged-magic")
    blob_sent.clear()
    with open_store(s3.location("fixtures", "damaged-magic")) as remote:
        fresh = Packfiles(remote.backend, remote.codec, remote.index)
        with pytest.raises(CorruptionError, match="bad magic"):
            fresh.pread(loc)
    local.close()


def test_a_closed_sftp_backends_connection_serves_the_next_one_on_the_same_store(
    ssh: SshServer, fixtures_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A command that opens the store again (prepare starting over) pays no second SSH handshake:
    connections counted by a proxy in front of sshd; other options, or a wait past IDLE_FOR, connect."""
    from kloset_blocks.store import backend_sftp
    from kloset_blocks.store.backend import open_backend
    from kloset_blocks.store.location import parse_location
    from tests.remote_servers import delay_proxy

    remote = tmp_path / "remote"
    shutil.copytree(fixtures_dir / "golden-plain", remote)
    with delay_proxy(ssh.port, tmp_path, delay_ms=0, rate_mbit=0) as proxy:
        known = str(ssh.known_hosts_for(proxy.port))
        loc = parse_location(ssh.location(remote, port=proxy.port))

        def read_config(**extra: str) -> bytes:
            monkeypatch.setenv(CONFIG_ENV, str(ssh.config(tmp_path / "c.conf", known_hosts=known, **extra)))
            backend = open_backend(loc)
            try:
                return backend.read("CONFIG")
            finally:
                backend.close()

        probed = proxy.stats()["connections"]  # the proxy's readiness probe
        first = read_config()
        assert read_config() == first
        assert proxy.stats()["connections"] - probed == 1
        assert read_config(timeout="29") == first  # other options: a connection of its own
        assert proxy.stats()["connections"] - probed == 2
        monkeypatch.setattr(backend_sftp, "IDLE_FOR", 0.0)
        assert read_config(timeout="29") == first  # kept too long: connect again
        assert proxy.stats()["connections"] - probed == 3
    assert first == (remote / "CONFIG").read_bytes()


def _quickack_after_each_read(sock_class: type[socket.socket]) -> list[int]:
    """TCP_QUICKACK as read after each of four request/reply exchanges on a loopback connection
    from a `sock_class` socket: 1 out of delayed-ACK (pingpong) mode, 0 in it."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = sock_class(socket.AF_INET, socket.SOCK_STREAM)
        with client:
            client.connect(listener.getsockname())
            server, _ = listener.accept()
            with server:
                seen = []
                for _ in range(4):
                    server.sendall(b"reply" * 20)
                    client.recv(4096)
                    seen.append(client.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK))
                    client.sendall(b"request" * 20)  # a reply soon after a read: the kernel's pingpong
                    server.recv(4096)
                return seen


def test_an_sftp_connection_neither_holds_small_writes_nor_delays_its_acks(
    ssh: SshServer, fixtures_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sshd leaves Nagle on for an sftp session: a small reply sent while an earlier one is
    unacknowledged waits for the client's ACK, which the kernel delays (40 ms on loopback) once
    the connection looks request/reply. The backend's socket has Nagle off and leaves delayed-ACK
    mode at every read; a plain socket, the control, stays in it."""
    from kloset_blocks.store import backend_sftp
    from kloset_blocks.store.backend import open_backend
    from kloset_blocks.store.location import parse_location

    assert _quickack_after_each_read(socket.socket)[1:] == [0, 0, 0]
    assert _quickack_after_each_read(backend_sftp._PromptSocket) == [1, 1, 1, 1]

    remote = tmp_path / "remote"
    shutil.copytree(fixtures_dir / "golden-plain", remote)
    monkeypatch.setenv(CONFIG_ENV, str(ssh.config(tmp_path / "c.conf")))
    backend = open_backend(parse_location(ssh.location(remote)))
    try:
        assert backend.read("CONFIG") == (remote / "CONFIG").read_bytes()
        transport = backend.client().get_transport()
        assert transport is not None
        sock = transport.sock
        assert isinstance(sock, backend_sftp._PromptSocket)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        backend.close()


def test_a_plugins_first_open_prefetches_the_wal_recovery_begins_with(
    remotes: dict[str, tuple[str, Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over S3, with no startup profile yet: the first open fetches the chunks of the WAL named by
    backup_label in the background, into the on-disk cache, before anything reads them."""
    from kloset_blocks.serving.startup import wal_start

    location, config = remotes["s3-golden-plain"]
    _with_config(monkeypatch, config)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    server = server_for(location, "pgdata=true")
    try:
        assert server.disk is not None and server._startup_positions == []
        export = server.open("")
        wal = wal_start(export.image)
        assert wal and server.startup_prefetch is not None
        server.startup_prefetch.join()
        server.cache.wait_idle()
        server.disk.flush()
        assert server.cache.stats.prefetched >= len(wal)
        assert all(os.path.exists(server.disk.path(mac)) for mac in wal)
    finally:
        server.cleanup()
        server.store.close()


def test_the_command_fetches_what_recovery_reads_first_into_the_on_disk_cache(
    remotes: dict[str, tuple[str, Path]], fixtures_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over S3: what the command fetches on its own connection for the plugin (the WAL the backup's
    recovery begins with, the chunks at the places the last start read) is the same WAL head the
    plugin's image names, plus the profile's chunk; fetched, the on-disk cache holds the fs store's
    bytes for each, and nothing is left to fetch."""
    from kloset_blocks.serving.startup import POSITIONS, fetch_into, recovery_chunks, wal_start

    location, config = remotes["s3-golden-plain"]
    _with_config(monkeypatch, config)
    oracle = server_for(f"fs:{fixtures_dir / 'golden-plain'}", "pgdata=true")
    image = oracle.open("").image
    wal = wal_start(image)
    assert wal
    st = open_store(location, cache_dir=str(tmp_path / "cache"))
    try:
        assert st.disk is not None
        snapshot = st.open_snapshot(oracle.default_export)
        root = find_pgdata(snapshot)
        control = snapshot.open_file(root.rstrip(b"/") + b"/global/pg_control")
        (st.disk.dir / POSITIONS).write_text(f"0 {control.path.hex()}\n99999 {control.path.hex()}\n")
        wanted = recovery_chunks(snapshot, os.fsdecode(root), st.disk)
        assert wanted == [*wal, control.macs[0]]  # the out-of-range position skipped
        fetch_into(st, wanted, st.disk)
        for mac in wanted:
            assert st.disk.load(mac) == oracle.store.read_chunk(mac)
        assert recovery_chunks(snapshot, os.fsdecode(root), st.disk) == []
        assert st.packfiles.preads > 0  # they came from the bucket
    finally:
        st.close()
        oracle.cleanup()
