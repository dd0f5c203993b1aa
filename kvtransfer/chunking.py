"""Payload byte views and chunk ranges, shared by the backends that move a tensor's bytes.

Senders do not copy: :func:`byte_view` is a view of the caller's tensor, so
the tensor passed to ``send`` must stay unchanged until the transfer is done.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_BYTES = 4 << 20


def byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (any dtype, bf16 included)."""
    if not tensor.is_contiguous():
        raise ValueError("byte_view needs a contiguous tensor")
    return tensor.reshape(-1).view(torch.uint8)


def chunk_ranges(nbytes: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """``(offset, length)`` of each chunk; one empty chunk for a 0-byte payload."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be > 0")
    if nbytes == 0:
        return [(0, 0)]
    return [(o, min(chunk_bytes, nbytes - o)) for o in range(0, nbytes, chunk_bytes)]
