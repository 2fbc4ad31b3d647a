# Does an nbdkit survive its clients dying with replies in flight? nbdkit 1.32.5 (Debian 12) can abort
# with `raw_send_socket: Assertion 'sock >= 0' failed` when a client dies while several threads of
# its connection still have replies to send, and that abort kills every other connection.
#
# For each configuration: one nbdkit (nbdkit's own `memory` plugin, or this project's plugin when
# --store is given) on a Unix socket; ROUNDS times, a client process opens a connection, queues
# many reads (libnbd aio) and is SIGKILLed with them in flight, while a steady client on its own
# connection keeps reading. Prints, per configuration, whether nbdkit survived, after how many
# rounds it died, and the line it died with.
#
#   .venv/bin/python bench/nbdkit_client_death.py --rounds 200
#   .venv/bin/python bench/nbdkit_client_death.py --rounds 50 --store ../shared/fixtures/golden-plain
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CLIENT = r"""
import nbd, os, sys, time
h = nbd.NBD()
h.set_export_name(sys.argv[2])
h.connect_uri("nbd+unix:///" + sys.argv[2] + "?socket=" + sys.argv[1])
size = h.get_size()
n = int(sys.argv[3])
buf = [nbd.Buffer(256 * 1024) for _ in range(n)]
for i in range(n):
    h.aio_pread(buf[i], (i * 7919 * 256 * 1024) % (size - 256 * 1024))
print("queued", flush=True)
time.sleep(30)
"""


def start(argv: list[str], sock: Path, log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log, "wb") as f:
        p = subprocess.Popen([*argv[:1], "-f", "-U", str(sock), *argv[1:]], stdout=f, stderr=f, env=env)
    deadline = time.monotonic() + 60
    while not sock.exists():
        if p.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"nbdkit did not start: {log.read_text()[-500:]}")
        time.sleep(0.05)
    return p


def one_config(
    name: str, argv: list[str], export: str, rounds: int, inflight: int, env: dict[str, str]
) -> str:
    with tempfile.TemporaryDirectory(prefix="kb-death-") as tmp:
        sock, log = Path(tmp) / "s", Path(tmp) / "log"
        server = start(argv, sock, log, env)
        steady = subprocess.Popen(
            [sys.executable, "-c", "import nbd,sys\nh=nbd.NBD()\nh.set_export_name(sys.argv[2])\n"
             "h.connect_uri('nbd+unix:///'+sys.argv[2]+'?socket='+sys.argv[1])\n"
             "s=h.get_size()\ni=0\nwhile True:\n h.pread(65536,(i*65536)%(s-65536)); i+=1\n",
             str(sock), export],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        died_at = None
        try:
            for r in range(rounds):
                c = subprocess.Popen(
                    [sys.executable, "-c", CLIENT, str(sock), export, str(inflight)],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                assert c.stdout is not None
                c.stdout.readline()  # the reads are queued
                time.sleep(0.002 * (r % 5))  # vary the instant: some replies sent, some not
                c.send_signal(signal.SIGKILL)
                c.wait()
                if server.poll() is not None:
                    died_at = r + 1
                    break
            time.sleep(0.3)
            if server.poll() is not None and died_at is None:
                died_at = rounds
        finally:
            steady_alive = steady.poll() is None
            steady.kill()
            steady.wait()
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)
                server.wait(timeout=30)
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if "ssert" in ln or "rror" in ln]
        if died_at is None:
            steady = "still reading" if steady_alive else "FAILED"
            return f"{name}: survived {rounds} client deaths; steady client {steady}"
        return f"{name}: nbdkit DIED after {died_at} client death(s): {tail[-1] if tail else '(no message)'}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--inflight", type=int, default=64)
    ap.add_argument("--store", help="use the project's plugin on this store instead of `memory`")
    ap.add_argument("--configs", default="t16,t2,t1,t2-noparallel")
    args = ap.parse_args()
    env = dict(os.environ)
    if args.store:
        site = (
            REPO
            / ".venv"
            / "lib"
            / f"python{sys.version_info.major}.{sys.version_info.minor}"
            / "site-packages"
        )
        env["PYTHONPATH"] = f"{REPO}:{site}"
        plugin = ["python", str(REPO / "nbdplugin" / "kloset.py"), f"store={args.store}", "pgdata=true",
                  "lazy=true"]  # fmt: skip
        export = ""
    else:
        plugin = ["memory", "size=1G"]
        export = ""
    configs = {
        "t16": ["nbdkit", "-r", "--threads=16", *plugin],
        "t2": ["nbdkit", "-r", "--threads=2", *plugin],
        "t1": ["nbdkit", "-r", "--threads=1", *plugin],
        "t2-noparallel": [
            "nbdkit",
            "-r",
            "--threads=2",
            "--filter=noparallel",
            *plugin,
            "serialize=requests",
        ],
    }
    for name in args.configs.split(","):
        print(one_config(name, configs[name], export, args.rounds, args.inflight, env), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
