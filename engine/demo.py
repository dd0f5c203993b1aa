"""Demo: serve a few chat prompts from the engine and stream the answers.

``python -m engine.demo [--model NAME] [--max-tokens N]``; this is what
``make run`` does until the cluster launch replaces it.
"""

from __future__ import annotations

import argparse
import sys
import time

from engine.llm_engine import LLMEngine
from engine.model_loader import DEFAULT_MODEL, load_model
from engine.sampling_params import SamplingParams

DEMO_QUESTIONS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me one tip for sleeping better.",
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    print(f"loading {args.model} ...", flush=True)
    engine = LLMEngine(load_model(args.model))
    print(f"loaded in {time.perf_counter() - t0:.1f} s; {engine.stats()['num_blocks']} KV blocks", flush=True)
    params = SamplingParams(max_tokens=args.max_tokens)
    started = {}
    for i, q in enumerate(DEMO_QUESTIONS):
        engine.add_request(f"demo-{i}", params=params, messages=[{"role": "user", "content": q}])
        started[f"demo-{i}"] = time.perf_counter()
    # All requests run in one continuous batch; collect each stream, print in order.
    texts = {rid: "" for rid in started}
    first, done = {}, {}
    while engine.has_unfinished():
        for out in engine.step():
            now = time.perf_counter()
            first.setdefault(out.request_id, now)
            texts[out.request_id] += out.new_text
            if out.finished:
                done[out.request_id] = (now, out.num_output_tokens, out.finish_reason)
    for i, q in enumerate(DEMO_QUESTIONS):
        rid = f"demo-{i}"
        end, n, reason = done[rid]
        ttft = first[rid] - started[rid]
        tpot = (end - first[rid]) / max(n - 1, 1)
        print(f"\n> {q}\n{texts[rid].strip()}")
        print(f"  [{n} tokens, finish={reason}, TTFT {ttft * 1000:.0f} ms, TPOT {tpot * 1000:.0f} ms]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
