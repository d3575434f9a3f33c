"""awq_example.py: the searched scales lower the activation-weighted error, scaling leaves the
float model unchanged, clipping never hurts, and the script runs (and refuses bad input)."""

from __future__ import annotations

import pytest
import torch

import tolerances
from conftest import QUANT_EXAMPLES, assert_refusal, import_example, run_script

SCRIPT = QUANT_EXAMPLES / "awq_example.py"
awq = import_example(SCRIPT)


def outlier_inputs(seed: int = 0, n: int = 2048, K: int = 128, n_salient: int = 4, boost: float = 20.0):
    """Activations with a few salient channels, 20x larger than the rest, as LLMs have."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, K, generator=gen)
    X[:, :n_salient] *= boost
    return X, [torch.randn(64, K, generator=gen) / K**0.5 for _ in range(2)]


@pytest.mark.parametrize("bits,sym", [(4, False), (3, False), (4, True)])
def test_awq_scaling_lowers_activation_weighted_error(bits, sym):
    X, weights = outlier_inputs()
    s, alpha, loss, rtn_loss = awq.awq_search(X, weights, bits, 32, sym, n_grid=20, n_tokens=1024)
    print(f"alpha {alpha:.2f}: loss {loss:.4e} vs RTN {rtn_loss:.4e} ({loss / rtn_loss:.3f})")
    assert alpha > 0 and loss < tolerances.AWQ_OVER_RTN_LOSS * rtn_loss
    assert s[:4].min() > s[4:].max()  # the salient channels got the largest scales
    # recompute the loss on fresh tokens ourselves: the scales help there too
    X_new, _ = outlier_inputs(seed=1)

    def err(scale):
        return sum(((X_new / scale) @ awq.fake_quantize(W * scale, bits, 32, sym).T - X_new @ W.T)
                   .pow(2).sum(1).mean() for W in weights)

    assert err(s) < err(torch.ones_like(s))


def test_awq_clip_never_worse_than_no_clip():
    X, weights = outlier_inputs(seed=2)
    W = weights[0]
    W[:, 10] *= 6  # one outlier column stretches its groups
    clipped = awq.awq_clip(W, X, 4, 32, sym=False)

    def err(W_):
        return (X @ (awq.fake_quantize(W_, 4, 32, False) - W).T).pow(2).mean()

    print(f"output MSE: clipped {err(clipped):.4e}, unclipped {err(W):.4e}")
    assert err(clipped) <= err(W)
    assert (clipped.abs() <= W.abs() + 1e-7).all()


def test_awq_scaling_keeps_the_float_model(tiny_model):
    """W · diag(s) with the producer divided by s: the same logits, compared in float64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float64).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        before = model(ids).logits
        for layer in model.model.layers:
            for group in awq.scale_groups(layer):
                if group.prev is not None:
                    K = next(iter(group.linears.values())).in_features
                    awq.awq_apply(group, torch.rand(K, generator=gen, dtype=torch.float64) * 4 + 0.25)
        after = model(ids).logits
    print(f"max |logit difference| after scaling: {(after - before).abs().max():.2e}")
    assert torch.allclose(before, after, rtol=0, atol=tolerances.AWQ_SCALING_FP64_ATOL)
    names = [g.name for g in awq.scale_groups(model.model.layers[0]) if g.prev is not None]
    assert names == ["qkv", "gate_up", "down"]  # GQA: o_proj's inputs are not v_proj's one to one


def test_script_on_tiny_model(tiny_model):
    proc = run_script(SCRIPT, "--model", tiny_model, "--group-size", "32", "--calib-samples", "2",
                      "--eval-tokens", "512", "--n-grid", "4")
    print(proc.stdout[-2000:])
    assert "layer  1  qkv alpha" in proc.stdout
    for row in ("FP ", "RTN ", "AWQ ", "AWQ (llm-comp.)"):
        assert f"\n{row}" in proc.stdout, row


@pytest.mark.parametrize("args,words", [
    (["--model", "/nonexistent/model-folder"], ["cannot load model"]),
    (["--device", "cuda"], ["--device cuda"]),
    (["--group-size", "48"], ["does not divide", "-1"]),
    (["--bits", "3"], ["--bits 4 or 8"]),
])
def test_refusals(tiny_model, args, words):
    if torch.cuda.is_available() and args[0] == "--device":
        pytest.skip("this machine has a GPU")
    full = ["--model", tiny_model, "--eval-tokens", "512", *args] if "--model" not in args else args
    assert_refusal(run_script(SCRIPT, *full, "--quiet", check=False), *words)


@pytest.mark.parametrize("flag,value", [("--group-size", "0"), ("--n-grid", "0"), ("--eval-tokens", "100")])
def test_bad_sizes_are_parser_errors(flag, value):
    proc = run_script(SCRIPT, flag, value, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
