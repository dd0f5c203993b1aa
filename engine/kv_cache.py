"""The preallocated tensors that hold K and V for every block, and the
layout tag that a KV hand-off carries."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    """What must match for KV written by one engine to be read by another."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # "float32", "bfloat16", ...

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token across all layers."""
        itemsize = torch.empty((), dtype=getattr(torch, self.dtype)).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    def kv_shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        """Shape of ``num_tokens`` tokens' K and V as a hand-off carries them:
        ``[layers, 2, tokens, kv_heads, head_dim]`` (token-major, block-size free)."""
        return (self.num_layers, 2, num_tokens, self.num_kv_heads, self.head_dim)

    def mismatches(self, other: "KVLayout") -> list[str]:
        """``["field: mine != theirs", ...]`` for every differing field."""
        a, b = asdict(self), asdict(other)
        return [f"{k}: {b[k]!r} != {a[k]!r}" for k in a if a[k] != b[k]]


def write_layer_kv(layer_kv: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Write ``k``, ``v`` ``[n, kv_heads, head_dim]`` at ``slots`` of one layer's cache
    ``[2, kv_heads, slots, head_dim]``, in place (the eager forward and the compiled decode step both write here)."""
    # One copy for K and V together (three calls where two copies took six).
    layer_kv.index_copy_(2, slots, torch.stack((k, v)).transpose(1, 2))


class PagedKVCache:
    """K/V storage for ``num_blocks`` blocks of ``block_size`` tokens.

    One tensor per layer holds K and V for every slot, heads-major (``[2,
    kv_heads, slots, head_dim]``), allocated once: requests never grow or
    allocate tensors. Slot ``s`` belongs to block ``s // block_size``. Heads
    outermost makes one head's block ``block_size * head_dim`` contiguous
    values, so a decode step gathers K and V of every head with one copy of
    whole blocks, already in the layout the attention products read
    (:func:`engine.decode_attention.gather_heads_major`; token-major, it took
    one strided copy per head and was 2.4-2.8x slower per layer at batch 8-32).
    A hand-off carries tokens in token-major order (:meth:`read_tokens`), so
    the layout stays this engine's own.
    """

    def __init__(self, layout: KVLayout, num_blocks: int, block_size: int, device: str | torch.device = "cpu") -> None:
        self.layout = layout
        self.num_blocks = num_blocks
        self.block_size = block_size
        dtype = getattr(torch, layout.dtype)
        slots = num_blocks * block_size
        self.layers = [
            torch.zeros(2, layout.num_kv_heads, slots, layout.head_dim, dtype=dtype, device=device)
            for _ in range(layout.num_layers)
        ]

    @staticmethod
    def bytes_per_block(layout: KVLayout, block_size: int) -> int:
        return layout.bytes_per_token * block_size

    @classmethod
    def num_blocks_for_budget(cls, layout: KVLayout, block_size: int, budget_bytes: int) -> int:
        return budget_bytes // cls.bytes_per_block(layout, block_size)

    def blocks_view(self, layer: int) -> torch.Tensor:
        """``[2, kv_heads, num_blocks, block_size, head_dim]`` view of one layer."""
        t = self.layers[layer]
        return t.view(2, t.shape[1], self.num_blocks, self.block_size, t.shape[3])

    def read_tokens(self, slots: torch.Tensor) -> torch.Tensor:
        """Copy out ``[layers, 2, len(slots), kv_heads, head_dim]`` (token-major: the hand-off's order)."""
        return torch.stack([t.index_select(2, slots).transpose(1, 2) for t in self.layers])

    def write_tokens(self, slots: torch.Tensor, data: torch.Tensor) -> None:
        """Inverse of :meth:`read_tokens`."""
        for t, d in zip(self.layers, data):
            t.index_copy_(2, slots, d.transpose(1, 2))

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole blocks, ``(source, destination)`` pairs (a fork's copy on write), in every layer."""
        if not copies:
            return
        device = self.layers[0].device
        src = torch.tensor([c[0] for c in copies], dtype=torch.long, device=device)
        dst = torch.tensor([c[1] for c in copies], dtype=torch.long, device=device)
        for layer in range(len(self.layers)):
            view = self.blocks_view(layer)
            view[:, :, dst] = view[:, :, src]
