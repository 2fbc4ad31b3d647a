# Finding the PostgreSQL binaries (kloset_blocks.postgres.binaries), table-driven, on fake bin
# directories in tmp: tiny executable scripts that print what `postgres --version` prints. What is
# judged is the discovery (order, the version check, the error's words), not the servers: the
# end-to-end tests run real servers of every major.
from __future__ import annotations

import os
from pathlib import Path

import pytest

from kloset_blocks.errors import PgError
from kloset_blocks.postgres import binaries as b


def fake_tool(bindir: Path, tool: str, version: str) -> Path:
    bindir.mkdir(parents=True, exist_ok=True)
    exe = bindir / tool
    exe.write_text(f"#!/bin/sh\necho '{tool} (PostgreSQL) {version}'\n")
    exe.chmod(0o755)
    return exe


# Layout: name -> (relative bin directory, {tool: version}). Roots: debian=deb/, rhel=usr/.
LAYOUT = {
    "deb15": ("deb/15/bin", {"postgres": "15.18", "psql": "15.18", "pg_amcheck": "15.18"}),
    "deb17-lies": ("deb/17/bin", {"postgres": "16.4"}),  # a directory's name proves nothing
    "rhel16": ("usr/pgsql-16/bin", {"postgres": "16.14", "psql": "16.14"}),
    "user18": ("mine/18", {"postgres": "18.4"}),
    "user17": ("mine/17", {"postgres": "17.10"}),
    "path13": ("opt/pg13/bin", {"postgres": "13.23", "psql": "13.23"}),
    "path19": ("opt/pg19/bin", {"psql": "19beta1"}),
    "old96": ("deb/9.6/bin", {"postgres": "9.6.24"}),
}

SERVER_CASES = [
    # (id, user dirs, PATH dirs, major, expected bin dir name or None for the error)
    ("debian", [], [], "15", "deb15"),
    ("rhel", [], [], "16", "rhel16"),
    ("user-first", ["user18"], [], "18", "user18"),
    ("user-list-many-majors", ["user18", "user17"], [], "17", "user17"),
    ("user-wrong-major-falls-through", ["user18"], [], "15", "deb15"),
    ("path", [], ["path13"], "13", "path13"),
    ("pre-10-major", [], [], "9.6", "old96"),
    ("name-says-17-but-is-16", [], [], "17", None),
    ("absent", ["user18"], ["path13"], "14", None),
]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for rel, tools in LAYOUT.values():
        for tool, version in tools.items():
            fake_tool(tmp_path / rel, tool, version)
    return tmp_path


def roots(tree: Path, user: list[str], path: list[str]) -> b.Roots:
    return b.Roots(
        user=tuple(tree / LAYOUT[u][0] for u in user),
        debian=tree / "deb",
        rhel=tree / "usr",
        pg_config=False,
        path=tuple(tree / LAYOUT[p][0] for p in path),
    )


@pytest.mark.parametrize(("user", "path", "major", "expected"), [c[1:] for c in SERVER_CASES],
                         ids=[c[0] for c in SERVER_CASES])  # fmt: skip
def test_server_bindir(
    tree: Path, user: list[str], path: list[str], major: str, expected: str | None
) -> None:
    r = roots(tree, user, path)
    if expected is not None:
        assert b.server_bindir(major, r) == tree / LAYOUT[expected][0]
        return
    with pytest.raises(PgError) as e:
        b.server_bindir(major, r)
    msg = str(e.value)
    assert f"PostgreSQL {major}, whose server is not installed here" in msg
    assert f"apt-get install postgresql-{major} (Debian/Ubuntu)" in msg
    assert f"dnf install postgresql{major.replace('.', '')}-server (RHEL, PGDG)" in msg
    assert "--pg-bindir DIR" in msg
    if user:
        assert f"{tree / LAYOUT[user[0]][0]} holds PostgreSQL 18" in msg


CLIENT_CASES = [
    # (id, user dirs, PATH dirs, tool, server major, expected dir name, expected major, notice words)
    ("same-major-in-the-server-dir", [], [], "psql", "15", "deb15", "15", None),
    ("same-major-elsewhere", [], ["path13"], "psql", "16", "rhel16", "16", None),
    ("oldest-newer", [], ["path13"], "psql", "14", "deb15", "15", "using psql 15 for the PostgreSQL 14"),
    ("newer-beta", [], ["path19"], "psql", "17", "path19", "19", "using psql 19 for"),
    ("older-with-notice", [], ["path13"], "psql", "18", "rhel16", "16", "older than the PostgreSQL 18"),
    ("amcheck-older", [], [], "pg_amcheck", "18", "deb15", "15", "using pg_amcheck 15, older"),
]


