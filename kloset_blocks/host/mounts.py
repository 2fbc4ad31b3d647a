# What the kernel has mounted and attached: the one /proc/mounts parser, and loop devices by their
# backing file (from sysfs, so no dependency on losetup's output format).
from __future__ import annotations

from pathlib import Path


def mounts() -> list[tuple[str, str, str]]:
    """(source, target, fstype) of every mount, octal escapes (\\040 for a space...) decoded."""

    def unescape(s: str) -> str:
        return s.encode().decode("unicode_escape") if "\\" in s else s

    out = []
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                out.append((unescape(parts[0]), unescape(parts[1]), parts[2]))
    return out


def is_mounted(target: Path | str, source: str | None = None) -> bool:
    t = str(target)
    return any(tg == t and (source is None or src == source) for src, tg, _ in mounts())


def loops_on(path: Path | str) -> list[str]:
    """Loop devices whose backing file is `path` (from sysfs: no need for losetup's output format)."""
    found = []
    for d in Path("/sys/block").glob("loop*"):
        try:
            backing = (d / "loop" / "backing_file").read_text().strip()
        except OSError:
            continue
        if backing == str(path):
            found.append(f"/dev/{d.name}")
    return found
