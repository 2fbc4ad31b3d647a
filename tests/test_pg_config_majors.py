# The per-major and per-host rules of our server configuration (postgres/config.py): 18's io_method
# kept (io_uring only where this host's server can do it), and settings a snapshot may carry that
# cannot work here replaced with a notice instead of a failed start. The real servers' answers to
# these settings are judged end to end in tests/test_e2e_majors.py.
from __future__ import annotations

import pytest

from kloset_blocks.postgres import config as c

RUN = c.Run(sockdir="/run/x/pg", port=5432, hba_file="/run/x/pg/hba", ident_file="/run/x/pg/ident")
GIB = 1 << 30
NO_URING = c.HostLimits(memory=8 * GIB, io_uring=False)
URING = c.HostLimits(memory=8 * GIB, io_uring=True)

CASES = [
    # (id, major, line, host, setting, expected value (None: not written), words of the notice or None)
    ("18-sync-kept", 18, "io_method = sync", NO_URING, "io_method", "sync", None),
    ("18-worker-kept", 18, "io_method = 'worker'", NO_URING, "io_method", "worker", None),
    ("18-io_uring-here", 18, "io_method = io_uring", URING, "io_method", "io_uring", None),
    ("18-io_uring-not-here", 18, "io_method = io_uring", NO_URING, "io_method", "worker",
     "io_method (io_uring is not available here: worker is used)"),
    ("18-bad-value", 18, "io_method = 'posix_aio'", NO_URING, "io_method", None, "io_method (not a known"),
    ("17-has-no-io_method", 17, "io_method = sync", NO_URING, "io_method", None,
     "io_method (not on the allow-list)"),
    ("18-io_workers", 18, "io_workers = 5", NO_URING, "io_workers", "5", None),
    ("17-io_combine_limit", 17, "io_combine_limit = 16", NO_URING, "io_combine_limit", "16", None),
    ("huge-shared_buffers", 16, "shared_buffers = '64TB'", NO_URING, "shared_buffers", None,
     "shared_buffers (more than a quarter of this host's memory"),
    ("huge-in-pages", 16, "shared_buffers = 1000000000", NO_URING, "shared_buffers", None, "shared_buffers"),
    ("sane-shared_buffers", 16, "shared_buffers = 1GB", NO_URING, "shared_buffers", "1GB", None),
    ("sane-in-pages", 15, "shared_buffers = 16384", NO_URING, "shared_buffers", "16384", None),
    ("missing-extension-preloaded", 17, "shared_preload_libraries = 'no_such_ext'", NO_URING,
     "shared_preload_libraries", "", "replaced by ours: shared_preload_libraries"),
]  # fmt: skip


@pytest.mark.parametrize(("major", "line", "host", "name", "value", "notice"), [k[1:] for k in CASES],
                         ids=[k[0] for k in CASES])  # fmt: skip
def test_per_major_and_host_rules(
    major: int, line: str, host: c.HostLimits, name: str, value: str | None, notice: str | None
) -> None:
    cfg = c.build([("postgresql.auto.conf", line + "\n")], major, RUN, None, host)
    assert cfg.settings.get(name) == value
    written = {ln.name: ln.value for ln in c.parse(cfg.text, "ours").lines}
    assert written.get(name) == value  # what the server will read
    notices = " / ".join(cfg.notices())
    if notice is None:
        assert name not in notices
    else:
        assert notice in notices, notices


def test_without_host_limits_nothing_is_judged_by_the_host() -> None:
    cfg = c.build([("postgresql.conf", "shared_buffers = '64TB'\nio_method = io_uring\n")], 18, RUN)
    assert cfg.settings["shared_buffers"] == "64TB" and cfg.settings["io_method"] == "io_uring"
