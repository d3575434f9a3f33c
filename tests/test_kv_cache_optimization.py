"""kv_cache_optimization.py: cached greedy decode equals full recomputation, token for token.

Both paths run inside each test: the hand-written loop with and without the KV cache, and
transformers' generate(use_cache=True / False), on the tiny model and on SmolLM2 (float32); the
hand-written forward against the model's own logits. The KV bytes formula is checked against an
outside count, the tensor bytes of transformers' DynamicCache after a prefill, and against the
figure vLLM's CPU backend reports for SmolLM2. bench/kv_cache.py writes its documented schema.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import (ACCEL_EXAMPLES, BENCH, assert_refusal, assert_results_header,
                      import_example, run_bench, run_script)
from tolerances import LOGITS_FP32_REL, rel_err

SCRIPT = ACCEL_EXAMPLES / "kv_cache_optimization.py"
ks = import_example(SCRIPT)


def load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tiny(tiny_model: Path):
    return load(tiny_model)


@pytest.fixture(scope="module")
def smol(smollm2: Path):
    return load(smollm2)


def dynamic_cache_bytes(model, ids: torch.Tensor) -> int:
    """transformers' own cache after a prefill: the bytes of every layer's key and value tensors."""
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@pytest.mark.parametrize("which", ["tiny", "smol"])
def test_kv_bytes_equal_transformers_dynamic_cache(which: str, request: pytest.FixtureRequest) -> None:
    """2 x layers x Hkv x D x bytes per token, against the tensors transformers allocates."""
    model = request.getfixturevalue(which)
    B, T = 2, 7
    ids = torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    theirs = dynamic_cache_bytes(model, ids)
    ours = ks.kv_cache_bytes(model.config, T, B, bytes_per_value=4)
    _, cache = ks.forward(model, ids, start=0, cache=[])
    print(f"{which}: DynamicCache {theirs:,} B, formula {ours:,} B, our cache {ks.cache_bytes(cache):,} B")
    assert ours == theirs == ks.cache_bytes(cache)


def test_kv_bytes_against_vllm_reported_capacity(smollm2: Path) -> None:
    """vLLM's CPU backend reports 93,184 tokens (728 blocks of 128) for a 2 GiB pool on SmolLM2 in
    bf16 (the literature figure in kv_bytes_per_token's docstring); the formula must give it."""
    from transformers import AutoConfig

    assert "93,184 tokens for a 2 GiB" in ks.kv_bytes_per_token.__doc__
    per_token = ks.kv_bytes_per_token(AutoConfig.from_pretrained(smollm2), 2)
    blocks = 2 * 2**30 // (128 * per_token)
    print(f"SmolLM2 bf16: {per_token:,} B per token, {blocks} blocks of 128")
    assert blocks * 128 == 93_184


def test_kv_bytes_counts_kv_heads_not_query_heads() -> None:
    from transformers import LlamaConfig

    sys.path.insert(0, str(BENCH))
    import common

    llama3 = common.llama3_8b_config()  # H = 32, Hkv = 8: 128 KiB per token in bf16
    assert ks.kv_bytes_per_token(llama3, 2) == 32 * 2 * 8 * 128 * 2
    mha = LlamaConfig(num_hidden_layers=32, num_attention_heads=32, hidden_size=4096)
    assert ks.kv_bytes_per_token(mha, 2) == 4 * ks.kv_bytes_per_token(llama3, 2)
    assert ks.kv_bytes_per_token((32, 8, 128), 2) == ks.kv_bytes_per_token(llama3, 2)


def test_forward_equals_the_models_logits(tiny) -> None:
    """Prefill at once, chunked with an offset causal mask, and without a cache."""
    ids = torch.randint(0, tiny.config.vocab_size, (1, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = tiny(ids).logits[:, -1]  # (1, V)
    whole, cache = ks.forward(tiny, ids, start=0, cache=[])
    _, part = ks.forward(tiny, ids[:, :9], start=0, cache=[])
    chunked, cache2 = ks.forward(tiny, ids[:, 9:], start=9, cache=part)
    uncached, _ = ks.forward(tiny, ids, start=0, cache=None)
    for got in (whole, chunked, uncached):
        assert rel_err(got, expected) < LOGITS_FP32_REL
    K, V = cache[0]
    assert K.shape == (1, tiny.config.num_key_value_heads, 23, tiny.config.head_dim)  # (B, Hkv, T, D)
    for layer in range(len(cache)):
        for got, want in zip(cache2[layer], cache[layer]):
            assert rel_err(got, want) < LOGITS_FP32_REL


def greedy_four_ways(model, prompt: torch.Tensor, n: int) -> dict[str, list[int]]:
    cached, _, _ = ks.greedy_with_cache(model, prompt, n, stop_ids=set())
    plain, _ = ks.greedy_without_cache(model, prompt, n, stop_ids=set())
    return {"cached loop": cached, "recomputed loop": plain,
            "generate cached": ks.generate_tokens(model, prompt, n, use_cache=True),
            "generate recomputed": ks.generate_tokens(model, prompt, n, use_cache=False)}


def test_cached_greedy_equals_recomputation_tiny(tiny) -> None:
    prompt = torch.randint(0, tiny.config.vocab_size, (1, 11), generator=torch.Generator().manual_seed(2))
    runs = greedy_four_ways(tiny, prompt, 12)
    print(runs)
    assert len(runs["cached loop"]) == 12
    assert all(tokens == runs["cached loop"] for tokens in runs.values())


def test_cached_greedy_equals_recomputation_smollm2(smol, smollm2: Path) -> None:
    from transformers import AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(smollm2)("The capital of France is", return_tensors="pt").input_ids
    runs = greedy_four_ways(smol, prompt, 8)
    print(runs)
    assert all(tokens == runs["cached loop"] for tokens in runs.values())


def test_script_runs_on_the_tiny_model(tiny_model: Path) -> None:
    proc = run_script(SCRIPT, "--model", tiny_model, "--max-new-tokens", "4", "--device", "cpu")
    assert "generate(use_cache=False)" in proc.stdout and "same tokens as cached loop" in proc.stdout
    assert "formula" in proc.stdout


def test_refusals(tmp_path: Path, tiny) -> None:
    assert_refusal(run_script(SCRIPT, "--model", tmp_path / "missing", check=False), "no model folder")
    if not torch.cuda.is_available():
        assert_refusal(run_script(SCRIPT, "--device", "cuda", check=False), "no CUDA GPU")
    parser = ks.build_parser()
    with pytest.raises(SystemExit) as exit_info:
        ks.main(parser.parse_args(["--max-new-tokens", "0"]))
    assert exit_info.value.code == 2
    with pytest.raises(ks.Refusal, match="prompt is empty"):
        ks.encode_prompt(None, "  ", chat=False, device=torch.device("cpu"))
    with pytest.raises(ks.Refusal, match="not a Llama-style model"):
        ks.check_llama_style(torch.nn.Linear(2, 2))


def check_bench_schema(result: dict, out: Path, preset: str, loop: bool) -> None:
    assert_results_header(result)
    assert result["quick"] and result["preset"] == preset
    for key in ("model", "kv_bytes_per_token", "weight_bytes_per_step", "copy_bandwidth_gbs", "sweep"):
        assert key in result, key
    for row in result["sweep"]:
        for key in ("context", "ms_cache", "ms_no_cache", "ratio", "kv_cache_bytes", "kv_cache_bytes_formula",
                    "bytes_per_cached_step", "gb_per_s_cached", "roofline_fraction"):
            assert key in row, key
        assert {"median", "q1", "q3", "n"} <= set(row["ms_cache"])
        assert row["kv_cache_bytes"] == row["kv_cache_bytes_formula"]  # measured tensors vs formula
    assert ("loop" in result) == loop and ("generate" in result) == loop
    stem = f"kv_cache_optimization-{preset}"
    for suffix in (".md", ".en.md", ".png", "-memory.png"):
        assert (out / f"{stem}{suffix}").stat().st_size > 100, suffix


def test_bench_cpu_preset_writes_its_schema(tiny_model: Path, tmp_path: Path) -> None:
    result = run_bench("kv_cache", "cpu", tmp_path, model=tiny_model)
    check_bench_schema(result, tmp_path, "cpu", loop=True)
    assert set(result["generate"]) == {"use_cache=True", "use_cache=False"}
    assert result["loop"]["new_tokens"] == result["settings"]["max_new_tokens"]
    memory = json.loads((tmp_path / "kv_cache_optimization-cpu-kv-memory.json").read_text())
    rows = {r["model"]: r for r in memory["rows"]}
    assert rows["Llama-3-8B"]["bytes_per_token"] == 131_072 and rows["Llama-3-8B"]["overstatement"] == 4
    assert "131,072 B" in (tmp_path / "kv_cache_optimization-cpu-kv-memory.en.md").read_text()


def test_bench_h200_path_on_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The h200 preset's code (random Llama-3-8B-shaped weights, sweep only) with --quick's small
    shape, run in-process with the device switched to the CPU."""
    bench = import_example(BENCH / "kv_cache.py")
    monkeypatch.setitem(bench.PRESETS["h200"], "device", "cpu")
    monkeypatch.setattr(sys, "argv", [str(BENCH / "kv_cache.py"), "--preset", "h200", "--quick"])
    bench.main(argparse.Namespace(preset="h200", quick=True, model=None, out=tmp_path))
    result = json.loads((tmp_path / "kv_cache_optimization-h200.json").read_text())
    check_bench_schema(result, tmp_path, "h200", loop=False)
    assert result["model"].startswith("Llama-3-8B shape")


def test_bench_refuses_an_unwritable_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = run_script(BENCH / "kv_cache.py", "--preset", "cpu", "--quick", "--out", blocker / "sub", check=False)
    assert_refusal(proc, "cannot write")
    assert not list(tmp_path.glob("**/*.json"))


@pytest.mark.gpu
def test_gpu_bench_h200_preset_quick(tmp_path: Path) -> None:
    result = run_bench("kv_cache", "h200", tmp_path)
    check_bench_schema(result, tmp_path, "h200", loop=False)
    assert "cuda" in result["versions"]
