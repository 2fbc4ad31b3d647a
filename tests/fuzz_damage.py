# Fuzzing damaged stores: a small store written by the project's writer (two snapshots, tiny
# chunks, a deep B+tree, several packfiles; plaintext and encrypted), damaged at random (bytes
# flipped or overwritten, files truncated, removed, or replaced by junk, foreign files added, in
# CONFIG, states/ and packfiles/), then opened, listed and read through every path the project
# has: the reader (walk, lookup, listdir, file reads) and the served image (serving.server.Server,
# its chunk cache included). The oracles are independent of the reader: the source directories'
# own bytes for every file, and the image of the undamaged store for every byte of metadata.
#
# A case passes when every read gives the right bytes or raises a KlosetError with a one-line
# message; anything else (another exception, a hang, a wrong byte) fails, naming the seed.
#
#   python -m tests.fuzz_damage [--iterations N] [--seed S] [--cli-every K]     (`make fuzz`)
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kloset_blocks.errors import KlosetError
from kloset_blocks.ext4.layout import BYTES, FILE
from kloset_blocks.serving.server import Server
from kloset_blocks.store import open_store
from kloset_blocks.store.passphrase import KEY_ENV

REPO = Path(__file__).resolve().parent.parent
PASSPHRASE = "fuzz"
HANG_SECONDS = 60  # a hang guard: a case takes well under a second


class Hang(Exception):
    pass


class Failure(AssertionError):
    pass


@dataclass
class Fixture:
    """One undamaged store and what it must read as."""

    store: Path
    passphrase: str | None
    files: dict[str, dict[bytes, bytes]]  # snapshot id -> path -> content (from the sources)
    images: dict[str, Any]  # snapshot id -> BlockImage of the undamaged store


def _make_source(root: Path, rng: random.Random, variant: int) -> None:
    (root / "dir" / "deep" / "er").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    (root / "empty").write_bytes(b"")
    (root / "small").write_bytes(b"small file %d\n" % variant)
    (root / "dir" / "random").write_bytes(rng.randbytes(40_000 + variant))
    (root / "dir" / "deep" / "er" / "text").write_bytes(b"line\n" * (3000 + variant))
    (root / "shared").write_bytes(random.Random(7).randbytes(30_000))  # the same in both snapshots
    for i in range(12):
        (root / "dir" / f"f{i:02}").write_bytes(rng.randbytes(rng.randrange(1, 5000)))
    os.symlink("dir/random", root / "link")


def _read_sources(root: Path) -> dict[bytes, bytes]:
    out = {}
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            out[b"/" + os.fsencode(p.relative_to(root))] = p.read_bytes()
    return out


def build_fixture(where: Path, encrypted: bool) -> Fixture:
    from kloset_blocks.writer import add_snapshot, write_store

    rng = random.Random(1)
    store = where / ("enc" if encrypted else "plain")
    passphrase = PASSPHRASE.encode() if encrypted else None
    kw: dict[str, Any] = {"kdf_time": 1, "kdf_memory_kib": 8192} if encrypted else {}
    files: dict[str, dict[bytes, bytes]] = {}
    ids = []
    for variant in range(2):
        src = where / f"src-{'e' if encrypted else 'p'}{variant}"
        src.mkdir()
        _make_source(src, rng, variant)
        common = {"passphrase": passphrase, "btree_order": 3, "packfile_max": 24 << 10, "seed": variant}
        if variant == 0:
            chunks = {"chunk_min": 256, "chunk_avg": 1024, "chunk_max": 4096}
            snap = write_store(store, str(src), compression="LZ4", **common, **chunks, **kw)
        else:
            snap = add_snapshot(store, str(src), **common)
        files[snap] = _read_sources(src)
        ids.append(snap)
    images = {}
    with open_store(str(store), PASSPHRASE if encrypted else None) as st:
        for snap in ids:
            images[snap] = _image(st, snap)
    return Fixture(store, PASSPHRASE if encrypted else None, files, images)


def _image(store: Any, snap: str) -> Any:
    from kloset_blocks.image.snapshot import ImageOptions, snapshot_image

    return snapshot_image(store.open_snapshot(snap), ImageOptions(owner="root"))[0]


# ---------------------------------------------------------------- damage


def _files(store: Path) -> list[Path]:
    return sorted(p for p in store.rglob("*") if p.is_file())


def _rewrite(path: Path, data: bytes) -> None:
    # A new inode: the case's files are hard links to the fixture's, which must stay intact.
    path.unlink()
    path.write_bytes(data)


