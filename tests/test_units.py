from __future__ import annotations

import pytest

from kloset_blocks.errors import UsageError
from kloset_blocks.units import format_size, parse_size

SIZES = [
    ("4096", 4096),
    ("64k", 64 << 10),
    ("64K", 64 << 10),
    ("512M", 512 << 20),
    ("512MiB", 512 << 20),
    ("2G", 2 << 30),
    ("2gb", 2 << 30),
    ("1.5G", 3 << 29),
    ("1T", 1 << 40),
]


@pytest.mark.parametrize(("text", "expected"), SIZES)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "M", "12X", "-5", "1,5G", "ten"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="not a size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (512, "512 B"), (1536, "1.5 KiB"), (12 << 20, "12 MiB"), (int(3.25 * (1 << 30)), "3.2 GiB")],
)
def test_format_size(n: int, text: str) -> None:
    assert format_size(n) == text
