# The PostgreSQL binaries for a snapshot's major version: the server (postgres, pg_ctl) and the
# client tools (psql, pg_dump, pg_amcheck).
#
# Strategy: candidate bin directories, in order: the user's (`--pg-bindir DIR`, repeatable, and
# $KLOSET_BLOCKS_PG_BINDIR, a colon-separated list: the option's directories come first), then where
# distributions put each major (Debian/Ubuntu /usr/lib/postgresql/N/bin, RHEL/PGDG /usr/pgsql-N/bin),
# then `pg_config --bindir`, then the directories of $PATH. A candidate is the server of major N only
# if its `postgres --version` says N: a directory's name proves nothing (the user's list may hold
# several majors, PATH's postgres may be any). Client tools of the same major are preferred; else the
# oldest newer one (newer clients speak to older servers); else the newest older one, with a notice
# (an older psql works for most things, not all: the caller says so).
#
# Invariants: nothing here runs anything but `<dir>/postgres --version`, `<dir>/<tool> --version` and
# `pg_config --bindir` (each answer cached per path); an unparseable answer is no match, never an
# error. Roots are parameters (`Roots`), so the discovery is testable on fake directories.
from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kloset_blocks.errors import PgError

BINDIR_ENV = "KLOSET_BLOCKS_PG_BINDIR"
DEBIAN_LIB = Path("/usr/lib/postgresql")
RHEL_PREFIX = Path("/usr")  # /usr/pgsql-N/bin
SERVER = "postgres"


@dataclass(frozen=True)
class Roots:
    """Where to look: the user's directories, the distributions' roots, pg_config and PATH."""

    user: tuple[Path, ...] = ()
    debian: Path = DEBIAN_LIB
    rhel: Path = RHEL_PREFIX
    pg_config: bool = True
    path: tuple[Path, ...] = field(default_factory=tuple)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Roots:
        env = os.environ if env is None else env
        return cls(user=split_dirs(env.get(BINDIR_ENV, "")), path=split_dirs(env.get("PATH", "")))


def split_dirs(text: str) -> tuple[Path, ...]:
    return tuple(Path(p) for p in text.split(os.pathsep) if p)


def use_bindirs(dirs: Sequence[str] | None, env: dict[str, str] | None = None) -> None:
    """`--pg-bindir DIR...` at the CLI edge: put them first in $KLOSET_BLOCKS_PG_BINDIR, the one place
    every layer (and every child kloset-blocks) looks. Relative paths are made absolute."""
    if not dirs:
        return
    env = os.environ if env is None else env  # type: ignore[assignment]
    assert env is not None
    ours = [str(Path(d).absolute()) for d in dirs]
    rest = [p for p in env.get(BINDIR_ENV, "").split(os.pathsep) if p]
    env[BINDIR_ENV] = os.pathsep.join(ours + rest)


def major_of(version_line: str) -> str | None:
    """The major of a `--version` line: 18.4 -> "18", 9.6.24 -> "9.6", 18beta1 -> "18"."""
    m = re.search(r"\)\s+(\d+)(?:\.(\d+))?", version_line)
    if not m:
        return None
    first = int(m.group(1))
    if first >= 10:
        return str(first)
    return f"{first}.{m.group(2)}" if m.group(2) is not None else None


