"""Step accounting: the arithmetic by hand with a fake cost model, then a
real tiny-llama engine's counters and per-request timestamps."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from analysis.cost_model import ModelDims, dtype_bytes
from analysis.machine_peaks import MachinePeaks
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.step_stats import StepStats, is_decode, step_cost


class FakeCost:
    """Linear costs simple enough to check by hand.

    Weights are 1000 bytes per forward; a KV token is 10 bytes; a token costs
    100 FLOPs and each (query, key) pair 1 FLOP.
    """

    def weight_bytes_read(self, rows_looked_up: int, dtype_bytes: float) -> float:
        return 1000 * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: float) -> int:
        return int(10 * dtype_bytes)

    def attention_flops(self, num_pairs: float) -> float:
        return num_pairs

    def decode_step(self, batch: int, context_len: float, dtype_bytes: float) -> tuple[float, float]:
        return (self.weight_bytes_read(batch, dtype_bytes) + batch * context_len * self.kv_bytes_per_token(dtype_bytes),
                batch * (100 + context_len))

    def prefill(self, prompt_lens: list[int], dtype_bytes: float) -> tuple[float, float]:
        tokens = sum(prompt_lens)
        return (self.weight_bytes_read(tokens, dtype_bytes) + tokens * self.kv_bytes_per_token(dtype_bytes),
                100 * tokens + sum(n * (n + 1) / 2 for n in prompt_lens))


@dataclass
class C:
    start: int
    num_tokens: int


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_decode_and_prefill_chunks_are_told_apart_like_the_model_runner():
    assert is_decode(C(start=7, num_tokens=1))
    assert not is_decode(C(start=0, num_tokens=1))   # a one-token prompt
    assert not is_decode(C(start=0, num_tokens=5))
    assert not is_decode(C(start=8, num_tokens=4))   # a later prefill chunk


def test_step_cost_by_hand():
    cost = FakeCost()
    # Two decodes at positions 9 and 19 attend to 10 and 20 keys (mean 15).
    assert step_cost(cost, 1, [C(9, 1), C(19, 1)]) == (1000 + 2 * 15 * 10, 2 * (100 + 15))
    # Two whole prompts of 3 and 4 tokens.
    assert step_cost(cost, 1, [C(0, 3), C(0, 4)]) == (1000 + 7 * 10, 700 + 6 + 10)
    # A later chunk (start 8, 4 tokens) also reads 8 KV tokens back and has 4 * 8 more pairs.
    assert step_cost(cost, 1, [C(8, 4)]) == (1000 + 4 * 10 + 8 * 10, 400 + 10 + 32)
    # Mixed: the sum of both parts, with the weights read once.
    mixed = step_cost(cost, 2, [C(9, 1), C(0, 3)])
    assert mixed == (2000 + 10 * 20 + 3 * 20, 110 + 300 + 6)
    assert step_cost(None, 2, [C(9, 1)]) == (0.0, 0.0)


def test_accumulator_counters_window_and_utilization_by_hand():
    clock = Clock()
    peaks = MachinePeaks(bandwidth_bytes_per_s=1e4, flops_per_s=1e3)
    stats = StepStats(FakeCost(), 1, peaks, window_steps=3, window_s=5.0, clock=clock)
    r1 = stats.record_chunks([C(0, 3), C(0, 4)], seconds=0.5)     # 1070 B, 716 FLOPs
    assert (r1.batch_size, r1.prefill_tokens, r1.decode_tokens) == (2, 7, 0)
    assert r1.mbu(peaks) == pytest.approx(1070 / 0.5 / 1e4)
    assert r1.mfu(peaks) == pytest.approx(716 / 0.5 / 1e3)
    clock.t += 1
    stats.record_chunks([C(3, 1), C(4, 1)], seconds=0.25)         # contexts 4, 5: 1090 B, 209 FLOPs
    clock.t += 1
    stats.record(seconds=0.25, batch_size=4, prefill_tokens=0, decode_tokens=4, nbytes=2000, flops=500)

    snap = stats.snapshot()
    assert snap.steps == 3
    assert snap.busy_seconds == pytest.approx(1.0)
    assert (snap.prefill_tokens, snap.decode_tokens, snap.batch_size_sum) == (7, 6, 8)
    assert snap.bytes == 1070 + 1090 + 2000
    assert snap.flops == 716 + 209 + 500
    assert snap.recent_steps == 3
    assert snap.recent_batch_size == pytest.approx(8 / 3)
    # Busy-time weighted: window totals over window step time.
    assert snap.recent_mbu == pytest.approx(4160 / 1.0 / 1e4)
    assert snap.recent_mfu == pytest.approx(1425 / 1.0 / 1e3)
    assert snap.peak_bandwidth_bytes_per_s == 1e4 and snap.peak_flops_per_s == 1e3

    # The ring is bounded; the counters are not.
    stats.record(seconds=1.0, batch_size=1, prefill_tokens=0, decode_tokens=1, nbytes=100, flops=10)
    assert len(stats.recent_steps()) == 3
    assert stats.recent_steps(1)[0]["mbu"] == pytest.approx(100 / 1.0 / 1e4)
    assert stats.snapshot().steps == 4

    # Steps older than window_s drop out of the recent figures.
    clock.t += 4.5
    snap = stats.snapshot()
    assert snap.recent_steps == 2                 # ended at t+2 and t+2, now t+6.5
    clock.t += 10
    snap = stats.snapshot()
    assert snap.recent_steps == 0
    assert snap.recent_batch_size is None and snap.recent_mbu is None and snap.recent_mfu is None
    assert snap.steps == 4


def test_without_peaks_there_is_no_utilization_but_everything_else_counts():
    stats = StepStats(FakeCost(), 1, None)
    rec = stats.record_chunks([C(5, 1)], seconds=0.1)
    assert rec.mbu(None) is None and rec.mfu(None) is None
    snap = stats.snapshot()
    assert snap.steps == 1 and snap.bytes > 0
    assert snap.recent_mbu is None and snap.peak_bandwidth_bytes_per_s is None
    stats.set_peaks(MachinePeaks(1e9, 1e9))
    assert stats.snapshot().recent_mbu == pytest.approx(snap.bytes / 0.1 / 1e9)


def test_bad_window_is_refused():
    with pytest.raises(ValueError, match="window_steps"):
        StepStats(None, 4, window_steps=0)
    with pytest.raises(ValueError, match="window_s"):
        StepStats(None, 4, window_s=0)


def test_tiny_engine_counts_steps_tokens_and_stamps_first_outputs(tiny_model):
    peaks = MachinePeaks(bandwidth_bytes_per_s=1e10, flops_per_s=1e11)
    # A 16-token step budget chunks the 30-token prompt.
    engine = LLMEngine(tiny_model, block_size=4, num_blocks=64, max_batched_tokens=16, peaks=peaks)
    engine.step_accounting.window_s = 3600.0   # a slow shared machine must not age steps out
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    prompts = {"a": list(range(1, 11)), "b": list(range(1, 31)), "c": [5]}
    for rid, ids in prompts.items():
        engine.add_request(rid, params=params, prompt_token_ids=ids)
    firsts, steps = {}, 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.timestamps is not None:
                assert out.request_id not in firsts, "only the first output carries timestamps"
                assert out.num_output_tokens == 1
                firsts[out.request_id] = out.timestamps
        steps += 1
    assert engine.step() == []          # idle steps are not recorded

    snap = engine.step_stats()
    assert snap.steps == steps == engine.num_steps
    # Every prompt token is prefilled once (no preemption); every token after the first is one decode.
    assert snap.prefill_tokens == sum(len(p) for p in prompts.values())
    assert snap.decode_tokens == 3 * (params.max_tokens - 1)
    assert snap.bytes > 0 and snap.flops > 0 and snap.busy_seconds > 0
    assert snap.recent_steps == steps
    assert 0 < snap.recent_mbu and 0 < snap.recent_mfu
    assert snap.batch_size_sum / snap.steps == pytest.approx(snap.recent_batch_size)

    assert set(firsts) == set(prompts)
    for ts in firsts.values():
        assert ts["added"] <= ts["scheduled"] <= ts["first_token"]
    # b was chunked: its first token comes a step after a's.
    assert firsts["a"]["first_token"] < firsts["b"]["first_token"]


def test_tiny_engine_costs_its_steps_with_the_real_cost_model(tiny_model):
    engine = LLMEngine(tiny_model, block_size=4, num_blocks=16)
    engine.add_request("r", params=SamplingParams(max_tokens=3, ignore_eos=True), prompt_token_ids=list(range(1, 11)))
    while engine.has_unfinished():
        engine.step()
    dims, nb = ModelDims.from_hf_config(tiny_model.config), dtype_bytes(engine.layout.dtype)
    # Prefill of 10 tokens, then decodes attending to 11 and 12 keys.
    parts = [dims.prefill([10], nb), dims.decode_step(1, 11, nb), dims.decode_step(1, 12, nb)]
    steps = engine.step_accounting.recent_steps()
    assert [(s["bytes"], s["flops"]) for s in steps] == [(float(b), float(f)) for b, f in parts]
    assert [(s["batch_size"], s["prefill_tokens"], s["decode_tokens"]) for s in steps] == [(1, 10, 0), (1, 0, 1), (1, 0, 1)]
    assert all(s["mbu"] is None for s in steps)    # no peaks given


def test_imported_and_exported_requests_carry_their_own_timestamps(tiny_model):
    """The prefill side stamps its kv_ready output; the decode side stamps
    its first output after the import (decode queue = scheduled - added)."""
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    src = LLMEngine(tiny_model, block_size=4, num_blocks=32)
    dst = LLMEngine(tiny_model, block_size=4, num_blocks=32)
    src.add_request("r", params=params, prompt_token_ids=list(range(1, 9)), export_after_prefill=True)
    (first,) = src.step()
    assert first.kv_ready and first.timestamps is not None
    assert first.timestamps["added"] <= first.timestamps["scheduled"] <= first.timestamps["first_token"]
    assert dst.import_kv(src.export_kv("r"), params)
    src.release("r")
    outs = []
    while dst.has_unfinished():
        outs += dst.step()
    assert outs[0].timestamps is not None and all(o.timestamps is None for o in outs[1:])
    ts = outs[0].timestamps
    assert first.timestamps["first_token"] <= ts["added"] <= ts["scheduled"] <= ts["first_token"]
    assert dst.step_stats().prefill_tokens == 0
    assert dst.step_stats().decode_tokens == params.max_tokens - 1


def _held_bytes(lin) -> int:
    """The bytes of every weight-format tensor a quantized layer holds (whichever of them its kernel uses)."""
    names = ("qweight", "scale", "packed", "scale_zero", "scales", "offsets", "q")
    return sum(t.numel() * t.element_size() for t in (getattr(lin, n, None) for n in names) if t is not None)


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_engine_counts_the_bytes_its_format_reads(tiny_model, quantization):
    """An int8/int4 engine's steps charge the projections' and LM head's bytes as held (weights,
    scales), not the activation dtype's four bytes per weight."""
    from engine.model_loader import TINY_MODEL, load_model

    loaded = load_model(TINY_MODEL, quantization=quantization)
    engine = LLMEngine(loaded, block_size=4, num_blocks=16)
    engine.add_request("r", params=SamplingParams(max_tokens=2, ignore_eos=True), prompt_token_ids=list(range(1, 11)))
    while engine.has_unfinished():
        engine.step()
    w, dims, nb = loaded.weights, ModelDims.from_hf_config(loaded.config), dtype_bytes(engine.layout.dtype)
    head = w.lm_head.few if hasattr(w.lm_head, "few") else w.lm_head
    held = _held_bytes(head) + sum(_held_bytes(lin) for layer in w.layers
                                   for lin in (layer.qkv, layer.o, layer.gate_up, layer.down))
    held += sum(t.numel() * t.element_size() for layer in w.layers for t in (layer.input_norm, layer.post_norm))
    held += w.final_norm.numel() * w.final_norm.element_size()
    kv = dims.kv_bytes_per_token(nb)
    steps = engine.step_accounting.recent_steps()
    # Prefill of 10 tokens (10 embedding rows, 10 KV tokens written), then a decode attending to 11 keys.
    assert [s["bytes"] for s in steps] == [held + 10 * dims.hidden_size * nb + 10 * kv,
                                           held + dims.hidden_size * nb + 11 * kv]
    assert [s["flops"] for s in steps] == [dims.prefill([10], nb)[1], dims.decode_step(1, 11, nb)[1]]
    # Far below what the float32 count charges for the same weights.
    assert held < 0.4 * dims.weight_bytes_read(0, nb)
