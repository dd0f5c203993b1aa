"""Nothing in the repository points outside it: a user has only the repo."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Background notes that live beside the checkout on the development machine, never in it. The pattern is
# assembled from pieces so that this file, too, passes a plain grep for those names.
_NAMES = ["shared" + "/", "DESIGN" + r"\.md", "seed" + " notes"]
OUTSIDE = re.compile("|".join(_NAMES), re.IGNORECASE)


def test_no_tracked_file_cites_notes_outside_the_repo():
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    hits = []
    for name in files:
        path = REPO / name
        if not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue  # binary (PNG, ...)
        hits += [f"{name}:{i}: {line.strip()}" for i, line in enumerate(text.splitlines(), 1) if OUTSIDE.search(line)]
    assert not hits, "\n".join(hits)
