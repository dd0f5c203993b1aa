"""Decode attention that reads the paged KV cache in place (a CPU kernel of our own).

:mod:`engine.decode_attention` gathers each sequence's blocks into a padded
``[KV, B, L, D]`` copy per layer, then multiplies. The kernel in
``engine/csrc/paged_attention.cpp`` walks each sequence's block table instead
and reads every key and value where it lies: nothing is copied, nothing is
padded to the longest sequence, and each KV head's query group is scored
together (one read of K and V per KV head). Scores, softmax and the weighted
sum are float32 for any cache dtype.

It is compiled the first time a process asks for it, with
``torch.utils.cpp_extension`` (g++ and ninja; about 20 s on 2 cores), into
:func:`cache_dir` (``$TORCH_EXTENSIONS_DIR/splitserve``, by default under
``~/.cache/torch_extensions``), under a name that includes this source's hash
and the CPU's instruction-set flags (it is built with ``-march=native``), so a
changed kernel or another CPU model builds its own copy and later processes
only load it (0.2 s). Where it cannot be built (no compiler) :func:`paged_decode_kernel`
returns None and logs why once: the runner keeps the gather path, slower but
the same attention.

Measured per layer (SmolLM2-135M shapes: 9 query / 3 KV heads of 64, ~250
keys, bfloat16 cache, blocks scattered over the cache): see
``python -m benchmarks.decode_attention``.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "paged_attention.cpp"
CFLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp")
LDFLAGS = ("-lmvec",)  # glibc's vector math library: the exponentials of the softmax, 16 at a time

PagedDecodeKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, float], torch.Tensor]


def _cpu_flags() -> str:
    """The CPU's instruction-set flags (Linux), or "" elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def extension_name() -> str:
    """The build's name: the source, the flags and the CPU it is built for, hashed."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(" ".join(CFLAGS + LDFLAGS).encode())
    digest.update(_cpu_flags().encode())
    return f"splitserve_paged_attention_{digest.hexdigest()[:12]}"


def cache_dir() -> Path:
    """Where built kernels are kept: ``$TORCH_EXTENSIONS_DIR/splitserve``, by default under ``~/.cache``."""
    base = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")
    return Path(base) / "splitserve"


def _build_or_load(name: str) -> None:
    """Load ``<cache_dir>/<name>.so`` into this process, building it first if no process has.

    One process builds at a time (an ``flock``, which the kernel drops if its holder dies), each in a private
    directory, and the finished library is moved into place atomically: a worker killed mid-build leaves
    neither a half-written library nor a lock that makes the next one wait forever (torch's own build lock
    is a file that outlives a killed builder).
    """
    from torch.utils import cpp_extension

    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{name}.so"
    if not final.exists():
        with open(root / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # waits while another process builds
            if not final.exists():
                private = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
                try:
                    cpp_extension.load(name, [str(SOURCE)], extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
                                       build_directory=str(private), is_python_module=False, verbose=False)
                    os.replace(private / f"{name}.so", final)  # loaded already by load()
                    return
                finally:
                    shutil.rmtree(private, ignore_errors=True)
    torch.ops.load_library(str(final))


@functools.cache
def paged_decode_kernel() -> PagedDecodeKernel | None:
    """``torch.ops.splitserve_cpu.paged_decode_attention``, built or loaded once per process; None (and one
    warning) when it cannot be built here.

    The operator: ``(q [B, H, D], layer_kv [2, KV, slots, D], block_tables [B, M] int64, context_lens [B] int64,
    block_size, scale) -> [B, H, D]`` in ``q``'s dtype; CPU tensors; ``q`` and the cache of one dtype
    (float32, bfloat16 or float16). A context length outside ``[1, M * block_size]`` or a block index
    outside the cache raises ``RuntimeError`` before anything is read.
    """
    try:
        _build_or_load(extension_name())
    except Exception as e:  # no compiler, no ninja, no writable cache, a failed build: the gather path still works
        log.warning("paged attention kernel unavailable, decode attention gathers K/V instead: %s: %s",
                    type(e).__name__, str(e)[:500])
        return None
    return torch.ops.splitserve_cpu.paged_decode_attention
