# Bad input and damaged stores: every failure is a specific KlosetError with a one-line message
# naming the file or blob (the CLI prints it and exits 1, no traceback), never wrong bytes.
# Damage is always done to a COPY of a fixture store.
from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import pytest

from kloset_blocks.errors import (
    CorruptionError,
    KlosetError,
    NotFound,
    PassphraseError,
    StoreError,
    UnsupportedVersion,
)
from kloset_blocks.serving.server import PluginConfig
from kloset_blocks.store import Store, open_store
from kloset_blocks.store import codec as c
from kloset_blocks.store.passphrase import KEY_ENV, passphrase_source
from tests.store_helpers import (
    ENC,
    PASSPHRASE,
    PLAIN,
    SNAP_A_ENC,
    SNAP_A_PLAIN,
    assert_one_line_error,
    copy_store,
    flip_byte,
    manifest,
    plain_store,
    run_cli,
)

BIG = b"/base/16384/16397"


# ---------------------------------------------------------------- opening


@pytest.mark.parametrize(
    ("location", "error", "message"),
    [
        ("s3:bucket/x", StoreError, "store location 's3:bucket/x': expected s3://HOST/..."),
        ("ftp://host/x", StoreError, "unsupported store backend: ftp (supported: fs, s3, sftp)"),
        ("/nonexistent/store", StoreError, "store not found"),
        ("fs:/nonexistent/store", StoreError, "store not found"),
        (str(PLAIN / "states"), StoreError, "not a kloset store"),
    ],
)
def test_open_errors(location: str, error: type, message: str) -> None:
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        open_store(location)


@pytest.mark.parametrize(
    "location", [str(PLAIN), f"fs:{PLAIN}", f"fs://{PLAIN}", f"fs:///{str(PLAIN).lstrip('/')}"]
)
def test_location_spellings(location: str) -> None:
    assert [i.id.hex()[:8] for i in open_store(location).snapshots()] == ["bf6afbae", "3b116f40"]


