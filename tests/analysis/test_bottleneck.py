"""analysis.bottleneck and analysis.hardware against hand-computed figures, and the CLI end to end.

The toy model is the one of tests/analysis/test_cost_model.py (2 layers, hidden 8,
intermediate 12, 4 heads / 2 KV heads of 2, vocab 10, untied): 1160 parameters,
non-embedding 1000, one layer's matrices 480, lm_head 80; at bf16 its weights
are 2320 bytes and its KV 32 bytes per token.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import MappingProxyType

import pytest

from analysis.bottleneck import PRESETS, Workload, analyze, devices_needed, load_dims, main, phase_cost, small_ratio
from analysis.cost_model import ModelDims
from analysis.hardware import LINKS, PROFILES, HardwareProfile, Link, local_profile, measure_tcp_loopback
from analysis.machine_peaks import MachinePeaks
from analysis.model_catalog import TINY_MODEL

REPO = Path(__file__).resolve().parents[2]

TOY = ModelDims(num_layers=2, hidden_size=8, intermediate_size=12, num_heads=4, num_kv_heads=2, head_dim=2,
                vocab_size=10)

# A made-up device with round numbers: 1000 B/s, 10000 FLOP/s at bf16 -> ridge point 10 FLOP/byte.
SLOW = HardwareProfile("slow", "test device", memory_bytes=1e6, bandwidth_bytes_per_s=1000,
                       flops_per_s=MappingProxyType({"bf16": 10000.0}), source="test")
ONE_LINK = (Link("test link", 48.0),)


def toy_report(hw: HardwareProfile = SLOW, rate: float | None = 1.0) -> dict:
    # 3-token prompts, 3 output tokens, decode batch 2, a 6-token prefill budget -> 2 prompts per prefill step.
    wl = Workload(input_len=3, output_len=3, batch=2, prefill_tokens=6, rate=rate)
    return analyze("toy", TOY, hw, "bf16", "bf16", wl, devices=1, links=ONE_LINK)


def test_toy_prefill_by_hand():
    pre = toy_report()["prefill"]
    # prefill([3, 3]) at 2 bytes: weights (1000 + 80 + 6 rows * 8) * 2 = 2256, KV written 6 * 32 = 192
    assert pre["bytes"] == 2448
    # FLOPs: 2 * 960 * 6 tokens = 11520, lm_head 2 * 80 * 2 prompts = 320, pairs 6 + 6 = 12 -> 4*12*2*4*2 = 768
    assert pre["flops"] == 12608
    assert pre["intensity"] == pytest.approx(12608 / 2448)       # 5.15 < ridge 10
    assert pre["bound"] == "bandwidth"
    assert pre["seconds"] == pytest.approx(2.448)               # 2448 B / 1000 B/s
    assert pre["seconds_per_request"] == pytest.approx(1.224)   # two prompts share the step


def test_toy_decode_by_hand():
    dec = toy_report()["decode"]
    # mean context 3 + 3/2 = 4.5; weights (1000 + 80 + 2 rows * 8) * 2 = 2192, KV read 2 * 4.5 * 32 = 288
    assert dec["bytes"] == 2480
    # FLOPs per token 2 * 1040 + 4 * 4.5 * 2 * 4 * 2 = 2080 + 288 = 2368, two tokens
    assert dec["flops"] == 4736
    assert dec["bound"] == "bandwidth"
    assert dec["tpot_s"] == pytest.approx(2.48)
    # O - 1 = 2 decode steps per request, shared by the batch of 2: 2.48 * 2 / 2
    assert dec["seconds_per_request"] == pytest.approx(2.48)


def test_toy_ratio_workers_memory_transfer():
    r = toy_report()
    # T_p / T_d = 1.224 / 2.48 = 0.4935 -> 1:2 (1.3% off)
    assert r["ratio"]["exact"] == pytest.approx(1.224 / 2.48)
    assert r["ratio"]["prefill_decode"] == "1:2"
    # at 1 request/s: ceil(1.224) = 2 prefill workers, ceil(2.48) = 3 decode workers
    assert r["ratio"]["workers"] == {"prefill": 2, "decode": 3}
    # memory: weights 2320, KV 2 requests * 6 tokens * 32 = 384; largest batch (1e6 - 2320) // 192 = 5196
    assert r["memory"] == {"weights_bytes": 2320, "kv_bytes": 384, "capacity_bytes": 1e6, "fits": True,
                           "max_batch": 5196}
    # one prompt's KV is 3 * 32 = 96 bytes: 2 s over a 48 B/s link, which carries 0.5 requests/s
    link = r["transfer"]["links"][0]
    assert r["transfer"]["prompt_kv_bytes"] == 96
    assert link["seconds"] == pytest.approx(2.0)
    assert link["max_requests_per_s"] == pytest.approx(0.5)
    assert link["tpot_multiple"] == pytest.approx(2.0 / 2.48)
    # Pope et al. 2022's reference point, 512 x 2048 tokens at 64 / 32 / 16 bytes per token
    assert r["kv"]["reference"]["bytes"] == {"fp32": 512 * 2048 * 64, "bf16": 512 * 2048 * 32, "fp8": 512 * 2048 * 16}
    assert r["param_bytes"] == {"fp32": 4640, "bf16": 2320, "fp8": 1160, "int4": 580}


def test_compute_bound_when_flops_are_scarce():
    # 100 FLOP/s, 1000 B/s: ridge 0.1 FLOP/byte, so both phases are compute-bound.
    hw = HardwareProfile("fast-mem", "test", 1e6, 1000, MappingProxyType({"bf16": 100.0}), "test")
    r = toy_report(hw, rate=None)
    assert (r["prefill"]["bound"], r["decode"]["bound"]) == ("compute", "compute")
    assert r["prefill"]["seconds"] == pytest.approx(126.08)     # 12608 FLOPs / 100
    assert r["decode"]["seconds"] == pytest.approx(47.36)       # 4736 / 100
    assert r["ratio"]["workers"] is None


def test_phase_cost_bound_at_the_ridge():
    peaks = MachinePeaks(bandwidth_bytes_per_s=100, flops_per_s=1000)   # ridge 10
    assert phase_cost(10, 99, peaks)["bound"] == "bandwidth"            # intensity 9.9
    assert phase_cost(10, 101, peaks)["bound"] == "compute"             # intensity 10.1
    assert phase_cost(10, 101, peaks)["seconds"] == pytest.approx(0.101)


def test_pope_kv_example_is_about_3_tb():
    """Pope et al. 2022: a 500B+ model at batch 512 and context 2048 has ~3 TB of KV (Pope et al. 2022, PaLM 540B
    with multi-head attention). 2 (K, V) * 118 layers * 48 heads * 256 = 2,899,968 values per token."""
    dims, _ = PRESETS["palm-540b-mha"]
    assert dims.param_count() > 500e9
    fp8 = dims.kv_cache_bytes(512, 2048, 1)
    assert fp8 == 2 * 118 * 48 * 256 * 1 * 512 * 2048 == 3_040_836_845_568
    assert dims.kv_cache_bytes(512, 2048, 2) == 2 * fp8          # 6.08 TB at bf16
    # "3x the weights": 3.04 TB against the real PaLM 540B's 1.08 TB of bf16 weights is 2.8x
    palm, _ = PRESETS["palm-540b"]
    assert fp8 / palm.param_bytes(2) == pytest.approx(2.81, abs=0.01)
    r = analyze("palm-540b-mha", dims, PROFILES["H100"], "bf16", "fp8", Workload(2048, 128, 512, 2048))
    assert r["kv"]["reference"]["bytes"]["fp8"] == fp8


def test_presets_match_published_parameter_counts():
    assert PRESETS["llama-3.1-8b"][0].param_count() == 8_030_261_248       # HF safetensors total
    assert PRESETS["llama-3.1-70b"][0].param_count() == 70_553_706_496
    assert PRESETS["llama-3.1-405b"][0].param_count() == 405_853_388_800
    assert PRESETS["palm-540b"][0].param_count() == pytest.approx(540.35e9, rel=1e-3)   # PaLM paper


def test_small_ratio():
    assert small_ratio(0.5) == (1, 2)
    assert small_ratio(0.92) == (1, 1)        # 1 / 0.92 = 1.087: within 10% of 1:1
    assert small_ratio(0.89) == (5, 6)        # 1 / 0.89 = 1.12 is not; 5/6 = 0.833 is 6.8% off
    assert small_ratio(0.6) == (3, 5)
    assert small_ratio(2.18) == (2, 1)
    assert small_ratio(20) == (8, 1)          # clamped to the largest term
    assert small_ratio(0.01) == (1, 8)


def test_devices_needed_powers_of_two():
    assert devices_needed(30, 10, 80) == 1
    assert devices_needed(100, 50, 40) == 4   # 150 bytes: 2 x 40 = 80 too small, 4 x 40 = 160 fits


def test_hardware_profiles():
    h100 = PROFILES["H100"]
    assert h100.peaks("bf16").ridge_point == pytest.approx(989.4e12 / 3.35e12)   # 295 FLOP/byte
    assert PROFILES["H200"].peaks("bf16").ridge_point == pytest.approx(989.4e12 / 4.8e12)
    assert PROFILES["A100"].compute_dtype("fp8") == "bf16"    # no fp8 units: weight-only, bf16 math
    assert h100.compute_dtype("fp8") == "fp8"
    assert h100.compute_dtype("int4") == "bf16"
    assert h100.compute_dtype("fp32") == "fp32"
    local = local_profile(MachinePeaks(20e9, 100e9), memory_bytes=8e9)
    assert local.compute_dtype("bf16") == "fp32"               # only the fp32 matmul is measured
    assert local.peaks("bf16").ridge_point == 5
    assert {ln.name for ln in LINKS} >= {"NVLink 4", "PCIe Gen5 x16", "400 Gb/s network", "100 Gb/s network"}


def test_tcp_loopback_measures_something():
    assert measure_tcp_loopback(nbytes=4 * 1024 * 1024) > 1e7


def test_load_dims_from_config_json(tmp_path):
    cfg = {"model_type": "qwen2", "num_hidden_layers": 2, "hidden_size": 8, "intermediate_size": 12,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 10}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    dims, source = load_dims(str(tmp_path))
    assert dims.param_count() == 1160 + 2 * 16         # the toy plus Qwen2's q/k/v biases
    assert source.endswith("config.json")
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(SystemExit, match="gpt2"):
        load_dims(str(tmp_path))
    with pytest.raises(SystemExit, match="not a preset"):
        load_dims(str(tmp_path / "nope"))


def test_tiny_llama_dims_are_the_built_model(tiny_model):
    """The catalogue's tiny-llama shape (what the report uses, without torch) is the model the engine builds."""
    dims, _ = load_dims(TINY_MODEL)
    assert dims == ModelDims.from_hf_config(tiny_model.config)
    assert dims.param_count() == sum(p.numel() for p in tiny_model.model.parameters())


