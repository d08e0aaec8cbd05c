"""DESIGN.md's layers, dependencies pointing down only: each package of mmfast imports (at any depth of
its code) only the packages below it."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "mmfast"
#: What each layer may import from mmfast (``_zero``: the ZeRO-3 shape helpers, below every layer).
ALLOWED = {
    "kernels": {"kernels"},
    "ops": {"ops", "kernels"},
    "nn": {"nn", "ops"},
    "patching": {"patching", "nn", "ops", "_zero"},
    "tuning": {"tuning", "patching", "nn", "ops", "_zero"},
}


def _imported_packages(path: pathlib.Path, layer: str) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and (node.module or "").startswith("mmfast."):
                out.add(node.module.split(".")[1])
            elif node.level == 1:
                out.add(layer)
            elif node.level == 2 and node.module:
                out.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("mmfast.")}
    return out


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_dependencies_point_down(layer):
    wrong = {str(p.relative_to(ROOT)): sorted(_imported_packages(p, layer) - ALLOWED[layer])
             for p in (ROOT / layer).glob("*.py")}
    assert not {k: v for k, v in wrong.items() if v}, f"{layer} imports layers above it or beside it"
