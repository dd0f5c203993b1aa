"""The package layers (bottom -> top), checked statically: every import of a
project package goes to the same layer or one below it, and the two worker
kinds never import each other (they share only ``worker_common``)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Bottom -> top; packages in one tuple share a layer.
LAYERS = [
    ("protos", "analysis"),
    ("engine",),
    ("kvtransfer",),
    ("worker_common",),
    ("prefill_worker", "decode_worker"),
    ("observability",),
    ("router",),
    ("cluster",),
    ("benchmarks",),
]
LAYER = {pkg: level for level, pkgs in enumerate(LAYERS) for pkg in pkgs}
# Same layer, still never: a worker kind does not reach into the other.
FORBIDDEN_SIDEWAYS = {("decode_worker", "prefill_worker"), ("prefill_worker", "decode_worker")}


def imported_modules(path: Path) -> list[str]:
    """Absolute module names ``path`` imports (function-local imports included)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def violations(root: Path = REPO) -> list[str]:
    """Every import under ``root`` that goes up a layer or sideways between the worker kinds."""
    found = []
    for pkg, level in LAYER.items():
        files = sorted((root / pkg).rglob("*.py"))
        assert files, f"layer package {pkg} has no modules"
        for path in files:
            for name in imported_modules(path):
                target = name.split(".")[0]
                if target not in LAYER:
                    continue  # stdlib or third party
                if LAYER[target] > level or (pkg, target) in FORBIDDEN_SIDEWAYS:
                    found.append(f"{path.relative_to(root)} ({pkg}) imports {name} ({target})")
    return found


def test_every_package_is_in_a_layer():
    """A new top-level package must be placed in LAYERS, or it would go unchecked."""
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")} - {"tests"}
    assert packages <= set(LAYER), sorted(packages - set(LAYER))


def test_imports_only_go_down():
    found = violations()
    assert not found, "\n".join(found)


def test_check_catches_an_upward_import(tmp_path):
    """The check itself: upward and sideways imports in a throwaway tree are reported, downward ones not."""
    for pkg in LAYER:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "router" / "bad.py").write_text("def f():\n    from cluster.config import ClusterConfig\n")
    (tmp_path / "decode_worker" / "bad.py").write_text("import prefill_worker.worker\n")
    (tmp_path / "cluster" / "ok.py").write_text("from router.server import RouterServer\nimport os\n")
    found = violations(tmp_path)
    assert len(found) == 2, found
    assert any("router/bad.py" in f and "cluster.config" in f for f in found)
    assert any("decode_worker/bad.py" in f and "prefill_worker" in f for f in found)
