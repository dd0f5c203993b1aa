"""The correctness reference (docs/architecture.md, "Correctness reference").

Greedy float32 output must equal ``transformers`` ``generate()`` run one
prompt at a time. A divergence is accepted only where the reference's top
two logits differ by less than ``NEAR_TIE`` (a genuine near-tie that float
summation order may flip); such cases are counted, and the comparison of
that sequence stops there because the continuations legitimately differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEAR_TIE = 1e-4


@dataclass
class Comparison:
    exact: int = 0
    near_ties: int = 0

    def add(self, other: "Comparison") -> None:
        self.exact += other.exact
        self.near_ties += other.near_ties


@torch.inference_mode()
def reference_greedy(model, prompt_ids: list[int], max_new_tokens: int, ignore_eos: bool = False):
    """Reference tokens and raw logits, one prompt, no padding."""
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True)
    if ignore_eos:
        kwargs["min_new_tokens"] = max_new_tokens
    out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long), **kwargs)
    return out.sequences[0, len(prompt_ids):].tolist(), [l[0] for l in out.logits]


def compare_greedy(model, prompt_ids: list[int], got: list[int], max_new_tokens: int, ignore_eos: bool = False) -> Comparison:
    """Assert ``got`` equals the reference up to counted near-ties."""
    ref, logits = reference_greedy(model, prompt_ids, max_new_tokens, ignore_eos)
    for i, (a, b) in enumerate(zip(ref, got)):
        if a != b:
            top2 = torch.topk(logits[i].float(), 2).values
            gap = float(top2[0] - top2[1])
            assert gap < NEAR_TIE, (
                f"token {i} differs from generate(): got {b}, expected {a}; "
                f"reference top-2 gap {gap:.3g} is not a near-tie\nref={ref}\ngot={got}"
            )
            return Comparison(exact=0, near_ties=1)
    assert got == ref, f"length differs from generate(): ref={ref} got={got}"
    return Comparison(exact=1, near_ties=0)
