"""Waiting for one KV transfer, on either side of it."""

from __future__ import annotations

import asyncio
import time

from kvtransfer.base import KVTransport, TransferStatus


async def wait_transfer(transport: KVTransport, transfer_id: str, timeout_s: float) -> TransferStatus:
    """Poll a transfer until it is done or ``timeout_s`` passes (then abort it)."""
    deadline = time.monotonic() + timeout_s
    delay = 0.0002
    while True:
        status = transport.poll(transfer_id)
        if status.done:
            return status
        if time.monotonic() >= deadline:
            transport.abort(transfer_id)
            return TransferStatus.FAILED
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.001)  # a late look at a finished transfer adds straight to TTFT
