# Names from a snapshot are data: escape_name quotes them as GNU ls does on a terminal (the oracle:
# `ls --quoting-style=shell-escape` on real files of those names), and the listings (`ls`,
# `snapshots`, query's table) never print a control character raw; a name with a NUL byte is one
# clear error line for a command that must create it (restore), never a traceback.
from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import kloset_blocks.writer.store as writer_store
from kloset_blocks.app.report import render_table
from kloset_blocks.names import escape_name, visible
from tests.store_helpers import assert_one_line_error, run_cli

NAMES = [
    b"plain.txt", b"a b", b"a\nb", b"\x1b[31mred", b"it's", b"a'b$", b"tab\tx", b"\xff\xfe", b"caf\xc3\xa9",
    b"\xc2\x9b", b"del\x7f", b"a'\nb", b"\n\nb", b"it's a",
    b"~home", b"#hash", b"x=1,y:2@z", b"back\\slash", b"q\"uote", b"*", b" lead",
]  # fmt: skip


@pytest.mark.parametrize("name", NAMES, ids=[repr(n) for n in NAMES])
def test_escape_name_is_gnu_ls_on_a_terminal(tmp_path: Path, name: bytes) -> None:
    (Path(os.fsdecode(tmp_path)) / os.fsdecode(name)).touch()
    ls = subprocess.run(
        ["ls", "--quoting-style=shell-escape", "-d", "--", os.fsdecode(name)],
        cwd=tmp_path, capture_output=True, check=True, env={**os.environ, "LC_ALL": "C.UTF-8"},
    )  # fmt: skip
    assert escape_name(name) == ls.stdout.decode().rstrip("\n")


@pytest.mark.parametrize("name", NAMES, ids=[repr(n) for n in NAMES])
def test_escaped_names_have_no_control_characters(name: bytes) -> None:
    for shown in (escape_name(name), visible(name.decode("utf-8", "surrogateescape"))):
        assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in shown), shown
        shown.encode("utf-8")  # printable: no lone surrogate left


def test_query_table_shows_control_characters_escaped() -> None:
    lines = render_table(["na\x1bme"], [["a\nb"], ["\x1b[2J"], [None]])
    assert "\x1b" not in "".join(lines) and "\n" not in "".join(lines)
    assert lines[0].strip() == "na\\033me" and lines[2].strip() == "a\\nb" and lines[3].strip() == "\\033[2J"


@pytest.fixture(scope="module")
def hostile_names_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A store whose snapshot holds names with a newline, an escape sequence and a NUL byte (no
    file system can hold the last: the writer's importer is given it directly)."""
    work = tmp_path_factory.mktemp("names")
    src = work / "src"
    src.mkdir()
    for name in (b"a\nb", b"\x1b[31mred", b"nulname", b"plain"):
        (Path(os.fsdecode(src)) / os.fsdecode(name)).write_bytes(b"x")
    real = writer_store._open_source

    def with_nul(source: object) -> tuple[str, Iterator]:
        importer, items = real(source)

        def renamed() -> Iterator:
            for item in items:
                if item.name == b"nulname":
                    item.name, item.path = b"nul\0name", b"/nul\0name"
                yield item

        return importer, renamed()

    mp = pytest.MonkeyPatch()
    mp.setattr(writer_store, "_open_source", with_nul)
    try:
        writer_store.write_store(work / "store", src, seed=7)
    finally:
        mp.undo()
    yield work / "store"


@pytest.mark.parametrize("long", [False, True])
def test_ls_escapes_names(hostile_names_store: Path, long: bool) -> None:
    res = run_cli("ls", *(["-l"] if long else []), str(hostile_names_store), "latest:/")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.decode().splitlines()
    names = [ln.rsplit(" ", 1)[-1] if long else ln for ln in lines]
    assert names == ["''$'\\033''[31mred'", "'a'$'\\n''b'", "'nul'$'\\000''name'", "plain"]
    assert b"\x1b" not in res.stdout and b"\0" not in res.stdout


def test_restore_of_a_nul_name_is_one_clear_line(hostile_names_store: Path, tmp_path: Path) -> None:
    res = run_cli("restore", str(hostile_names_store), "latest", str(tmp_path / "out"))
    assert_one_line_error(res, "holds a NUL byte", "'/nul'$'\\000''name'")


def test_image_of_a_nul_name_is_one_clear_line(hostile_names_store: Path, tmp_path: Path) -> None:
    res = run_cli("image", str(hostile_names_store), "latest", str(tmp_path / "x.img"))
    assert_one_line_error(res, "name contains NUL")
