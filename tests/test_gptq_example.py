"""gptq_example.py: GPTQ beats round-to-nearest on correlated inputs, our RTN equals
compressed-tensors' quantizer on real weights, scratch GPTQ agrees with llm-compressor's on
SmolLM2, and the script runs (and refuses bad input) as a reader runs it."""

from __future__ import annotations

import pytest
import torch

import tolerances
from conftest import QUANT_EXAMPLES, assert_refusal, import_example, run_script

SCRIPT = QUANT_EXAMPLES / "gptq_example.py"
gptq = import_example(SCRIPT)


def correlated_layer(seed: int = 0, n: int = 4096, K: int = 128, N: int = 64):
    """Inputs whose channels are strongly correlated (a mixing matrix with a decaying spectrum),
    as activations of real models are: where GPTQ's error feedback pays off."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=gen) * torch.logspace(0, -2, K).unsqueeze(1)
    X = torch.randn(n, K, generator=gen) @ mix  # (n, K)
    W = torch.randn(N, K, generator=gen) / K**0.5  # (N, K)
    return X, W, 2 * X.T @ X / n


@pytest.mark.parametrize("bits,group_size,act_order", [(4, -1, False), (4, 32, True), (3, 32, False),
                                                       (3, -1, True)])
def test_gptq_output_error_below_rtn(bits, group_size, act_order):
    X, W, H = correlated_layer()
    Q = gptq.dequantize_rtn(*gptq.quantize_gptq(W, H, bits, group_size, True, block_size=32,
                                                act_order=act_order))
    W_rtn = gptq.dequantize_rtn(*gptq.quantize_rtn(W, bits, group_size, True))
    err_gptq = (X @ (W - Q).T).pow(2).mean().item()
    err_rtn = (X @ (W - W_rtn).T).pow(2).mean().item()
    print(f"output MSE: GPTQ {err_gptq:.3e}, RTN {err_rtn:.3e}, ratio {err_gptq / err_rtn:.3f}")
    assert err_gptq < tolerances.GPTQ_OVER_RTN_ERROR * err_rtn
    # the printed per-layer error is the same quantity, computed from H
    assert gptq.output_error(W - Q, H) == pytest.approx(err_gptq * W.shape[0], rel=1e-3)  # sum over N


@pytest.mark.parametrize("sym", [True, False])
def test_gptq_codes_lie_on_the_grid(sym):
    _, W, H = correlated_layer(seed=1)
    q, scale, zero = gptq.quantize_gptq(W, H, 3, 32, sym, block_size=48, act_order=False)
    assert scale.shape == zero.shape == (64, 128 // 32)
    assert torch.equal(q, q.round()) and q.min() >= 0 and q.max() <= 7


def real_weights(smollm2, count: int = 14):
    from safetensors import safe_open

    with safe_open(str(smollm2 / "model.safetensors"), "pt") as f:
        names = [n for n in f.keys() if n.endswith("proj.weight")][:count]
        return {n: f.get_tensor(n).float() for n in names}


@pytest.mark.parametrize("sym", [True, False])
def test_rtn_equals_compressed_tensors_on_smollm2(smollm2, sym):
    """Our int4 group-64 RTN against compressed-tensors' calculate_qparams/quantize/dequantize
    (the functions llm-compressor's checkpoints are made with), on SmolLM2's own weights.
    Their codes are signed (q − 8), ours unsigned with zero point 8 (symmetric)."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=4, symmetric=sym, strategy="group", group_size=64)
    differ = total = 0
    for name, W in real_weights(smollm2).items():
        N, K = W.shape
        q, scale, zero = gptq.quantize_rtn(W, 4, 64, sym)
        Wg = W.reshape(N, K // 64, 64)
        ref_scale, ref_zero = calculate_qparams(Wg.amin(-1), Wg.amax(-1), args)
        assert torch.equal(scale, ref_scale), name
        assert torch.equal(zero - 8, ref_zero.float()), name
        ref_q = quantize(W, ref_scale, ref_zero, args)
        assert (ref_q - (q - 8)).abs().max() <= 1, name
        differ += int((ref_q != q - 8).sum())
        total += q.numel()
        if sym:
            assert torch.equal(dequantize(ref_q, ref_scale, ref_zero, args),
                               gptq.dequantize_rtn(q, scale, zero)), name
    print(f"codes that differ: {differ} of {total}")
    assert differ == 0 if sym else differ <= tolerances.RTN_ASYM_TIE_FRACTION * total


def test_script_on_tiny_model(tiny_model):
    proc = run_script(SCRIPT, "--model", tiny_model, "--group-size", "32", "--calib-samples", "2",
                      "--eval-tokens", "512")
    print(proc.stdout[-2000:])
    assert "layer  1  output error" in proc.stdout
    for row in ("FP ", "RTN ", "GPTQ ", "GPTQ (llm-comp.)"):
        assert f"\n{row}" in proc.stdout, row


@pytest.mark.parametrize("args,words", [
    (["--model", "/nonexistent/model-folder"], ["cannot load model"]),
    (["--device", "cuda"], ["--device cuda"]),
    (["--group-size", "48"], ["does not divide", "-1"]),
    (["--bits", "3"], ["--bits 3"]),
])
def test_refusals(tiny_model, args, words):
    if torch.cuda.is_available() and args[0] == "--device":
        pytest.skip("this machine has a GPU")
    full = ["--model", tiny_model, "--eval-tokens", "512", *args] if "--model" not in args else args
    assert_refusal(run_script(SCRIPT, *full, "--quiet", check=False), *words)


@pytest.mark.parametrize("flag,value", [("--group-size", "0"), ("--calib-samples", "-1"),
                                        ("--eval-tokens", "0")])
def test_bad_sizes_are_parser_errors(flag, value):
    proc = run_script(SCRIPT, flag, value, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.slow  # about 2 minutes on the 2-core CI machine: GPTQ twice on SmolLM2
def test_scratch_and_library_gptq_agree_on_smollm2(smollm2, corpus):
    """Both GPTQs on the same small calibration set, evaluated on the same tokens."""
    model, tokenizer = gptq.load_model(str(smollm2), "cpu")
    calib = gptq.token_windows(tokenizer, corpus[0], 4, 256, spread=True)  # (4, 256)
    evals = gptq.token_windows(tokenizer, corpus[1], 4, 256)  # (4, 256)
    reference = list(gptq.log_probs(model, evals))
    fresh, _ = gptq.load_model(str(smollm2), "cpu")
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        library = gptq.llmcompressor_gptq(fresh, tokenizer, calib, 4, 64, True, True, Path(tmp))
    lib = gptq.evaluate(evals, reference, gptq.log_probs(library, evals))
    gptq.gptq_model(model, calib, 4, 64, True, log=None)
    ours = gptq.evaluate(evals, reference, gptq.log_probs(model, evals))
    print(f"perplexity ours {ours['perplexity']:.3f} library {lib['perplexity']:.3f}; "
          f"KL ours {ours['kl']:.4f} library {lib['kl']:.4f}")
    assert abs(ours["perplexity"] / lib["perplexity"] - 1) < tolerances.GPTQ_SCRATCH_VS_LIBRARY_PPL
    assert abs(ours["kl"] / lib["kl"] - 1) < tolerances.GPTQ_SCRATCH_VS_LIBRARY_KL
