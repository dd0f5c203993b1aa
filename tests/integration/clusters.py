"""Helpers for the integration tests: requests and checks (configs and deployments: benchmarks.deployments)."""

from __future__ import annotations

import asyncio

from router.client import AsyncClient, Completion, build_request


def generate_many(address: str, requests: list[dict]) -> list[Completion]:
    """Send all ``requests`` (kwargs of ``AsyncClient.generate``) concurrently."""

    async def go():
        client = AsyncClient(address, timeout_s=600)
        try:
            return await asyncio.gather(*(client.generate(**r) for r in requests))
        finally:
            await client.close()

    return asyncio.run(go())


def chat_ids(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def assert_exact(model, texts: list[str], outs: list[Completion], max_new: int) -> None:
    """Every completion is the greedy reference of its raw prompt (up to counted near-ties)."""
    from tests.reference import Comparison, compare_greedy

    total = Comparison()
    for text, out in zip(texts, outs):
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(out.token_ids) == max_new and out.finish_reason == "length", (text, out)
        total.add(compare_greedy(model.model, ids, out.token_ids, max_new, ignore_eos=True))
    assert total.exact + total.near_ties == len(texts) and total.near_ties <= 1


def word_prompts(n: int, seed: int, lo: int = 2, hi: int = 30) -> list[str]:
    import random

    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "kv", "cache", "page", "block", "ray", "split"]
    return [" ".join(rng.choice(words) for _ in range(rng.randrange(lo, hi))) for _ in range(n)]


def block_usage(address: str, **client_kw) -> dict[str, tuple[int, int]]:
    """worker id -> (used blocks, free blocks), from ClusterStatus."""
    from router.client import Client

    client = Client(address, **client_kw)
    try:
        return {w.worker_id: (w.used_blocks, w.free_blocks) for p in client.status().pools for w in p.workers}
    finally:
        client.close()


def wait_until(predicate, timeout_s: float, what: str, interval_s: float = 0.05) -> float:
    """Poll ``predicate`` until true; return the seconds it took (AssertionError after ``timeout_s``)."""
    import time

    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)
    return time.monotonic() - t0


async def stream_all(address: str, texts: list[str], on_progress, max_new: int = 40) -> list[Completion]:
    """Run every prompt, checking each stream chunk by chunk; ``on_progress(counts)`` sees tokens so far."""
    client = AsyncClient(address, timeout_s=300)
    counts = [0] * len(texts)

    async def one(i: int, text: str) -> Completion:
        c = Completion()
        async for resp in client.stub.Generate(build_request(text, max_tokens=max_new, ignore_eos=True), timeout=300):
            c.add(resp)
            counts[i] += len(resp.token_ids)
            on_progress(counts)
        return c

    try:
        return await asyncio.gather(*(one(i, t) for i, t in enumerate(texts)))
    finally:
        await client.close()
