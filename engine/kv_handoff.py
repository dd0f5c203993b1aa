"""A prefilled sequence's KV as a self-describing buffer.

This is what the disaggregated cluster moves from a prefill engine to a
decode engine. The wire form is a small JSON header (layout, token ids,
sampling seed) followed by the raw K/V bytes in token-major order
``[layers, 2, tokens, kv_heads, head_dim]``: independent of either side's
block size, and never pickled.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass

import torch

from engine.kv_cache import KVLayout

_MAGIC = b"SSKV1"
_HEADER_LEN = struct.Struct("<I")


@dataclass(frozen=True)
class SampleStart:
    """A sample of a request with ``n`` > 1 whose first token was drawn where the
    prompt was prefilled, and that goes on decoding where the prompt's KV goes:
    its index among the ``n``, that token, its seed, and the text already streamed for it."""

    index: int
    token_id: int
    seed: int
    text: str = ""


class KVLayoutMismatchError(ValueError):
    """The buffer's KV layout differs from the receiving engine's."""


@dataclass
class KVHandoff:
    """KV of ``num_tokens`` computed tokens plus the token state around it.

    ``prompt_token_ids + output_token_ids`` is the whole sequence; the KV
    covers its tokens ``[start, end)``, ``end`` being all but the last
    sampled one. ``start`` > 0 when the receiver already holds the first
    ``start`` tokens' KV in its prefix cache (only the rest is moved).
    """

    request_id: str
    layout: KVLayout
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    seed: int
    data: torch.Tensor  # [layers, 2, num_tokens, kv_heads, head_dim]
    start: int = 0  # position of the first token ``data`` covers

    @property
    def num_tokens(self) -> int:
        """Tokens whose KV ``data`` holds."""
        return int(self.data.shape[2])

    @property
    def end(self) -> int:
        """Position after the last token ``data`` covers (the sequence's computed tokens)."""
        return self.start + self.num_tokens

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def to_bytes(self) -> bytes:
        header = json.dumps(
            {
                "request_id": self.request_id,
                "layout": asdict(self.layout),
                "prompt_token_ids": self.prompt_token_ids,
                "output_token_ids": self.output_token_ids,
                "seed": self.seed,
                "num_tokens": self.num_tokens,
                "start": self.start,
            }
        ).encode()
        payload = self.data.contiguous().view(torch.uint8).numpy().tobytes()
        return _MAGIC + _HEADER_LEN.pack(len(header)) + header + payload

    @classmethod
    def from_bytes(cls, buf: bytes) -> "KVHandoff":
        if not buf.startswith(_MAGIC):
            raise ValueError("not a splitserve KV buffer (bad magic)")
        (hlen,) = _HEADER_LEN.unpack_from(buf, len(_MAGIC))
        start = len(_MAGIC) + _HEADER_LEN.size
        header = json.loads(buf[start:start + hlen])
        layout = KVLayout(**header["layout"])
        shape = layout.kv_shape(header["num_tokens"])
        dtype = getattr(torch, layout.dtype)
        payload = bytearray(buf[start + hlen:])
        expected = layout.bytes_per_token * header["num_tokens"]
        if len(payload) != expected:
            raise ValueError(f"KV buffer holds {len(payload)} bytes, layout says {expected}")
        data = torch.frombuffer(payload, dtype=torch.uint8).view(dtype).view(shape)
        return cls(header["request_id"], layout, header["prompt_token_ids"], header["output_token_ids"], header["seed"], data,
                   header.get("start", 0))
