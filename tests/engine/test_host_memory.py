"""trim_allocator: freed heap memory leaves the resident set (the reason a quantized worker shrinks)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# In a fresh interpreter: raise glibc's mmap threshold the way a model loader does (free one large
# buffer), then free 1 MB tensors held between small live ones (so the heap cannot shrink from the
# top by itself), and report the anonymous resident memory before and after trim_allocator().
_SCRIPT = """
import torch
from engine.host_memory import trim_allocator
def anon():
    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('RssAnon')) * 1024
big = torch.ones(24 << 20, dtype=torch.uint8); del big
keep, chunks = [], []
for _ in range(160):
    chunks.append(torch.ones(1 << 20, dtype=torch.uint8))
    keep.append(torch.ones(64, dtype=torch.uint8))
del chunks
before = anon()
ok = trim_allocator()
print(ok, before, anon())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc only")
def test_trim_returns_freed_heap_pages():
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=120, check=True)
    ok, before, after = out.stdout.split()
    assert ok == "True"
    assert int(before) - int(after) > 100 << 20, (before, after)  # most of the 160 MB freed