@functools.lru_cache(maxsize=256)
def _version_line(exe: str, mtime_ns: int) -> str:
    try:
        p = subprocess.run(
            [exe, "--version"], capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return p.stdout.strip() if p.returncode == 0 else ""


def tool_major(bindir: Path, tool: str) -> str | None:
    """The major version `<bindir>/<tool> --version` reports, or None (absent, not executable, odd)."""
    exe = bindir / tool
    try:
        st = exe.stat()
    except OSError:
        return None
    if not exe.is_file() or not os.access(exe, os.X_OK):
        return None
    return major_of(_version_line(str(exe), st.st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _pg_config_bindir(path: str) -> Path | None:
    exe = shutil.which("pg_config", path=path)
    if exe is None:
        return None
    try:
        p = subprocess.run(
            [exe, "--bindir"], capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.SubprocessError):
        return None
    out = p.stdout.strip()
    return Path(out) if p.returncode == 0 and out.startswith("/") else None


def candidates(major: str, roots: Roots) -> list[Path]:
    """Every directory that may hold major's server, in order of preference, without duplicates."""
    return _ordered(roots, [roots.debian / major / "bin", roots.rhel / f"pgsql-{major}" / "bin"])


def all_bindirs(roots: Roots) -> list[Path]:
    """Every bin directory that may hold some PostgreSQL's tools (for the client tools' search)."""
    distributions: list[Path] = []
    for pattern_root, pattern in ((roots.debian, "*/bin"), (roots.rhel, "pgsql-*/bin")):
        with contextlib.suppress(OSError):
            distributions += sorted(pattern_root.glob(pattern))
    return _ordered(roots, distributions)


def _ordered(roots: Roots, distributions: list[Path]) -> list[Path]:
    """The user's directories, the distributions', pg_config's, PATH's: once each, in that order."""
    dirs = [*roots.user, *distributions]
    if roots.pg_config:
        found = _pg_config_bindir(os.pathsep.join(map(str, roots.path)))
        if found is not None:
            dirs.append(found)
    return _unique([*dirs, *roots.path])


def _unique(dirs: Iterable[Path]) -> list[Path]:
    seen: set[Path] = set()
    out = []
    for d in dirs:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def server_bindir(major: str, roots: Roots | None = None) -> Path:
    """The first candidate whose `postgres --version` is major; else a PgError naming how to get it."""
    roots = roots or Roots.from_env()
    mismatched = []
    for d in candidates(major, roots):
        found = tool_major(d, SERVER)
        if found == major:
            return d
        if found is not None and d in roots.user:
            mismatched.append(f"{d} holds PostgreSQL {found}")
    seen = f" ({'; '.join(mismatched)})" if mismatched else ""
    raise PgError(
        f"the snapshot is PostgreSQL {major}, whose server is not installed here{seen}: "
        f"apt-get install postgresql-{major} (Debian/Ubuntu), dnf install "
        f"postgresql{major.replace('.', '')}-server (RHEL, PGDG), or give its bin directory with "
        f"--pg-bindir DIR (or ${BINDIR_ENV})"
    )


@dataclass(frozen=True)
class Client:
    """A client tool for a server of some major: its path, its major, and why it is not the same."""

    path: Path
    major: str
    notice: str | None = None


def _key(major: str) -> tuple[int, ...]:
    return tuple(int(x) for x in major.split("."))


def find_client(tool: str, major: str, server_dir: Path | None = None, roots: Roots | None = None) -> Client:
    """`tool` (psql, pg_dump, pg_amcheck) for a server of `major`: the server's own directory, else
    the same major anywhere, else the oldest newer one, else the newest older one with a notice."""
    if server_dir is not None and tool_major(server_dir, tool) == major:
        return Client(server_dir / tool, major)  # the usual case: nothing else is run
    roots = roots or Roots.from_env()
    found: dict[str, Path] = {}
    for d in all_bindirs(roots):
        m = tool_major(d, tool)
        if m is not None and m not in found:
            found[m] = d / tool
    if not found:
        raise PgError(
            f"no {tool} installed: apt-get install postgresql-client-{major} (Debian/Ubuntu), "
            f"or give its bin directory with --pg-bindir DIR"
        )
    if major in found:
        return Client(found[major], major)
    want = _key(major)
    newer = sorted((m for m in found if _key(m) > want), key=_key)
    if newer:
        return Client(found[newer[0]], newer[0], f"using {tool} {newer[0]} for the PostgreSQL {major} server")
    older = max(found, key=_key)
    return Client(
        found[older],
        older,
        f"using {tool} {older}, older than the PostgreSQL {major} server (most things work, not all): "
        f"install {tool} {major} or newer for the rest",
    )
