"""This machine's memory bandwidth and matmul FLOP/s, measured on the spot.

MBU and MFU are fractions of peaks measured in the same run on the same
machine, never of a spec sheet (see docs/architecture.md, Measurement): a
spec sheet is not what this machine reaches today. Bandwidth is the best of a few ``dst.copy_(src)`` of
a large float32 tensor, counting read + write (twice the tensor's size) as
bytes moved; FLOP/s is the best of a few ``n x n @ n x n`` float32 matmuls
(``2 n^3`` FLOPs). Both run on the CPU with torch's current thread count.

torch is imported only inside the measuring functions, so that
:class:`MachinePeaks` (a plain record) can be used by torch-free code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

COPY_BYTES = 256 * 1024 * 1024   # well past any CPU's last-level cache
MATMUL_N = 2048                  # 17 GFLOP: long enough to time, short on any machine

# The fast variant for a worker's start: ~0.1-0.3 s on a laptop-class CPU.
# 64 MiB still exceeds the last-level cache of common server CPUs (so the copy
# measures DRAM, not cache); a 1024 matmul still runs the blocked BLAS kernel.
FAST_COPY_BYTES = 64 * 1024 * 1024
FAST_MATMUL_N = 1024
FAST_REPS = 2


@dataclass(frozen=True)
class MachinePeaks:
    """Peak memory bandwidth and FLOP/s of one machine (measured or from a profile)."""

    bandwidth_bytes_per_s: float
    flops_per_s: float

    @property
    def ridge_point(self) -> float:
        """FLOPs per byte at which compute time equals memory time: above it work is compute-bound."""
        return self.flops_per_s / self.bandwidth_bytes_per_s


def best_time(fn: Callable[[], Any], reps: int) -> float:
    """Fastest of ``reps`` timed calls of ``fn``, after one untimed warm-up call.

    The fastest, not the median: a shared machine only ever slows a run
    down, so the minimum is the closest to what the hardware can do.
    """
    fn()
    best = float("inf")
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_bandwidth(copy_bytes: int = COPY_BYTES, reps: int = 3) -> float:
    """Memory bandwidth in bytes/s of a ``dst.copy_(src)`` of ``copy_bytes``: (read + write) / time."""
    import torch

    src = torch.ones(copy_bytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    seconds = best_time(lambda: dst.copy_(src), reps)
    return 2 * src.numel() * 4 / seconds


def measure_matmul_flops(n: int = MATMUL_N, reps: int = 3, dtype: str = "float32") -> float:
    """FLOP/s of an ``n x n @ n x n`` matmul (``2 n^3`` FLOPs) in ``dtype`` (``float32`` or ``bfloat16``:
    on a CPU with AVX512-BF16 or AMX the 16-bit peak is several times the float32 one, so a 16-bit
    format's compute fraction must be taken against its own)."""
    import torch

    tdtype = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(tdtype)
    b = torch.randn(n, n, generator=gen).to(tdtype)
    out = torch.empty(n, n, dtype=tdtype)
    seconds = best_time(lambda: torch.mm(a, b, out=out), reps)
    return 2 * n**3 / seconds


def peak_dtype(compute_dtype: str) -> str:
    """The matmul dtype whose peak bounds a model computing in ``compute_dtype``: bfloat16 for the 16-bit
    dtypes (float16's CPU matmuls are not faster than bfloat16's), float32 otherwise."""
    return "bfloat16" if compute_dtype in ("bfloat16", "float16") else "float32"


def measure_peaks(reps: int = 3, copy_bytes: int = COPY_BYTES, matmul_n: int = MATMUL_N,
                  dtype: str = "float32") -> MachinePeaks:
    """Copy bandwidth and ``dtype`` matmul FLOP/s now; each the best of ``reps`` (plus a warm-up)."""
    return MachinePeaks(bandwidth_bytes_per_s=measure_bandwidth(copy_bytes, reps),
                        flops_per_s=measure_matmul_flops(matmul_n, reps, dtype))


def measure_peaks_fast(dtype: str = "float32") -> MachinePeaks:
    """A cheaper :func:`measure_peaks` (well under 0.5 s) for a worker's start-up.

    Smaller copy and matmul and fewer repetitions (~0.25 s on a 2-core
    CPU). It is noisier and may read lower than the full measurement (a
    small matmul reaches less of the BLAS peak), so MBU / MFU gauges based
    on it err high; reports that compare runs should use :func:`measure_peaks`. ``dtype``: the
    matmuls' (a worker passes its model's compute dtype, so its MFU is against its own kernels' peak).
    """
    return measure_peaks(reps=FAST_REPS, copy_bytes=FAST_COPY_BYTES, matmul_n=FAST_MATMUL_N, dtype=dtype)
