# The package's layers, in the order of the data flow (design.md): a module imports only modules of
# its own layer or of layers below it, at module level or inside a function alike. Read from the
# source with ast: no import of the code under test.
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "kloset_blocks"
# Lowest first. The core modules (errors, units, the tree contract, the data-directory rule) are
# below everything.
LAYERS = [
    {"errors", "units", "tree", "pgdata", "names", "__init__"},
    {"store"},
    {"writer"},
    {"ext4"},
    {"image"},
    {"serving"},
    {"host"},
    {"postgres"},
    {"fuse"},
    {"app"},
    {"web"},
    {"demo"},
    {"commands", "cli", "__main__"},
]


def layer_of(module: str) -> int:
    """kloset_blocks.a.b -> the layer of `a`."""
    top = module.split(".")[1] if "." in module else "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: in no layer (add it to LAYERS)")


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        out.append((".".join(rel.parts).removesuffix(".__init__"), path))
    return out


def imported(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            if node.module == "kloset_blocks":  # from kloset_blocks import postgres
                found |= {f"kloset_blocks.{a.name}" for a in node.names if a.name != "__version__"}
    return {m for m in found if m == "kloset_blocks" or m.startswith("kloset_blocks.")}


@pytest.mark.parametrize(("module", "path"), modules(), ids=[m for m, _ in modules()])
def test_imports_only_its_layer_or_below(module: str, path: Path) -> None:
    mine = layer_of(module)
    above = sorted(m for m in imported(path) if m != "kloset_blocks" and layer_of(m) > mine)
    assert not above, f"{module} (layer {mine}) imports {above}"


def test_the_checker_sees_every_import_form(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text(
        "import kloset_blocks.app.query\n"
        "from kloset_blocks import postgres, __version__\n"
        "def f():\n    from kloset_blocks.web.server import x\n"
    )
    assert imported(src) == {"kloset_blocks.app.query", "kloset_blocks", "kloset_blocks.postgres",
                             "kloset_blocks.web.server"}  # fmt: skip
    assert layer_of("kloset_blocks.host.chain") < layer_of("kloset_blocks.app.query")
