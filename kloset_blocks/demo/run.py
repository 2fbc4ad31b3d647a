# `make demo`: SQL on a PostgreSQL backup kept in a Kloset store, nothing restored, end to end.
#
# Strategy: the first run builds the store: a throwaway PostgreSQL cluster (kloset_blocks.demo.sample:
# pgbench scale 1 plus a small table), `pg_basebackup -D - -F tar -X fetch -c fast`, written into a
# Kloset store at <repo>/data/demo-store by the project's writer; the live server's psql output for the
# demo queries is saved beside it (demo-answers.json) as the oracle, and the cluster is removed. Later
# runs reuse the store when it opens and has a snapshot, and skip the cluster entirely. Then the real
# `kloset-blocks psql` runs the demo queries on the snapshot, in another process, exactly as a user
# would; its phase timings stream through, and its output is compared with the live server's.
#
# Exit status: 0 when the answers equal the live server's (or none were recorded), else 1.
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kloset_blocks.errors import KlosetError
from kloset_blocks.units import format_size

if TYPE_CHECKING:
    from kloset_blocks.demo.sample import PgCluster

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data"
STORE_NAME = "demo-store"
ANSWERS_NAME = "demo-answers.json"
SCALE = 1

# What the demo asks the backup: psql -X (aligned, headers), database `shop`.
QUERIES = (
    "select count(*) as accounts, sum(abalance) as total_balance from pgbench_accounts",
    "select bid, bbalance from pgbench_branches order by bid",
    "select count(*) as items, min(id) as first_id, max(id) as last_id from items",
    "select id, name from items order by id limit 5",
)


def heading(text: str) -> None:
    print(f"\n== {text} ==", flush=True)


def note(text: str) -> None:
    print(f"   {text}", flush=True)


def psql_args() -> list[str]:
    args = ["-X", "-d", "shop", "-v", "ON_ERROR_STOP=1"]
    for q in QUERIES:
        args += ["-c", q]
    return args


# --- the store ------------------------------------------------------------------------------------


def usable_store(store: Path) -> str | None:
    """The latest snapshot's id if `store` opens and has one, else None (and why, on stdout)."""
    if not store.exists():
        return None
    from kloset_blocks.store import open_store

    try:
        with open_store(str(store)) as st:
            return st.find_snapshot("latest").hex_id
    except (KlosetError, OSError) as e:
        note(f"{store} cannot be used ({e}): building it again")
        return None


def build_store(store: Path, answers: Path) -> str:
    """Throwaway cluster -> pg_basebackup tar -> Kloset store. Returns the snapshot id."""
    from kloset_blocks.demo import sample
    from kloset_blocks.writer.store import write_store

    t0 = time.monotonic()
    cluster = sample.make_cluster(SCALE)
    try:
        note(f"cluster: initdb, pgbench -i -s {SCALE} and a small table ({time.monotonic() - t0:.1f} s)")
        live = live_output(cluster)
        with tempfile.TemporaryDirectory(prefix="kb-demo-") as tmp:
            t1 = time.monotonic()
            tar = cluster.basebackup(Path(tmp) / "base.tar", wal="fetch")
            size = tar.stat().st_size
            note(
                f"pg_basebackup -F tar -X fetch -c fast: {format_size(size)} ({time.monotonic() - t1:.1f} s)"
            )
            cluster.cleanup()  # the live server is no longer needed: only the backup is queried
            t2 = time.monotonic()
            if store.exists():
                shutil.rmtree(store)
            snap = write_store(store, tar, passphrase=None, hostname="kloset-blocks-demo")
        du = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
        took = time.monotonic() - t2
        note(f"Kloset store {store}: snapshot {snap[:8]}, {format_size(du)} on disk ({took:.1f} s)")
    finally:
        cluster.cleanup()  # idempotent
    answers.write_text(
        json.dumps({"snapshot": snap, "queries": list(QUERIES), "psql_output": live}, indent=1) + "\n"
    )
    return snap


