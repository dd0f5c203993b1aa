"""Accelerator profiles and link speeds for ``python -m analysis.bottleneck``; torch-free.

The GPU figures are the vendors' published peaks (NVIDIA datasheets, SXM
parts): *dense* tensor-core FLOP/s (no 2:4 sparsity) and HBM bandwidth. Real
kernels reach some fraction of them, so times derived from them are lower
bounds. For this machine, ``local_profile`` measures instead: the machine
you run on is never described by a spec sheet (see docs/architecture.md,
Measurement).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from analysis.machine_peaks import MachinePeaks

TB = 1e12
GB = 1e9


@dataclass(frozen=True)
class HardwareProfile:
    """One device: memory, bandwidth, and peak FLOP/s by the dtype the matmuls run in.

    ``flops_per_s`` keys are compute dtypes: ``fp32`` (on NVIDIA GPUs the
    TF32 tensor-core rate, what frameworks use for fp32 matmuls by default),
    ``bf16`` and ``fp8``. :meth:`peaks` maps a storage dtype to one of them.
    """

    name: str
    description: str
    memory_bytes: float
    bandwidth_bytes_per_s: float
    flops_per_s: Mapping[str, float]
    source: str
    measured: bool = False

    def compute_dtype(self, dtype: str) -> str:
        """The dtype the matmuls of a model stored in ``dtype`` run at on this device.

        int4 (and fp8 where the device has no fp8 units) is weight-only
        quantization: weights are widened to bf16 before the matmul, so the
        FLOP rate is bf16's while the bytes read stay the narrow ones.
        """
        wanted = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "fp16": "bf16",
                  "float16": "bf16", "fp8": "fp8", "int8": "fp8", "int4": "bf16"}.get(dtype, "bf16")
        if wanted in self.flops_per_s:
            return wanted
        if "bf16" in self.flops_per_s:
            return "bf16"
        return next(iter(self.flops_per_s))  # a measured CPU profile has fp32 only

    def peaks(self, dtype: str) -> MachinePeaks:
        """Bandwidth and the FLOP/s of ``dtype``'s compute dtype, as a :class:`MachinePeaks`."""
        return MachinePeaks(self.bandwidth_bytes_per_s, self.flops_per_s[self.compute_dtype(dtype)])


def _profile(name: str, description: str, memory_gb: float, bandwidth_gb_s: float,
             tflops: dict[str, float], source: str) -> HardwareProfile:
    return HardwareProfile(name, description, memory_gb * GB, bandwidth_gb_s * GB,
                           MappingProxyType({k: v * TB for k, v in tflops.items()}), source)


PROFILES: Mapping[str, HardwareProfile] = MappingProxyType({
    "H100": _profile("H100", "NVIDIA H100 SXM5 80 GB (HBM3)", 80, 3350,
                     {"fp32": 494.7, "bf16": 989.4, "fp8": 1978.9},
                     "NVIDIA H100 datasheet: dense TF32 / BF16 / FP8 tensor core, 3.35 TB/s"),
    "H200": _profile("H200", "NVIDIA H200 SXM 141 GB (HBM3e)", 141, 4800,
                     {"fp32": 494.7, "bf16": 989.4, "fp8": 1978.9},
                     "NVIDIA H200 datasheet: same compute as H100 SXM, 4.8 TB/s"),
    "A100": _profile("A100", "NVIDIA A100 SXM4 80 GB (HBM2e)", 80, 2039,
                     {"fp32": 156.0, "bf16": 312.0},
                     "NVIDIA A100 datasheet: dense TF32 / BF16 tensor core, 2,039 GB/s; no fp8 units"),
})


def local_profile(peaks: MachinePeaks, memory_bytes: float | None = None) -> HardwareProfile:
    """A profile of this machine from peaks measured now (float32 copy and matmul, :mod:`analysis.machine_peaks`)."""
    if memory_bytes is None:
        memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return HardwareProfile(
        name="local",
        description=f"this machine, {os.cpu_count()} CPUs, measured now",
        memory_bytes=float(memory_bytes),
        bandwidth_bytes_per_s=peaks.bandwidth_bytes_per_s,
        flops_per_s=MappingProxyType({"fp32": peaks.flops_per_s}),
        source="analysis.machine_peaks: best dst.copy_(src) (read + write) and float32 matmul, measured now",
        measured=True,
    )


# ---------------------------------------------------------------------- links
@dataclass(frozen=True)
class Link:
    """A path KV can take from a prefill to a decode worker, at its one-way rate."""

    name: str
    bytes_per_s: float
    note: str = field(default="")


# One-way rates: a KV push goes in one direction, so a link's bidirectional
# total (how NVLink is usually quoted) would overstate it by 2x.
LINKS: tuple[Link, ...] = (
    Link("NVLink 4", 450 * GB, "H100/H200 SXM: 900 GB/s bidirectional = 450 GB/s each way"),
    Link("PCIe Gen5 x16", 64 * GB, "~64 GB/s each way (128 GB/s bidirectional)"),
    Link("400 Gb/s network", 400 / 8 * GB, "InfiniBand NDR / 400 GbE line rate"),
    Link("100 Gb/s network", 100 / 8 * GB, "100 GbE / InfiniBand EDR line rate"),
)


def measure_tcp_loopback(nbytes: int = 64 * 1024 * 1024, chunk: int = 1024 * 1024) -> float:
    """Bytes/s of one TCP stream over 127.0.0.1 on this machine (what gRPC / gloo between local workers get at best).

    A receiver thread drains a socket while this thread sends ``nbytes``;
    the time runs from connect until the receiver has every byte.
    """
    server = socket.create_server(("127.0.0.1", 0))
    received = 0

    def drain() -> None:
        nonlocal received
        conn, _ = server.accept()
        buf = bytearray(chunk)
        with conn:
            while received < nbytes:
                n = conn.recv_into(buf)
                if not n:
                    break
                received += n

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    payload = memoryview(bytes(chunk))
    try:
        t0 = time.perf_counter()
        with socket.create_connection(server.getsockname(), timeout=30) as client:
            sent = 0
            while sent < nbytes:
                client.sendall(payload[: min(chunk, nbytes - sent)])
                sent += min(chunk, nbytes - sent)
            thread.join(timeout=30)
        seconds = time.perf_counter() - t0
    finally:
        server.close()
    if received < nbytes:
        raise RuntimeError(f"loopback receiver got {received} of {nbytes} bytes")
    return nbytes / seconds
