# `query` serves every snapshot from one nbdkit: one dying chain must not take the others down. The
# shared nbdkit is started exactly as `query` starts it (QueryRun.nbdkit(), StandaloneServer), on the
# golden fixture; the clients of one export die with reads in flight (libnbd in a process that is
# SIGKILLed), the way a chain's qemu-storage-daemon dies, while a client of the other export reads on.
#
# Oracle: the same export built in this process (the plugin's Server, same options); nbdkit's pid
# (with its start time) still alive. bench/nbdkit_client_death.py shows the same clients abort an
# nbdkit 1.32.5 with two threads a connection.
from __future__ import annotations

import random
import signal
import subprocess
import sys
from pathlib import Path

import nbd
import pytest

from kloset_blocks import postgres
from kloset_blocks.app.query import QueryOptions, QueryRun
from kloset_blocks.host.backing import NbdkitBacking, StandaloneServer
from kloset_blocks.host.procs import proc_alive
from kloset_blocks.store import open_store
from tests.conftest import FIXTURES, server_for

pytestmark = [pytest.mark.root]

GOLDEN = FIXTURES / "golden-plain"
A, B = "bf6afbae", "3b116f40"
DEATHS = 8

# One chain's client: connects to export argv[2], queues 64 reads of 256 KiB, says so, and waits to
# be killed with them in flight.
DYING_CLIENT = r"""
import nbd, sys, time
h = nbd.NBD()
h.set_export_name(sys.argv[2])
h.connect_uri("nbd+unix:///" + sys.argv[2] + "?socket=" + sys.argv[1])
size = h.get_size()
bufs = [nbd.Buffer(256 * 1024) for _ in range(64)]
for i, b in enumerate(bufs):
    h.aio_pread(b, (i * 7919 * 256 * 1024) % (size - 256 * 1024))
print("queued", flush=True)
time.sleep(60)
"""


def test_a_dying_client_leaves_the_other_exports_answering(run_root: Path, tmp_path: Path) -> None:
    with open_store(f"fs:{GOLDEN}") as store:
        infos = [store.find_snapshot(A), store.find_snapshot(B)]
        run = QueryRun(f"fs:{GOLDEN}", store, infos, QueryOptions(sql="", run_root=str(run_root)))
        run._tmp = tmp_path  # where the stats file goes, as in run()
        argv, env = run.nbdkit()
    assert "--threads=1" in argv
    server = StandaloneServer(NbdkitBacking(argv, env), run_root=run_root).up()
    try:
        assert server.run is not None
        nbdkit_rec = server.run.state["nbdkit"]
        oracle = server_for(GOLDEN, "pgdata=true", f"owner={postgres.PG_USER}", snapshot=B)
        image = oracle.exports[oracle.default_export].image
        steady = nbd.NBD()
        steady.set_export_name(infos[1].hex_id)
        steady.connect_uri(f"nbd+unix:///{infos[1].hex_id}?socket={server.socket}")
        assert steady.get_size() == image.size
        rng = random.Random(16)
        for death in range(DEATHS):
            c = subprocess.Popen(
                [sys.executable, "-c", DYING_CLIENT, str(server.socket), infos[0].hex_id],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )  # fmt: skip
            assert c.stdout is not None and c.stdout.readline().strip() == "queued"
            c.send_signal(signal.SIGKILL)
            c.wait()
            for _ in range(8):  # the other snapshot's client reads on, and gets the right bytes
                off = rng.randrange(0, image.size - 65536) & ~4095
                assert steady.pread(65536, off) == image.pread(off, 65536), (death, off)
            assert proc_alive(nbdkit_rec), f"nbdkit died after {death + 1} client death(s)"
        steady.shutdown()
    finally:
        server.teardown()
