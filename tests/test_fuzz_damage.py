# The damaged-store fuzz loop (tests/fuzz_damage.py) at a few hundred iterations with a fixed
# seed: every read of a randomly damaged store, through the reader and the served image, gives
# the sources' bytes or a one-line KlosetError; never another exception, a hang or a wrong byte.
# `make fuzz` runs it longer with a random seed.
from __future__ import annotations

from tests.fuzz_damage import run


def test_fuzz_damaged_stores() -> None:
    counters = run(iterations=200, seed=20261201, cli_every=100)
    assert counters["cases"] == 200
    # The oracle was consulted: most damage leaves most files readable.
    assert counters["reads_checked"] > 200 * 5 and counters["image_regions_checked"] > 200 * 5
