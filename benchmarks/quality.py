"""Quality of each weight format against float32: perplexity and greedy agreement.

Run from the repository root::

    python -m benchmarks.quality [--json PATH]

For SmolLM2-135M-Instruct in each format (float32 the reference; bfloat16;
int8 and int4 weights with bfloat16 activations; int8 with float32
activations; w8a8, int8 weights and per-row int8 activations):

1. **Perplexity** on ``benchmarks/data/coriolanus.txt``: the opening of
   Shakespeare's *Coriolanus* (1608; public domain), 34,867 characters,
   10,500+ tokens, kept in the repository (copied from the
   ``tinyshakespeare`` text of the MIT-licensed ``karpathy/char-rnn``
   repository). The text is scored in windows of ``WINDOW`` tokens with a
   stride of ``STRIDE`` (each token scored once, with at least
   ``WINDOW - STRIDE`` tokens of context after the first window), through
   the engine's own forward (:func:`engine.model_runner.sequence_logits`,
   the weights and kernels the engine serves with).
2. **Greedy agreement**: a fixed set of chat prompts (``PROMPTS``) through
   the engine, 64 tokens each with ``ignore_eos``; per format, the share of
   requests whose 64 tokens are identical to float32's and the mean
   position of the first differing token (64 when identical).

Bars (from issue 11): perplexity within 0.5 % of float32 for bfloat16,
1.5 % for int8, 5 % for int4.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.llm_engine import LLMEngine, run_to_completion
from engine.model_loader import DEFAULT_MODEL, LoadedModel, load_model
from engine.model_runner import sequence_logits
from engine.sampling_params import SamplingParams

TEXT = Path(__file__).with_name("data") / "coriolanus.txt"
MIN_TEXT_TOKENS = 10_000
WINDOW = 1024
STRIDE = 512
GREEDY_TOKENS = 64


@dataclass(frozen=True)
class Format:
    dtype: str
    quantization: str
    bar: float | None  # max perplexity increase over float32, as a fraction (None: the reference)

    @property
    def label(self) -> str:
        return self.dtype if self.quantization == "none" else f"{self.quantization}/{self.dtype}"


REFERENCE = Format("float32", "none", None)
FORMATS = (
    REFERENCE,
    Format("bfloat16", "none", 0.005),
    Format("float32", "int8", 0.015),
    Format("bfloat16", "int8", 0.015),
    Format("bfloat16", "int4", 0.05),
    Format("bfloat16", "w8a8", 0.015),  # int8 weights and int8 activations: int8's bar
)

PROMPTS = (
    "Why is the sky blue?",
    "Write a haiku about autumn leaves.",
    "What is the capital of Australia, and why is it not Sydney?",
    "Explain recursion to a ten-year-old.",
    "List three uses of a paperclip.",
    "How does a refrigerator keep food cold?",
    "Translate 'good morning' into French, Spanish and German.",
    "What is 17 times 23? Show your steps.",
    "Give me a short recipe for pancakes.",
    "Who wrote Pride and Prejudice?",
    "Describe the water cycle in two sentences.",
    "What are the planets of the solar system?",
    "Write a Python function that reverses a string.",
    "Why do cats purr?",
    "Summarize the plot of Romeo and Juliet.",
    "What is the difference between weather and climate?",
)


def log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def text_token_ids(loaded: LoadedModel) -> list[int]:
    ids = loaded.tokenizer(TEXT.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    if len(ids) < MIN_TEXT_TOKENS:
        raise RuntimeError(f"{TEXT} has {len(ids)} tokens, fewer than {MIN_TEXT_TOKENS}")
    return ids


def perplexity(loaded: LoadedModel, ids: list[int], window: int = WINDOW, stride: int = STRIDE) -> float:
    """exp(mean negative log-likelihood) of ``ids[1:]``, scored in overlapping windows."""
    nll, count = 0.0, 0
    scored_to = 1  # tokens [1, scored_to) are scored
    start = 0
    while scored_to < len(ids):
        end = min(start + window, len(ids))
        chunk = torch.tensor(ids[start:end], dtype=torch.long)
        logits = sequence_logits(loaded.weights, chunk).float()
        logprobs = torch.log_softmax(logits[:-1], dim=-1)
        targets = chunk[1:]
        first = scored_to - start - 1  # row predicting token `scored_to`
        picked = logprobs[first:].gather(1, targets[first:, None])
        nll -= float(picked.sum())
        count += int(picked.numel())
        scored_to = end
        start = max(0, end - (window - stride)) if end < len(ids) else end
    return math.exp(nll / count)


def greedy(loaded: LoadedModel, max_tokens: int = GREEDY_TOKENS) -> list[list[int]]:
    """Each prompt's greedy tokens through the engine (all prompts in one batch)."""
    engine = LLMEngine(loaded, num_blocks=len(PROMPTS) * 16, block_size=16, max_running=len(PROMPTS))
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    for i, q in enumerate(PROMPTS):
        engine.add_request(f"q{i}", params=params,
                           prompt_token_ids=engine.tokenize(messages=[{"role": "user", "content": q}]))
    done = run_to_completion(engine)
    return [done[f"q{i}"].token_ids for i in range(len(PROMPTS))]