def _flip(path: Path, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    if not data:
        return f"{path.name}: empty"
    for _ in range(rng.choice([1, 1, 1, 2, 8])):
        i = rng.randrange(len(data))
        data[i] ^= rng.randrange(1, 256)
    _rewrite(path, bytes(data))
    return f"flip {path.name}"


def _overwrite(path: Path, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    if not data:
        return f"{path.name}: empty"
    start = rng.randrange(len(data))
    n = min(len(data) - start, rng.randrange(1, 200))
    data[start : start + n] = rng.randbytes(n)
    _rewrite(path, bytes(data))
    return f"overwrite {path.name}@{start}+{n}"


def _truncate(path: Path, rng: random.Random) -> str:
    data = path.read_bytes()
    at = rng.randrange(len(data) + 1) if data else 0
    _rewrite(path, data[:at])
    return f"truncate {path.name} to {at}"


def _remove(path: Path, rng: random.Random) -> str:
    path.unlink()
    return f"remove {path.name}"


def _junk(path: Path, rng: random.Random) -> str:
    _rewrite(path, rng.randbytes(rng.choice([0, 10, 48, 100, 5000])))
    return f"junk {path.name}"


def _foreign_state(store: Path, rng: random.Random) -> str:
    name = rng.randbytes(32).hex()
    (store / "states" / name[:2]).mkdir(parents=True, exist_ok=True)
    (store / "states" / name[:2] / name).write_bytes(rng.randbytes(rng.randrange(0, 400)))
    return f"foreign state {name[:8]}"


DAMAGES: list[Callable[[Path, random.Random], str]] = [
    _flip,
    _flip,
    _flip,
    _overwrite,
    _truncate,
    _remove,
    _junk,
]


def damage(store: Path, rng: random.Random) -> list[str]:
    done = []
    for _ in range(rng.choice([1, 1, 2, 3])):
        if rng.random() < 0.1:
            done.append(_foreign_state(store, rng))
            continue
        files = _files(store)
        # CONFIG is one file among dozens: give it a fair share of the cases.
        target = store / "CONFIG" if rng.random() < 0.15 else rng.choice(files)
        if target.exists():
            done.append(rng.choice(DAMAGES)(target, rng))
    return done


# ---------------------------------------------------------------- checks


def _one_line(e: KlosetError, what: str) -> None:
    text = str(e)
    if not text or "\n" in text:
        raise Failure(f"{what}: not a one-line error: {text!r}")


def _guarded(what: str, fn: Callable[[], Any]) -> tuple[Any, KlosetError | None]:
    try:
        return fn(), None
    except KlosetError as e:
        _one_line(e, what)
        return None, e


def check_reader(fx: Fixture, store: Path) -> int:
    """Open, list and read everything; returns how many reads gave bytes (all checked)."""
    st, err = _guarded("open", lambda: open_store(str(store), fx.passphrase))
    if err is not None:
        return 0
    good = 0
    try:
        _guarded("snapshots", st.snapshots)
        for line in st.problems():
            if "\n" in line:
                raise Failure(f"problems: {line!r}")
        for snap_id, files in fx.files.items():
            snap, err = _guarded("open_snapshot", lambda s=snap_id: st.open_snapshot(s))
            if err is not None:
                continue
            entries, err = _guarded("walk", lambda s=snap: list(s.walk()))
            for path in list(files)[:3]:
                _guarded("lookup", lambda s=snap, p=path: s.lookup(p))
            _guarded("listdir", lambda s=snap: s.listdir(b"/dir"))
            for path, entry in entries or []:
                if not entry.is_reg or entry.damage:
                    continue
                if path not in files:
                    raise Failure(f"{snap_id[:8]}: {path!r} is not in the source")
                data, err = _guarded("read", lambda s=snap, p=path, n=entry.size: s.open_file(p).read(0, n))
                if err is None:
                    if data != files[path]:
                        raise Failure(f"{snap_id[:8]}: {path!r}: wrong bytes")
                    good += 1
    finally:
        st.close()
    return good


def check_image(fx: Fixture, store: Path) -> int:
    """Serve every snapshot as the plugin does (one Server, one export each, lazily built) and
    read every region of each image."""
    server = Server()
    for key, value in [("store", str(store)), ("cache", "4M"), ("owner", "root"), ("lazy", "true")]:
        server.configure(key, value)
    if fx.passphrase:
        server.configure("passphrase", "+" + str(store.parent / "pass"))
    env_key = os.environ.pop(KEY_ENV, None)
    good = 0
    try:
        server.config_complete()
        _, err = _guarded("get_ready", server.get_ready)
        if err is not None:
            return 0
        for snap_id, files in fx.files.items():
            export, err = _guarded("open export", lambda s=server, i=snap_id: s.open(i[:8]))
            if err is None:
                # Placeholders for damaged entries change the metadata (not always the layout):
                # compare metadata bytes only when the walk has none.
                walk, _ = _guarded("walk", lambda s=server, i=snap_id: list(s.store.open_snapshot(i).walk()))
                intact = walk is not None and not any(e.damage for _, e in walk)
                good += _read_regions(server, export, fx.images[snap_id], files, intact)
    finally:
        if env_key is not None:
            os.environ[KEY_ENV] = env_key
        server.cleanup()
        if server.store is not None:
            server.store.close()
    return good


def _read_regions(server: Server, export: Any, oracle: Any, files: dict[bytes, bytes], intact: bool) -> int:
    image = export.image
    if intact and [(r.start, r.length, r.kind) for r in image.regions] != [
        (r.start, r.length, r.kind) for r in oracle.regions
    ]:
        raise Failure("the image of an intact tree has another layout")
    good = 0
    for r in image.regions:
        if r.kind == FILE:
            n = min(r.length, r.src_len)
            path = r.source.path
        elif r.kind == BYTES and intact:
            n = r.length
            path = None
        else:
            continue  # zeros; or metadata of a layout changed by placeholders (checked by e2fsck tests)
        if n <= 0:
            continue
        buf = bytearray(n)
        _, err = _guarded("pread", lambda b=buf, o=r.start: server.pread(export, memoryview(b), o))
        if err is not None:
            continue
        want = files[path][r.src_offset : r.src_offset + n] if path is not None else oracle.pread(r.start, n)
        if bytes(buf) != want:
            raise Failure(f"image region at {r.start} ({path!r}): wrong bytes")
        good += 1
    return good


def check_cli(fx: Fixture, store: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PLAKAR_PASSPHRASE", KEY_ENV)}
    if fx.passphrase:
        env["PLAKAR_PASSPHRASE"] = fx.passphrase
    for args in (["snapshots", str(store)], ["ls", str(store), "/dir"], ["cat", str(store), "/dir/random"]):
        proc = subprocess.run(
            [sys.executable, "-m", "kloset_blocks", *args],
            capture_output=True,
            env=env,
            cwd=REPO,
            timeout=HANG_SECONDS,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        err = proc.stderr.decode("utf-8", "replace")
        if "Traceback" in err or proc.returncode not in (0, 1):
            raise Failure(f"cli {args[0]}: exit {proc.returncode}: {err[-2000:]}")
        if proc.returncode == 1 and not all(line.startswith("kloset-blocks: ") for line in err.splitlines()):
            raise Failure(f"cli {args[0]}: {err!r}")


# ---------------------------------------------------------------- driver


def _alarm(*_: object) -> None:
    raise Hang


def run(iterations: int, seed: int, cli_every: int = 0, log: Callable[[str], None] | None = None) -> dict:
    """Run the fuzz loop; raises Failure naming the seed and case. Returns counters."""
    counters = {"cases": 0, "reads_checked": 0, "image_regions_checked": 0}
    old = signal.signal(signal.SIGALRM, _alarm)
    with tempfile.TemporaryDirectory(prefix="kb-fuzz-") as tmp:
        base = Path(tmp)
        fixtures = [build_fixture(base, encrypted=False), build_fixture(base, encrypted=True)]
        (base / "pass").write_text(PASSPHRASE)
        rng = random.Random(seed)
        try:
            for i in range(iterations):
                fx = fixtures[i % 2]
                case = base / "case"
                shutil.rmtree(case, ignore_errors=True)
                shutil.copytree(fx.store, case / "store", copy_function=os.link)
                (case / "pass").write_text(PASSPHRASE)
                done = damage(case / "store", rng)
                what = f"seed {seed} iteration {i} ({fx.store.name}: {', '.join(done)})"
                signal.alarm(HANG_SECONDS)
                try:
                    counters["reads_checked"] += check_reader(fx, case / "store")
                    counters["image_regions_checked"] += check_image(fx, case / "store")
                    if cli_every and i % cli_every == 0:
                        check_cli(fx, case / "store")
                except Hang:
                    raise Failure(f"{what}: hang") from None
                except Failure as e:
                    raise Failure(f"{what}: {e}") from None
                except Exception as e:
                    raise Failure(f"{what}: {type(e).__name__}: {e}") from e
                finally:
                    signal.alarm(0)
                counters["cases"] += 1
                if log:
                    log(what)
        finally:
            signal.signal(signal.SIGALRM, old)
    return counters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--cli-every", type=int, default=50)
    parser.add_argument("-v", action="store_true")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    print(f"fuzz: seed {seed}, {args.iterations} iterations", file=sys.stderr)
    counters = run(
        args.iterations, seed, args.cli_every, (lambda s: print(s, file=sys.stderr)) if args.v else None
    )
    print(f"fuzz: ok {counters}", file=sys.stderr)


if __name__ == "__main__":
    main()
