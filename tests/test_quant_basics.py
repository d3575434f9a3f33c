"""quant_basics.py: round-to-nearest written out, its error sweep, and the memory calculator."""

from __future__ import annotations


import pytest
import torch

from conftest import import_example, QUANT_EXAMPLES, assert_results_header, run_script, run_script_json

SCRIPT = QUANT_EXAMPLES / "quant_basics.py"


def load_module():

    return import_example(SCRIPT)


qb = load_module()


def row(result, scheme, bits, group):
    return next(r for r in result["rows"] if (r["scheme"], r["bits"], r["group_size"]) == (scheme, bits, group))


def test_sweep_on_tiny_model(tiny_model, tmp_path):
    out = tmp_path / "qb.json"
    result = run_script_json(SCRIPT, out, "--model", tiny_model, "--device", "cpu",
                             "--bits", "3", "4", "8", "--group-size", "0", "32", "--quiet")
    assert_results_header(result)
    assert result["n_weights"] == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    assert len(result["rows"]) == 3 * 3 * 2
    for scheme in qb.SCHEMES:
        for group in (0, 32):
            errors = [row(result, scheme, b, group)["rel_error"] for b in (3, 4, 8)]
            print(scheme, group, errors)
            assert errors[0] > errors[1] > errors[2], "more bits must mean less error"
        # smaller groups adapt the grid to fewer weights: less error, more stored bits
        assert row(result, scheme, 4, 32)["rel_error"] < row(result, scheme, 4, 0)["rel_error"]
        assert row(result, scheme, 4, 32)["bits_per_weight"] > row(result, scheme, 4, 0)["bits_per_weight"]
        assert row(result, scheme, 8, 32)["rel_error"] < 0.01
    assert row(result, "absmax", 4, 32)["bits_per_weight"] == pytest.approx(4 + 16 / 32)
    assert row(result, "zeropoint", 4, 32)["bits_per_weight"] == pytest.approx(4 + 20 / 32)
    for suffix in (".md", ".png"):
        assert out.with_suffix(suffix).stat().st_size > 0
    table = (tmp_path / "memory-estimates.md").read_text()
    assert "Llama-3-70B" in table and "| 16.06 |" in table  # Llama-3-8B in FP16: 8.03e9 × 2 bytes


def test_q4_1_grid_is_reproduced_on_smollm2(smollm2, tmp_path):
    """SmolLM2's weights came through Q4_1: 4-bit min-scale with group 32 is exact, nothing else is."""
    result = run_script_json(SCRIPT, tmp_path / "qb.json", "--model", smollm2, "--device", "cpu", "--max-layers", "1",
                             "--bits", "4", "--group-size", "32", "64", "--schemes", "minscale", "zeropoint", "--quiet")
    aligned = row(result, "minscale", 4, 32)
    print({k: row(result, s, 4, g)["rel_error"] for k, (s, g) in
           {"minscale g32": ("minscale", 32), "minscale g64": ("minscale", 64), "zeropoint g32": ("zeropoint", 32)}.items()})
    assert aligned["rel_error"] == 0.0 and aligned["exact_fraction"] == 1.0
    assert row(result, "minscale", 4, 64)["rel_error"] > 0.05
    # an integer zero shifts the grid by a multiple of the scale, so it misses Q4_1's real-valued minimum
    assert row(result, "zeropoint", 4, 32)["rel_error"] > 0.05


@pytest.mark.parametrize("scheme", qb.SCHEMES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequantized_weights_lie_on_their_grid(scheme, bits):
    torch.manual_seed(0)
    W = torch.randn(48, 96) * torch.linspace(0.1, 3.0, 96)  # odd widths, uneven column scales
    quantize, dequantize = qb.PAIRS[scheme]
    q, scale, zero = quantize(W, bits, 32)
    assert q.shape == (48, 3, 32) and scale.shape == zero.shape == (48, 3, 1)
    levels = q.to(torch.int32)
    if scheme == "absmax":
        assert levels.abs().max() <= 2 ** (bits - 1) - 1
    else:
        assert levels.min() >= 0 and levels.max() <= 2**bits - 1
    assert torch.equal(scale, scale.half().float()), "scales are stored in FP16"
    W_hat = dequantize(q, scale, zero)
    # every weight lies within half a step of the grid, up to the FP16 rounding of the scale
    # (at most 2^b · 2^-11 steps at the top level); an integer zero moves the grid by up to
    # half a step more, which can clip the largest weight of a group
    tol = 0.5 + 2**bits * 2**-11 + (0.5 if scheme == "zeropoint" else 0.0)
    step = scale.expand(-1, -1, 32).flatten(1)
    assert ((W - W_hat).abs() <= tol * step + 1e-6).all()
    assert (W - W_hat).abs().mean() < 0.5 * step.mean()


def test_memory_formula():
    n = 8.03e9
    assert qb.weight_memory_bytes(n, 16) == pytest.approx(16.06e9)
    assert qb.weight_memory_bytes(n, 4, 128, 20) == pytest.approx(n * (4 + 20 / 128) / 8)
    rows = {r["model"]: r for r in qb.memory_table(qb.MODELS)}
    assert rows["Llama-3-70B"]["FP16"] == pytest.approx(141.2)
    assert rows["Llama-3-70B"]["INT4 g128"] == pytest.approx(70.6 * (4 + 20 / 128) / 8)
    # keeping the embeddings in FP16 costs more than storing them in 4 bits
    assert rows["Llama-3-8B"]["INT4 g128 + FP16 embeddings"] > rows["Llama-3-8B"]["INT4 g128"]


@pytest.mark.parametrize("flags", [["--bits", "1"], ["--group-size", "48"]])
def test_bad_input_is_one_line_error(tiny_model, flags):
    proc = run_script(SCRIPT, "--model", tiny_model, "--quiet", *flags, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(("error:", "quant_basics.py: error:"))
