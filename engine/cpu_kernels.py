"""The project's own CPU operators (``torch.ops.splitserve_cpu.*``): built once, loaded by every process.

The sources in ``engine/csrc`` (the paged decode attention, the fused RMSNorm) are compiled the first time a
process asks for them, with ``torch.utils.cpp_extension`` (g++ and ninja; about 20 s on 2 cores), into one
library in :func:`cache_dir` (``$TORCH_EXTENSIONS_DIR/splitserve``, by default under
``~/.cache/torch_extensions``), under a name that includes the sources' hash and the CPU's instruction-set
flags (it is built with ``-march=native``), so a changed kernel or another CPU model builds its own copy and
later processes only load it (0.2 s). Where it cannot be built (no compiler) :func:`load_cpu_kernels`
returns the reason and each user falls back to torch's own operators (:mod:`engine.paged_attention`,
:mod:`engine.llama_ops`).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch

SOURCES = tuple(Path(__file__).parent / "csrc" / name for name in (
    "paged_attention.cpp", "rms_norm.cpp", "rotary_kv.cpp", "int4_linear.cpp", "decode_layers.cpp",
    "swiglu.cpp"))
CFLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp")
LDFLAGS = ("-lmvec",)  # glibc's vector math library: the exponentials of the softmax, 16 at a time


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
    """The build's name: the sources, the flags and the CPU it is built for, hashed."""
    digest = hashlib.sha256()
    for source in SOURCES:
        digest.update(source.read_bytes())
    digest.update(" ".join(CFLAGS + LDFLAGS).encode())
    digest.update(_cpu_flags().encode())
    return f"splitserve_cpu_{digest.hexdigest()[:12]}"


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
                    cpp_extension.load(name, [str(s) for s in SOURCES], extra_cflags=list(CFLAGS),
                                       extra_ldflags=list(LDFLAGS), build_directory=str(private),
                                       is_python_module=False, verbose=False)
                    os.replace(private / f"{name}.so", final)  # loaded already by load()
                    return
                finally:
                    shutil.rmtree(private, ignore_errors=True)
    torch.ops.load_library(str(final))


@functools.cache
def load_cpu_kernels() -> str | None:
    """Build or load the library once per process; None when its operators are there, else why not
    (no compiler, no ninja, no writable cache, a failed build: the callers keep torch's operators)."""
    try:
        _build_or_load(extension_name())
    except Exception as e:  # noqa: BLE001 - whatever stops the build, the fallbacks still compute the same thing
        return f"{type(e).__name__}: {str(e)[:500]}"
    return None
