"""Helpers shared by the kvtransfer tests (no fixtures here: see conftest)."""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable

import pytest
import torch

from kvtransfer.base import KVTransport, TransferStatus
from kvtransfer.shm_buffers import MEMFD_NAME

MakeTransport = Callable[..., KVTransport]

needs_two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                    reason="NCCL needs CUDA, and one device per rank (2 ranks)")

KV_SHAPE = (30, 2, 128, 3, 64)  # SmolLM2-135M: 30 layers, K/V, 128 tokens, 3 kv heads, head_dim 64
DONE_WITHIN_S = 20.0  # generous: the machine is shared; a healthy transfer takes milliseconds


def wait_done(tr: KVTransport, tid: str, within_s: float = DONE_WITHIN_S) -> TransferStatus:
    deadline = time.monotonic() + within_s
    while True:
        status = tr.poll(tid)
        if status.done or time.monotonic() > deadline:
            return status
        time.sleep(0.002)


def kv(shape: tuple[int, ...] = KV_SHAPE, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def transfer(src: KVTransport, dst: KVTransport, tid: str, x: torch.Tensor, timeout_s: float = 30.0) -> torch.Tensor:
    """Expect, send, wait for both sides; return what the receiver got."""
    dst.expect(tid, tuple(x.shape), x.dtype, src.endpoint(), timeout_s)
    src.send(tid, x, dst.endpoint(), timeout_s)
    assert wait_done(dst, tid) == TransferStatus.SUCCESS, dst.error(tid)
    assert wait_done(src, tid) == TransferStatus.SUCCESS, src.error(tid)
    src.forget(tid)
    return dst.result(tid)


def assert_same_bytes(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def shm_leftovers(settle_s: float = 5.0) -> list[str]:
    """This process's shared-memory buffers still mapped or open, and our entries in /dev/shm (after a GC).

    Retries for a moment: a transport thread may still be dropping its last reference.
    """
    deadline = time.monotonic() + settle_s
    while True:
        gc.collect()
        with open("/proc/self/maps") as f:
            left = [line.strip() for line in f if MEMFD_NAME in line]
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:  # closed meanwhile (the listdir's own descriptor, for one)
                continue
            if MEMFD_NAME in target:
                left.append(f"fd {fd}: {target}")
        left += [f"/dev/shm/{name}" for name in os.listdir("/dev/shm") if "splitserve" in name]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)