def test_cli_text_on_tiny_llama(capsys):
    assert main(["--model", "builtin:tiny-llama", "--hardware", "H100", "--rate", "5"]) == 0
    out = capsys.readouterr().out
    for needle in ("builtin:tiny-llama", "ridge point 295 FLOP/byte", "prefill", "decode", "NVLink 4",
                   "Suggested prefill:decode", "at 5 requests/s", "Pope et al. 2022's example"):
        assert needle in out, needle


def test_cli_json_on_tiny_llama(capsys):
    assert main(["--model", "builtin:tiny-llama", "--hardware", "A100", "--json", "--dtype", "fp8"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["model"]["param_count"] == 119488               # the real model's sum of numel
    assert r["hardware"]["compute_dtype"] == "bf16"
    assert r["kv_dtype"] == "fp8"
    assert r["decode"]["bound"] == "bandwidth"
    assert re_ratio(r["ratio"]["prefill_decode"])


def re_ratio(s: str) -> bool:
    p, d = s.split(":")
    return 1 <= int(p) <= 8 and 1 <= int(d) <= 8


def test_cli_refuses_bad_workload():
    with pytest.raises(SystemExit, match="output_len"):
        main(["--model", "llama-3.1-8b", "--output-len", "1"])


def test_presets_and_tiny_llama_run_without_torch():
    code = ("import contextlib, io, sys, analysis.bottleneck as a\n"
            "with contextlib.redirect_stdout(io.StringIO()): a.main(['--model', 'builtin:tiny-llama'])\n"
            "a.main(['--model', 'llama-3.1-405b', '--json'])\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60, capture_output=True,
                         text=True).stdout
    r = json.loads(out)
    assert r["hardware"]["devices"] == 16      # 811 GB of bf16 weights + KV over 80 GB devices
    assert r["memory"]["fits"]
    assert math.isclose(r["hardware"]["ridge_point"], 989.4 / 3.35)
