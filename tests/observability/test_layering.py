"""observability sits above the workers and below the router: it imports
nothing from the router, cluster or benchmarks, and the router no longer
reaches into cluster (whose metrics module moved here)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def imported_packages(package: str) -> dict[str, set[str]]:
    """{file: top-level packages it imports} for every module of ``package``."""
    out = {}
    for path in sorted((REPO / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        out[str(path.relative_to(REPO))] = names
    assert out, package
    return out


def test_observability_imports_only_what_sits_below_it():
    above = {"prefill_worker", "decode_worker", "router", "cluster", "benchmarks"}
    for path, names in imported_packages("observability").items():
        assert not names & above, (path, names & above)


def test_router_does_not_import_cluster():
    for path, names in imported_packages("router").items():
        assert "cluster" not in names, path