def agreement(ref: list[list[int]], got: list[list[int]]) -> dict[str, float]:
    """Share of identical sequences and the mean first-divergence position (len when identical)."""
    firsts = []
    for r, g in zip(ref, got):
        first = next((i for i, (a, b) in enumerate(zip(r, g)) if a != b), min(len(r), len(g)))
        firsts.append(first)
    identical = sum(r == g for r, g in zip(ref, got))
    return {"identical_share": identical / len(ref), "mean_first_divergence": sum(firsts) / len(firsts)}


def run(formats: tuple[Format, ...], window: int, stride: int) -> dict[str, Any]:
    results, ref_ppl, ref_tokens = [], None, None
    for fmt in formats:
        log(f"{fmt.label}: loading")
        loaded = load_model(DEFAULT_MODEL, dtype=fmt.dtype, quantization=fmt.quantization)
        ids = text_token_ids(loaded)
        t0 = time.perf_counter()
        ppl = perplexity(loaded, ids, window, stride)
        ppl_s = time.perf_counter() - t0
        log(f"{fmt.label}: perplexity {ppl:.4f} over {len(ids)} tokens ({ppl_s:.0f} s); greedy")
        tokens = greedy(loaded)
        if fmt == REFERENCE:
            ref_ppl, ref_tokens = ppl, tokens
        row: dict[str, Any] = {"format": fmt.label, "dtype": fmt.dtype, "quantization": fmt.quantization,
                               "perplexity": ppl, "text_tokens": len(ids),
                               "weight_mb": loaded.weights.resident_bytes() / 1e6, "perplexity_s": ppl_s}
        if ref_ppl is not None:
            row["ppl_increase"] = ppl / ref_ppl - 1
            row["bar"] = fmt.bar
            row["passes"] = None if fmt.bar is None else row["ppl_increase"] <= fmt.bar
            row.update(agreement(ref_tokens, tokens))
        results.append(row)
        del loaded
    return {"model": DEFAULT_MODEL, "text": TEXT.name, "window": window, "stride": stride,
            "greedy_tokens": GREEDY_TOKENS, "prompts": len(PROMPTS), "torch_threads": torch.get_num_threads(),
            "formats": results}


def render(result: dict[str, Any]) -> str:
    out = [f"Quality vs float32: {result['model']}; perplexity on {result['text']} "
           f"({result['formats'][0]['text_tokens']} tokens, window {result['window']}, stride {result['stride']}); "
           f"greedy agreement over {result['greedy_tokens']} tokens on {result['prompts']} chat prompts",
           "",
           f"{'format':<16}{'perplexity':>11}{'vs fp32':>9}{'bar':>7}{'passes':>8}{'identical':>11}"
           f"{'1st diff':>10}{'weights MB':>12}"]
    for r in result["formats"]:
        bar = "-" if r.get("bar") is None else f"{100 * r['bar']:.1f}%"
        passes = "-" if r.get("passes") is None else ("yes" if r["passes"] else "NO")
        out.append(f"{r['format']:<16}{r['perplexity']:>11.4f}{100 * r.get('ppl_increase', 0):>8.2f}%{bar:>7}"
                   f"{passes:>8}{100 * r.get('identical_share', 1):>10.0f}%"
                   f"{r.get('mean_first_divergence', result['greedy_tokens']):>10.1f}{r['weight_mb']:>12.0f}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    result = run(FORMATS, WINDOW, STRIDE)
    print(render(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
