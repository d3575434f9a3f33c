"""awq_example.py: scaling lowers the activation-weighted error, scaling preserves the FP model,
clipping helps, and the script (from scratch and llm-compressor) on the tiny model."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import QUANT_EXAMPLES, assert_results_header, run_script, run_script_json

sys.path.insert(0, str(QUANT_EXAMPLES))
import awq_example as awq  # noqa: E402  (the example's folder is put on the path just above)

SCRIPT = QUANT_EXAMPLES / "awq_example.py"


def outlier_inputs(seed: int = 0, n: int = 2048, d_in: int = 128, n_salient: int = 4, boost: float = 20.0):
    """Activations with a few salient channels, 20x larger than the rest, as LLM activations have."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d_in, generator=gen)
    X[:, :n_salient] *= boost
    weights = [torch.randn(64, d_in, generator=gen) / d_in**0.5 for _ in range(2)]
    return X, weights


@pytest.mark.parametrize("bits,sym", [(4, False), (3, False), (4, True)])
def test_awq_scaling_lowers_activation_weighted_error(bits, sym):
    X, weights = outlier_inputs()
    s, alpha, loss, rtn_loss = awq.awq_search(X, weights, bits, 32, sym, n_grid=20, n_tokens=1024)
    print(f"alpha {alpha:.2f}: ||X Wᵀ − (X/s) Q(W s)ᵀ||² {loss:.4e} vs RTN {rtn_loss:.4e} ({loss / rtn_loss:.3f})")
    assert alpha > 0 and loss < 0.8 * rtn_loss
    assert s[:4].min() > s[4:].max()  # the salient channels got the largest scales
    # the returned loss is what the scales really give, on fresh tokens too
    X_new, _ = outlier_inputs(seed=1)
    err = lambda scale: sum(((X_new / scale) @ awq.fake_quantize(W * scale, bits, 32, sym).T - X_new @ W.T)
                            .pow(2).sum(1).mean() for W in weights)
    assert err(s) < err(torch.ones_like(s))


def test_awq_clip_never_worse_than_no_clip():
    X, weights = outlier_inputs(seed=2)
    W = weights[0]
    W[:, 10] *= 6  # one outlier column stretches its groups
    clipped = awq.awq_clip(W, X, 4, 32, sym=False)
    err = lambda W_: (X @ (awq.fake_quantize(W_, 4, 32, False) - W).T).pow(2).mean()
    print(f"output MSE: clipped {err(clipped):.4e}, unclipped {err(W):.4e}")
    assert err(clipped) <= err(W)
    assert (clipped.abs() <= W.abs() + 1e-7).all()


def test_awq_apply_keeps_the_fp_model(tiny_model):
    """Scaling is an identity transformation before rounding: logits do not change."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        gen = torch.Generator().manual_seed(1)
        for layer in model.model.layers:
            for group in awq.scale_groups(layer):
                if group.prev is not None:
                    width = next(iter(group.linears.values())).in_features
                    awq.awq_apply(group, torch.rand(width, generator=gen, dtype=torch.float64) * 4 + 0.25)
        after = model(ids).logits
    print(f"max |Δ logit| after scaling: {(after - before).abs().max():.2e}")
    assert torch.allclose(before, after, atol=1e-9)
    groups = [g.name for g in awq.scale_groups(model.model.layers[0]) if g.prev is not None]
    assert groups == ["qkv", "gate_up", "down"]  # GQA: o_proj's input is not v_proj's output one to one


def test_script_on_tiny_model(tiny_model, tmp_path):
    save = tmp_path / "checkpoint"
    result = run_script_json(SCRIPT, tmp_path / "awq.json", "--model", tiny_model, "--method", "both",
                             "--bits", "4", "--group-size", "32", "--calib-samples", "8", "--calib-seqlen", "128",
                             "--eval-tokens", "1024", "--ctx", "128", "--save", save, "--quiet")
    assert_results_header(result)
    rows = {(r["method"], r["impl"]): r for r in result["rows"]}
    assert set(rows) == {("fp", "reference"), ("rtn", "scratch"), ("awq", "scratch"), ("awq", "llmcompressor")}
    fp = rows["fp", "reference"]
    for key in [("rtn", "scratch"), ("awq", "scratch"), ("awq", "llmcompressor")]:
        assert rows[key]["size_mb"] < 0.75 * fp["size_mb"] and rows[key]["kl"] > 0
        assert rows[key]["eval_tokens"] == fp["eval_tokens"] == 8 * 127
    searched = [r for r in result["scale_search"] if r["alpha"] is not None]
    assert len(searched) == 2 * 3  # qkv, gate_up, down in each of the 2 layers
    assert all(0 <= r["alpha"] < 1 and r["loss"] <= r["rtn_loss"] for r in searched)
    config = json.loads((save / "config.json").read_text())
    weights = config["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, 32, False)
    assert len(result["checkpoint"]["reload_generation"]["token_ids"]) == 8


@pytest.mark.parametrize("args,message", [
    (["--method", "both", "--bits", "3"], "--bits 3"),
    (["--model", "/nonexistent/model-folder"], "cannot load model"),
    (["--group-size", "48"], "does not divide"),
])
def test_bad_input_is_one_line_error(tiny_model, args, message):
    if "--model" not in args:
        args = ["--model", tiny_model, *args]
    proc = run_script(SCRIPT, *args, "--quiet", check=False, timeout=600)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[-1].startswith("error: ") and message in lines[-1], lines
