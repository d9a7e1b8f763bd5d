"""The house rule on imports: arrows point down only, no circles, no function-local import to dodge one.

The rooms' floors (README "Layout"): a module imports only modules on lower floors."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "pagoda"
FLOORS = [  # lowest first; the README's import line lists them top down
    {"io", "dist", "solvers", "unet", "backbone", "text"},
    {"images", "rundir", "teacher"},
    {"data", "decoder", "grow", "loop"},
    {"classifier", "encoder", "losses", "metrics", "prompts", "report"},
    {"alignment", "discriminators", "draws", "inference"},
    {"control", "evaluate", "stage"},
    {"serve", "train"},
    {"launch", "plan"},
    {"cli"},
]
LAZY = {"cli"}  # the CLI imports a command's room inside the command (start-up time), never to dodge a circle


def pagoda_imports(path: Path) -> tuple[set[str], set[str]]:
    """(module-level, function-local) pagoda modules that a file imports."""
    top, local = set(), set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "pagoda":
                names = [a.name for a in node.names]
            elif node.module.startswith("pagoda."):
                names = [node.module.split(".")[1]]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("pagoda.")]
        (top if node in tree.body else local).update(names)
    return top, local


def test_every_module_imports_only_lower_floors():
    floor = {m: k for k, ms in enumerate(FLOORS) for m in ms}
    files = {p.stem: p for p in PKG.glob("*.py") if p.stem != "__init__"}
    assert set(files) == set(floor), "put every module on a floor (and in the README's import line)"
    for name, path in files.items():
        top, local = pagoda_imports(path)
        up = {m for m in top | local if floor[m] >= floor[name]}
        assert not up, f"pagoda/{name}.py imports {sorted(up)} from its own floor or above"
        assert name in LAZY or not local, f"pagoda/{name}.py imports {sorted(local)} inside a function"
