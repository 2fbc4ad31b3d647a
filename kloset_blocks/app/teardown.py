# `kloset-blocks down` and `pg stop` from any process: teardown of run directories with every
# layer's teardown steps registered. Each layer registers the steps for what it starts when it is
# imported (host.backing: nbdkit; postgres.server: the server; fuse.record: FUSE views; app.check:
# the fetch report), so a process that tears down chains it did not start itself imports them all
# here first.
from __future__ import annotations

import kloset_blocks.app.check
import kloset_blocks.fuse.record
import kloset_blocks.host.backing
import kloset_blocks.postgres.server  # noqa: F401  (registration is the import's purpose)
from kloset_blocks.host.teardown import teardown_all, teardown_run_dir

__all__ = ["teardown_all", "teardown_run_dir"]