def test_relative_location(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(PLAIN.parent)
    assert len(open_store("golden-plain").snapshots()) == 2
    assert len(open_store("fs:golden-plain").snapshots()) == 2


def test_passphrase_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The edges' precedence rule: an explicit spec, then $PLAKAR_PASSPHRASE, then a prompt.
    good = tmp_path / "good"
    good.write_bytes(PASSPHRASE.encode() + b"\n")
    bad = tmp_path / "bad"
    bad.write_bytes(b"incorrect\n")
    monkeypatch.delenv("PLAKAR_PASSPHRASE", raising=False)
    monkeypatch.setattr("sys.stdin.isatty", lambda: False, raising=False)

    def opened(spec: str | None) -> Store:
        return open_store(str(ENC), passphrase_source(spec, str(ENC)))

    assert opened(f"+{good}").find_snapshot("").id.hex() == SNAP_A_ENC
    with pytest.raises(PassphraseError, match=f"wrong passphrase for store {ENC}"):
        opened(f"+{bad}")
    with pytest.raises(PassphraseError, match="cannot read passphrase file"):
        opened(f"+{tmp_path / 'missing'}")
    with pytest.raises(PassphraseError, match="PLAKAR_PASSPHRASE"):
        opened(None)
    monkeypatch.setenv("PLAKAR_PASSPHRASE", "wrong")
    with pytest.raises(PassphraseError, match="wrong passphrase"):
        opened(None)
    with pytest.raises(PassphraseError, match="wrong passphrase"):  # the file wins over the environment
        opened(f"+{bad}")

    # A plaintext store never asks.
    def never() -> bytes:
        raise AssertionError("asked for a passphrase")

    assert open_store(str(PLAIN), never).encrypted is False


@pytest.fixture(scope="module")
def enc_key() -> bytes:
    with open_store(str(ENC), PASSPHRASE) as st:
        assert st.codec.key is not None
        return st.codec.key


def test_store_opens_from_a_derived_key(enc_key: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    # What `kloset-blocks psql` hands the nbdkit it starts: the key derived once, not the passphrase.
    def no_kdf(*args: object) -> bytes:
        raise AssertionError("the key was derived again")

    monkeypatch.setattr(c, "derive_key", no_kdf)
    with open_store(str(ENC), key=enc_key) as st:
        assert st.find_snapshot("").id.hex() == SNAP_A_ENC
        assert st.codec.key == enc_key
    for bad in (bytes(32), b"\0"):
        with pytest.raises(PassphraseError, match="the key given does not open store"):
            open_store(str(ENC), key=bad)
    # The reader reads no environment: a key there is for the plugin's edge only.
    monkeypatch.setenv(KEY_ENV, enc_key.hex())
    with pytest.raises(PassphraseError, match="is encrypted: no passphrase given"):
        open_store(str(ENC))


@pytest.mark.parametrize(
    ("passphrase", "key_env", "env_key", "expect"),
    [
        (None, True, "KEY", "key"),  # nbdkit started by kloset-blocks: the key it was handed
        ("+FILE", True, "KEY", "passphrase"),  # an explicit passphrase= wins over it
        (None, False, "KEY", "passphrase"),  # `expose` without --key-from-env ignores a stale one
        (None, True, None, "passphrase"),  # no key handed: $PLAKAR_PASSPHRASE, then a prompt
    ],
)
def test_plugin_secret_precedence(
    enc_key: bytes,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    passphrase: str | None,
    key_env: bool,
    env_key: str | None,
    expect: str,
) -> None:
    pw = tmp_path / "pw"
    pw.write_text(PASSPHRASE)
    if env_key:
        monkeypatch.setenv(KEY_ENV, enc_key.hex())
    else:
        monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.setenv("PLAKAR_PASSPHRASE", PASSPHRASE)
    spec = passphrase.replace("FILE", str(pw)) if passphrase else None
    secret, key = PluginConfig(store=str(ENC), passphrase=spec, key_env=key_env).secret()
    if expect == "key":
        assert (secret, key) == (None, enc_key)
    else:
        assert key is None and callable(secret) and secret() == PASSPHRASE.encode()


def test_malformed_key_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "zz")
    with pytest.raises(PassphraseError, match="is not a hex key"):
        PluginConfig(store=str(ENC)).secret()


def _patch_config_version(store: Path, version: int) -> None:
    raw = bytearray((store / "CONFIG").read_bytes())
    raw[12:16] = struct.pack("<I", version)
    (store / "CONFIG").write_bytes(bytes(raw))


def test_unsupported_store_version(tmp_path: Path) -> None:
    store = copy_store(PLAIN, tmp_path / "s")
    _patch_config_version(store, c.pack_version(2, 0, 0))
    with pytest.raises(
        UnsupportedVersion, match=r"unsupported store version 2\.0\.0 \(this reader supports 1\.0\.0\)"
    ):
        open_store(str(store))
    proc = run_cli("snapshots", str(store))
    assert_one_line_error(proc, "unsupported store version 2.0.0 (this reader supports 1.0.0)")


def test_unsupported_state_version(tmp_path: Path) -> None:
    store = copy_store(PLAIN, tmp_path / "s")
    state = next((store / "states").glob("*/*"))
    codec = plain_store().codec
    _version, payload = c.unwrap(state.read_bytes(), c.RT_STATE, codec.mac, "state")
    state.write_bytes(c.wrap(c.RT_STATE, c.pack_version(1, 2, 0), payload, codec.mac))
    # Left out of the index: the snapshots that need its blobs fail and say why.
    opened = open_store(str(store))
    assert len(opened.snapshots()) < 2
    assert any(r"unsupported state version 1.2.0" in line for line in opened.problems())


@pytest.mark.parametrize(
    ("offset", "data", "error", "message"),
    [
        (12, struct.pack("<I", 0x10100), UnsupportedVersion, r"unsupported packfile version 1\.1\.0"),
        (8, struct.pack("<I", c.RT_STATE), CorruptionError, "resource type is state, expected packfile"),
        (0, b"_XXXXXX_", CorruptionError, "not a kloset object"),
    ],
)
def test_packfile_header_checked(tmp_path: Path, offset: int, data: bytes, error: type, message: str) -> None:
    store_dir = copy_store(PLAIN, tmp_path / "s")
    for pack in (store_dir / "packfiles").glob("*/*"):
        with open(pack, "r+b") as f:
            f.seek(offset)
            f.write(data)
    store = open_store(str(store_dir))
    with pytest.raises(error, match=message):
        store.open_snapshot(SNAP_A_PLAIN).lookup(b"/PG_VERSION")


def test_missing_bucket_dirs_and_junk_are_skipped(tmp_path: Path) -> None:
    store = copy_store(PLAIN, tmp_path / "s")
    (store / "states" / "zz").mkdir()
    (store / "states" / "junk-file").write_bytes(b"x")
    (store / "states" / "00").mkdir()
    (store / "states" / "00" / "tmp.123").write_bytes(b"not a state")
    (store / "states" / "00" / ("ab" * 31)).write_bytes(b"short name")
    (store / "locks").mkdir()
    assert len(open_store(str(store)).snapshots()) == 2


# ---------------------------------------------------------------- damaged bytes


def _blob_file_offset(store_dir: Path, rtype: int, mac: bytes) -> tuple[Path, int, int]:
    loc = plain_store().locate(rtype, mac) if store_dir.name.startswith("plain") else None
    assert loc is not None
    path = store_dir / "packfiles" / loc.packfile.hex()[:2] / loc.packfile.hex()
    return path, c.HEADER_SIZE + loc.offset, loc.length


@pytest.fixture
def plain_copy(tmp_path: Path) -> Path:
    return copy_store(PLAIN, tmp_path / "plain")


def _unique_chunk() -> tuple[bytes, int]:
    """A chunk of BIG used by no other file of snapshot A, and its index."""
    snap = plain_store().open_snapshot(SNAP_A_PLAIN)
    big = snap.open_file(BIG)
    others: set[bytes] = set()
    for node in snap.nodes():
        if node.data is not None and node.path != BIG:
            others.update(node.data.macs)
    for i, mac in enumerate(big.macs):
        if mac not in others and big.macs.count(mac) == 1:
            return mac, i
    raise AssertionError("no unique chunk")


def test_flipped_chunk_byte(plain_copy: Path) -> None:
    mac, index = _unique_chunk()
    pack, offset, length = _blob_file_offset(plain_copy, c.RT_CHUNK, mac)
    flip_byte(pack, offset + length // 2)
    store = open_store(str(plain_copy))
    snap = store.open_snapshot(SNAP_A_PLAIN)
    f = snap.open_file(BIG)
    with pytest.raises(CorruptionError) as e:
        f.read(0, f.size)
    assert pack.name in str(e.value) and mac.hex() in str(e.value) and "chunk" in str(e.value)
    # The chunks before it are fine, and so is every other file.
    good = plain_store().open_snapshot(SNAP_A_PLAIN).open_file(BIG)
    assert f.read(0, f.offsets[index]) == good.read(0, good.offsets[index])
    man = manifest("A")
    for node in snap.nodes():
        if node.data is not None and node.path != BIG:
            assert (
                hashlib.sha256(node.data.read(0, node.size)).hexdigest() == man[node.path.decode()]["sha256"]
            )
    proc = run_cli("cat", str(plain_copy), f"bf6a:{BIG.decode()}")
    assert_one_line_error(proc, pack.name, mac.hex())


def test_flipped_chunk_byte_encrypted(tmp_path: Path) -> None:
    store_dir = copy_store(ENC, tmp_path / "enc")
    store = open_store(str(store_dir), PASSPHRASE)
    f = store.open_snapshot("").open_file(BIG)
    mac = f.macs[3]
    loc = store.locate(c.RT_CHUNK, mac)
    pack = store_dir / "packfiles" / loc.packfile.hex()[:2] / loc.packfile.hex()
    flip_byte(pack, c.HEADER_SIZE + loc.offset + 100)
    with pytest.raises(CorruptionError, match=f"{pack.name}: chunk blob {mac.hex()}: cannot decrypt"):
        f.read(f.offsets[3], 10)
    assert len(f.read(f.offsets[2], 10)) == 10


def test_flipped_vfs_entry_byte(plain_copy: Path) -> None:
    entry = plain_store().open_snapshot(SNAP_A_PLAIN).lookup(b"/PG_VERSION")
    pack, offset, length = _blob_file_offset(plain_copy, c.RT_VFS_ENTRY, entry.mac)
    flip_byte(pack, offset + length - 8)
    snap = open_store(str(plain_copy)).open_snapshot(SNAP_A_PLAIN)
    with pytest.raises(CorruptionError, match=f"vfs entry blob {entry.mac.hex()}"):
        snap.lookup(b"/PG_VERSION")
    # A walk goes on: the entry is a placeholder that says why (tests/test_damage_store.py).
    damaged = [e for _, e in snap.walk() if e.damage]
    assert [e.path for e in damaged] == [b"/PG_VERSION"] and entry.mac.hex() in str(damaged[0].damage)
    assert snap.lookup(b"/backup_label").size == 225
    assert_one_line_error(run_cli("ls", str(plain_copy), "bf6a:/"), entry.mac.hex())


def test_flipped_vfs_node_byte(plain_copy: Path) -> None:
    snap = plain_store().open_snapshot(SNAP_A_PLAIN)
    leaf = next(iter(snap.vfs.leaves()))
    pack, offset, length = _blob_file_offset(plain_copy, c.RT_VFS_NODE, leaf.mac)
    flip_byte(pack, offset + length // 2)
    damaged = open_store(str(plain_copy)).open_snapshot(SNAP_A_PLAIN)
    with pytest.raises(CorruptionError, match=f"vfs node blob {leaf.mac.hex()}"):
        list(damaged.walk())
    assert_one_line_error(run_cli("ls", str(plain_copy), "bf6a:/"), "vfs node blob")
    # Snapshot B shares no damaged node only if its tree differs; either way never wrong bytes.


def test_flipped_state_byte(plain_copy: Path) -> None:
    # The store still opens (tests/test_damage_store.py: what else is still served); `snapshots`
    # names the damaged state and exits 1.
    state = plain_copy / "states" / "bf" / SNAP_A_PLAIN
    flip_byte(state, state.stat().st_size // 2)
    store = open_store(str(plain_copy))
    with pytest.raises(NotFound, match=f"the store is damaged: state {state}: MAC mismatch"):
        store.find_snapshot("bf6a")
    proc = run_cli("snapshots", str(plain_copy))
    assert proc.returncode == 1 and b"Traceback" not in proc.stderr
    assert f"damaged state left out: state {state}: MAC mismatch".encode() in proc.stderr


@pytest.mark.parametrize("where", [40, 100, -40, -5])
def test_flipped_config_byte(plain_copy: Path, where: int) -> None:
    config = plain_copy / "CONFIG"
    flip_byte(config, where % config.stat().st_size)
    with pytest.raises(CorruptionError, match="CONFIG"):
        open_store(str(plain_copy))
    assert_one_line_error(run_cli("snapshots", str(plain_copy)), "CONFIG")


def test_flipped_config_byte_encrypted(tmp_path: Path) -> None:
    store_dir = copy_store(ENC, tmp_path / "enc")
    config = store_dir / "CONFIG"
    flip_byte(config, config.stat().st_size - 3)  # in the trailer: the canary still passes
    with pytest.raises(CorruptionError, match="CONFIG: MAC mismatch"):
        open_store(str(store_dir), PASSPHRASE)


def test_truncated_and_missing_packfile(plain_copy: Path) -> None:
    mac, _ = _unique_chunk()
    pack, offset, _ = _blob_file_offset(plain_copy, c.RT_CHUNK, mac)
    os.truncate(pack, offset + 10)
    snap = open_store(str(plain_copy)).open_snapshot(SNAP_A_PLAIN)
    with pytest.raises(CorruptionError, match="truncated"):
        snap.open_file(BIG).read(0, snap.lookup(BIG).size)
    pack.unlink()
    snap = open_store(str(plain_copy)).open_snapshot(SNAP_A_PLAIN)
    with pytest.raises(CorruptionError, match="missing packfile"):
        snap.open_file(BIG).read(0, snap.lookup(BIG).size)


def test_reader_never_writes(tmp_path: Path) -> None:
    store_dir = copy_store(PLAIN, tmp_path / "s")
    os.chmod(store_dir, 0o555)
    before = {p: p.stat().st_mtime_ns for p in store_dir.rglob("*")}
    store = open_store(str(store_dir))
    for info in store.snapshots():
        snap = store.open_snapshot(info.id.hex())
        for node in snap.nodes():
            if node.data is not None and node.size:
                node.data.read(0, min(node.size, 10))
    store.close()
    assert {p: p.stat().st_mtime_ns for p in store_dir.rglob("*")} == before
    os.chmod(store_dir, 0o755)


# ---------------------------------------------------------------- CLI one-liners


@pytest.mark.parametrize(
    ("args", "env", "needles"),
    [
        (["snapshots", "ftp://bucket/x"], {}, ["unsupported store backend: ftp (supported: fs, s3, sftp)"]),
        (["snapshots", "/nonexistent"], {}, ["store not found"]),
        (["snapshots", str(PLAIN / "packfiles")], {}, ["not a kloset store"]),
        (["ls", str(PLAIN), "ffff"], {}, ["no snapshot has prefix 'ffff'"]),
        (["ls", str(PLAIN), "bf6a:/nope"], {}, ["no such path in snapshot bf6afbae: /nope"]),
        (["cat", str(PLAIN), "bf6a:/base"], {}, ["not a regular file"]),
        (["snapshots", str(ENC)], {"PLAKAR_PASSPHRASE": "wrong"}, [f"wrong passphrase for store {ENC}"]),
        (["snapshots", str(ENC)], {}, ["is encrypted", "PLAKAR_PASSPHRASE", "--passphrase-file"]),
    ],
    ids=["backend", "missing", "not-a-store", "prefix", "path", "cat-dir", "wrong-pass", "no-pass"],
)
def test_cli_errors(args: list[str], env: dict[str, str], needles: list[str]) -> None:
    assert_one_line_error(run_cli(*args, env=env), *needles)


def test_cli_passphrase_file(tmp_path: Path) -> None:
    f = tmp_path / "pass"
    f.write_text(PASSPHRASE + "\n")
    proc = run_cli("snapshots", "--passphrase-file", str(f), f"fs:{ENC}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().startswith(SNAP_A_ENC[:8] + "  ")
    f.write_text("nope\n")
    assert_one_line_error(run_cli("snapshots", "--passphrase-file", str(f), str(ENC)), "wrong passphrase")


def test_errors_are_kloset_errors() -> None:
    for cls in (CorruptionError, NotFound, PassphraseError, StoreError, UnsupportedVersion):
        assert issubclass(cls, KlosetError)


def test_a_process_derives_a_stores_key_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # prepare() may open a store twice (from its last view, then from the store): Argon2id once.
    from kloset_blocks.store import config

    derivations: list[bytes] = []
    derive = c.derive_key

    def counted(secret: bytes, params: object) -> bytes:
        derivations.append(secret)
        return derive(secret, params)

    monkeypatch.setattr(c, "derive_key", counted)
    monkeypatch.setattr(config, "_derived", {})
    keys = []
    for _ in range(2):
        with open_store(str(ENC), PASSPHRASE) as st:
            keys.append(st.codec.key)
    assert len(derivations) == 1 and keys[0] == keys[1] is not None
    for _ in range(2):  # a wrong passphrase: derived once too, refused each time
        with pytest.raises(PassphraseError, match="wrong passphrase"):
            open_store(str(ENC), "not it")
    assert len(derivations) == 2
