# What one damaged field of an encrypted CONFIG costs `kloset-blocks snapshots`, side by side for
# two checkouts (e.g. main and this branch): wall time and peak memory from /usr/bin/time -v,
# exit status, and whether a traceback was printed. Damage is done to copies of golden-enc.
#
#   python bench/damaged_config.py [--checkout NAME=PATH]... [--fixtures DIR]
#
# Each checkout runs with its own .venv. Cases cost at most a few Argon2id passes at 1 GiB: run it
# on a machine with that much memory free.
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
PASSPHRASE = "correct horse battery staple"


def _patch(raw: bytes, key: bytes, value: bytes) -> bytes:
    """Replace the msgpack value after `key` (its bytes as stored) by `value` (same length)."""
    at = raw.index(key) + len(key)
    return raw[:at] + value + raw[at + len(value) :]


CASES = {
    "intact": lambda raw: raw,
    "argon2id Time 4 -> 40": lambda raw: _patch(raw, b"\xa4Time", b"\xce\x00\x00\x00\x28"),
    "argon2id Memory 256 MiB -> 1 GiB": lambda raw: _patch(raw, b"\xa6Memory", b"\xce\x00\x10\x00\x00"),
    "argon2id Memory 256 MiB -> 4 GiB": lambda raw: _patch(raw, b"\xa6Memory", b"\xce\x00\x40\x00\x00"),
    "SubKeyAlgorithm AES256-KW -> AES256-KX": lambda raw: raw.replace(b"AES256-KW", b"AES256-KX"),
    "argon2id KeyLen 32 -> 0": lambda raw: _patch(raw, b"\xa6KeyLen", b"\xce\x00\x00\x00\x00"),
}


def run(checkout: Path, store: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KLOSET_BLOCKS_")}
    env["PLAKAR_PASSPHRASE"] = PASSPHRASE
    python = checkout / ".venv" / "bin" / "python"
    proc = subprocess.run(
        ["/usr/bin/time", "-v", str(python), "-m", "kloset_blocks", "snapshots", str(store)],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=3600,
        check=False,
    )
    err = proc.stderr
    wall = re.search(r"Elapsed \(wall clock\) time.*: (.*)", err)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    status = re.search(r"Exit status: (\d+)", err)
    lines = [ln for ln in err.splitlines() if not ln.startswith("\t") and "Command " not in ln]
    return {
        "wall": wall.group(1) if wall else "?",
        "rss": f"{int(rss.group(1)) // 1024} MiB" if rss else "?",
        "exit": status.group(1) if status else "?",
        "traceback": "yes" if "Traceback" in err else "no",
        "says": (lines[-1] if lines else "")[:90],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkout", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--fixtures", default=str(HERE.parent / "shared" / "fixtures"))
    args = parser.parse_args()
    checkouts = [tuple(c.split("=", 1)) for c in args.checkout] or [("this", str(HERE))]
    raw = (Path(args.fixtures) / "golden-enc" / "CONFIG").read_bytes()
    print("| case | checkout | wall | peak RSS | exit | traceback | last line |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "enc"
        shutil.copytree(Path(args.fixtures) / "golden-enc", store)
        for case, damage in CASES.items():
            (store / "CONFIG").write_bytes(damage(raw))
            for name, path in checkouts:
                r = run(Path(path), store)
                print(
                    f"| {case} | {name} | {r['wall']} | {r['rss']} | {r['exit']} | {r['traceback']} |"
                    f" {r['says'].replace('|', '/')} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
