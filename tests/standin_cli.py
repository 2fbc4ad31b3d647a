# The real `kloset-blocks` CLI with the nbdkit command swapped for a stand-in: nbdkit's C file plugin
# serving an ext4 image file. Usage: python tests/standin_cli.py IMAGE ARGS...
# (STORE and SNAP are still parsed, and ignored by the stand-in: app.check.prepare, which opens the
# store and checks the snapshot in-process, is replaced too.)
from __future__ import annotations

import sys

from kloset_blocks import cli
from kloset_blocks.app import check
from kloset_blocks.host.backing import NbdkitBacking
from kloset_blocks.serving import nbdkit


def main() -> int:
    image, args = sys.argv[1], sys.argv[2:]
    argv = ["nbdkit", "file", f"file={image}"]
    nbdkit.nbdkit_argv = lambda *a, **k: (argv, {})  # type: ignore[assignment]
    check.prepare = lambda *a, **k: check.Served(NbdkitBacking(argv))  # type: ignore[assignment]
    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main())