@pytest.mark.parametrize(("user", "path", "tool", "major", "expected", "exp_major", "notice"),
                         [c[1:] for c in CLIENT_CASES], ids=[c[0] for c in CLIENT_CASES])  # fmt: skip
def test_find_client(
    tree: Path,
    user: list[str],
    path: list[str],
    tool: str,
    major: str,
    expected: str,
    exp_major: str,
    notice: str | None,
) -> None:
    r = roots(tree, user, path)
    server_dir = b.server_bindir(major, r) if major in ("15", "16") else None
    found = b.find_client(tool, major, server_dir, r)
    assert found.path == tree / LAYOUT[expected][0] / tool
    assert found.major == exp_major
    if notice is None:
        assert found.notice is None
    else:
        assert found.notice is not None and notice in found.notice


def test_no_client_at_all_names_the_package(tmp_path: Path) -> None:
    r = b.Roots(debian=tmp_path / "none", rhel=tmp_path / "none", pg_config=False)
    with pytest.raises(PgError, match=r"no pg_dump installed: apt-get install postgresql-client-17"):
        b.find_client("pg_dump", "17", None, r)


@pytest.mark.parametrize(("line", "major"), [
    ("postgres (PostgreSQL) 18.4", "18"),
    ("postgres (PostgreSQL) 16.14 (Debian 16.14-1.pgdg120+1)", "16"),
    ("postgres (PostgreSQL) 9.6.24", "9.6"),
    ("postgres (PostgreSQL) 18beta1", "18"),
    ("postgres (PostgreSQL) 9", None),
    ("something else", None),
    ("", None),
])  # fmt: skip
def test_major_of(line: str, major: str | None) -> None:
    assert b.major_of(line) == major


def test_a_tool_that_is_not_executable_or_fails_is_no_match(tmp_path: Path) -> None:
    fake_tool(tmp_path / "a", "postgres", "17.1").chmod(0o644)
    failing = tmp_path / "b" / "postgres"
    failing.parent.mkdir()
    failing.write_text("#!/bin/sh\necho 'postgres (PostgreSQL) 17.1'\nexit 3\n")
    failing.chmod(0o755)
    assert b.tool_major(tmp_path / "a", "postgres") is None
    assert b.tool_major(tmp_path / "b", "postgres") is None
    assert b.tool_major(tmp_path / "missing", "postgres") is None


def test_pg_bindir_option_goes_first_in_the_environment(tmp_path: Path) -> None:
    env = {b.BINDIR_ENV: "/from/env"}
    b.use_bindirs(["/opt/pg18/bin", "rel"], env)
    assert env[b.BINDIR_ENV].split(os.pathsep) == ["/opt/pg18/bin", str(Path("rel").absolute()), "/from/env"]
    r = b.Roots.from_env({b.BINDIR_ENV: env[b.BINDIR_ENV], "PATH": "/usr/bin:/bin"})
    assert r.user[0] == Path("/opt/pg18/bin") and r.path == (Path("/usr/bin"), Path("/bin"))


def test_pg_config_bindir_is_a_candidate(tmp_path: Path) -> None:
    fake_tool(tmp_path / "pg" / "bin", "postgres", "17.2")
    conf = tmp_path / "cfg" / "pg_config"
    conf.parent.mkdir()
    conf.write_text(f'#!/bin/sh\n[ "$1" = --bindir ] && echo {tmp_path / "pg" / "bin"}\n')
    conf.chmod(0o755)
    r = b.Roots(debian=tmp_path / "none", rhel=tmp_path / "none", path=(tmp_path / "cfg",))
    assert b.server_bindir("17", r) == tmp_path / "pg" / "bin"


def test_the_real_debian_server_is_found() -> None:
    # This machine's PostgreSQL 15 (deps.sh installs it): the real `postgres --version`.
    assert b.server_bindir("15", b.Roots()) == Path("/usr/lib/postgresql/15/bin")