def live_output(cluster: PgCluster) -> str:
    """The live server's output for the demo queries: the oracle for the snapshot's."""
    from kloset_blocks.demo import sample

    argv = [str(sample.BINDIR / "psql"), "-h", str(cluster.base), "-p", str(sample.PORT), *psql_args()]
    return sample.as_postgres(argv).stdout


# --- the query ------------------------------------------------------------------------------------


def run_psql(store: Path, snap: str) -> tuple[int, str, str, float]:
    """`kloset-blocks psql STORE SNAP -- ...` in another process: (status, stdout, stderr, seconds).
    Its progress lines are shown as they come."""
    argv = [sys.executable, "-m", "kloset_blocks", "psql", str(store), snap[:8], "--", *psql_args()]
    rel = os.path.relpath(store)
    where = str(store) if rel.startswith("..") else rel
    shown = f"kloset-blocks psql {where} {snap[:8]} -- -d shop -c ..."
    print(f"   $ {shown}", flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None and proc.stdout is not None
    err_lines = []
    for line in proc.stderr:  # psql's output is small: its pipe cannot fill while we read this one
        err_lines.append(line)
        note(f"  {line.rstrip()}")
    out = proc.stdout.read()
    status = proc.wait()
    return status, out, "".join(err_lines), time.monotonic() - t0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kloset_blocks.demo", description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=DATA, help=f"where the demo store lives ({DATA})")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print(
            "kloset-blocks demo: must run as root (loop devices, mounts, the postgres user)", file=sys.stderr
        )
        return 1
    data: Path = args.data_dir.absolute()
    store, answers = data / STORE_NAME, data / ANSWERS_NAME
    t_all = time.monotonic()
    print("kloset-blocks demo: SQL on a PostgreSQL backup in a Kloset store, nothing restored", flush=True)

    heading("1. The backup")
    snap = usable_store(store)
    try:
        if snap is not None:
            note(f"reusing {store} (snapshot {snap[:8]}); remove it to build a new one")
        else:
            data.mkdir(parents=True, exist_ok=True)
            snap = build_store(store, answers)
    except (KlosetError, subprocess.CalledProcessError, OSError) as e:
        detail = getattr(e, "stderr", "") or ""
        print(f"kloset-blocks demo: building the store failed: {e} {detail}".strip(), file=sys.stderr)
        return 1

    heading("2. kloset-blocks psql on the snapshot")
    status, out, err, seconds = run_psql(store, snap)
    print(out, end="", flush=True)
    if status != 0:
        print(f"kloset-blocks demo: kloset-blocks psql failed (exit {status})", file=sys.stderr)
        return 1

    heading("3. Result")
    ok = check_answers(answers, snap, out)
    times = phase_times(err)
    if "open" in times and "ready" in times:
        ready = times["open"] + times["ready"]
        note(f"PostgreSQL ready on the snapshot {ready:.2f} s after the command started")
    for line in err.splitlines():
        if line.startswith("fetched "):
            note(line)
    note(
        f"kloset-blocks psql, start to teardown: {seconds:.1f} s; whole demo {time.monotonic() - t_all:.1f} s"
    )
    return 0 if ok else 1


def phase_times(progress: str) -> dict[str, float]:
    """{"serve": 0.22, ...} from the progress lines ("serve 0.22 s")."""
    times = {}
    for line in progress.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] == "s":
            with contextlib.suppress(ValueError):
                times[parts[0]] = float(parts[1])
    return times


def check_answers(answers: Path, snap: str, out: str) -> bool:
    try:
        recorded = json.loads(answers.read_text())
    except (OSError, ValueError):
        note("no record of the live server's answers (demo-answers.json): nothing to compare")
        return True
    if recorded.get("snapshot") != snap or recorded.get("queries") != list(QUERIES):
        note("the recorded live answers are for another snapshot or other queries: nothing to compare")
        return True
    if recorded.get("psql_output") == out:
        note("the answers equal the live server's at backup time")
        return True
    note("MISMATCH: the answers differ from the live server's at backup time, which were:")
    print(recorded.get("psql_output", ""), end="")
    return False


if __name__ == "__main__":
    sys.exit(main())
