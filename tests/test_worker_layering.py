"""The workers and the router sit below ``cluster``: they never import it,
and ``decode_worker`` never imports ``prefill_worker`` (static check)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# package -> top-level packages it must not import
FORBIDDEN = {
    "worker_common": {"cluster", "router", "prefill_worker", "decode_worker"},
    "prefill_worker": {"cluster", "router", "decode_worker"},
    "decode_worker": {"cluster", "router", "prefill_worker"},
    "router": {"cluster"},
}
# Moving to observability/ in a parallel change; the only cluster import the router keeps until then.
ALLOWED = {("router", "cluster.metrics")}


def imported_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


def test_no_upward_imports():
    found = []
    for pkg, banned in FORBIDDEN.items():
        files = sorted((REPO / pkg).rglob("*.py"))
        assert files, pkg
        for path in files:
            for name in imported_modules(path):
                if name.split(".")[0] in banned and (pkg, name) not in ALLOWED:
                    found.append(f"{path.relative_to(REPO)}: imports {name}")
    assert not found, "\n".join(found)
