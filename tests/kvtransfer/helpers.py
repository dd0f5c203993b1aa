"""Helpers shared by the kvtransfer tests (no fixtures here: see conftest)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch

from kvtransfer.base import KVTransport, TransferStatus

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
