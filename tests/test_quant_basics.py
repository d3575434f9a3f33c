"""quant_basics.py: round-to-nearest written out, checked against outside references.

Each RTN pair is compared with a library that does the same arithmetic: the integer zero-point
with compressed-tensors (the checkpoint format of GPTQ/AWQ models: calculate_qparams + quantize),
the absmax scale with torch's own PerChannelMinMaxObserver and its codes with compressed-tensors'
quantize, and min-scale at 4 bits, G = 32 with gguf-py's Q4_1 (llama.cpp's reference encoder):
codes, scales and zeros bit for bit, on real SmolLM2 rows and on Gaussian weights.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import QUANT_EXAMPLES, assert_refusal, assert_results_header, import_example, run_bench, run_script
from tolerances import RTN_VS_LIBRARY_MISMATCHES, ZEROPOINT_VS_CT_CODE_FRACTION

SCRIPT = QUANT_EXAMPLES / "quant_basics.py"
qb = import_example(SCRIPT)


@pytest.fixture(scope="module")
def smollm2_rows(smollm2) -> dict[str, torch.Tensor]:
    """Real weights: every linear weight of SmolLM2's first and last decoder layers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    last = model.config.num_hidden_layers - 1
    return {name: W for name, W in qb.linear_weights(model, None).items()
            if ".layers.0." in name or f".layers.{last}." in name}


def gaussian_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    W = torch.randn(48, 192) * torch.linspace(0.1, 3.0, 192)  # uneven column scales
    return {"gaussian": W}


def mismatches(ours: torch.Tensor, theirs: torch.Tensor) -> int:
    count = int((ours.float() != theirs.float()).sum())
    print(f"{count} of {ours.numel()} elements differ")
    return count


def compressed_tensors_rtn(W: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale=None):
    """compressed-tensors' qparams and codes for one weight (its signed range shifted to ours)."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    N, K = W.shape
    G = K if group_size == -1 else group_size
    args = QuantizationArgs(num_bits=bits, symmetric=symmetric, strategy="group", group_size=G,
                            scale_dtype=torch.float16)
    Wg = W.reshape(N, K // G, G)
    ct_scale, ct_zero = calculate_qparams(Wg.amin(-1), Wg.amax(-1), args)  # (N, K/G)
    if scale is not None:  # quantize with our scale (the absmax grid differs from theirs)
        ct_scale, ct_zero = scale[..., 0], torch.zeros_like(scale[..., 0])
    q = quantize(W, ct_scale, ct_zero, args)  # signed codes in [-2^(b-1), 2^(b-1) - 1]
    shift = 0 if symmetric else 2 ** (bits - 1)
    return q.reshape(N, K // G, G) + shift, ct_scale, ct_zero.float() + shift


CASES = [(4, -1), (4, 32), (4, 64), (3, -1), (3, 64)]


@pytest.mark.parametrize("bits,group_size", CASES + [(2, 32), (8, -1), (8, 64)])
def test_zeropoint_equals_compressed_tensors(smollm2_rows, bits, group_size):
    weights = {**gaussian_weights(), **(smollm2_rows if (bits, group_size) in CASES else {})}
    for name, W in weights.items():
        q, scale, zero = qb.quantize_zeropoint(W, bits, group_size)
        ct_q, ct_scale, ct_zero = compressed_tensors_rtn(W, bits, group_size, symmetric=False)
        print(name)
        assert mismatches(scale[..., 0], ct_scale) <= RTN_VS_LIBRARY_MISMATCHES
        assert mismatches(zero[..., 0], ct_zero) <= RTN_VS_LIBRARY_MISMATCHES
        # near-ties may round apart (their zero is signed, so the float sum differs): one level
        assert mismatches(q, ct_q) <= ZEROPOINT_VS_CT_CODE_FRACTION * q.numel()
        assert (q.float() - ct_q.float()).abs().max() <= 1


@pytest.mark.parametrize("bits,group_size", CASES + [(8, 32)])
def test_absmax_equals_torch_observer_and_compressed_tensors(smollm2_rows, bits, group_size):
    from torch.ao.quantization.observer import PerChannelMinMaxObserver

    qmax = 2 ** (bits - 1) - 1
    for name, W in {**gaussian_weights(), **smollm2_rows}.items():
        q, scale, _ = qb.quantize_absmax(W, bits, group_size)
        G = W.shape[1] if group_size == -1 else group_size
        observer = PerChannelMinMaxObserver(ch_axis=0, qscheme=torch.per_channel_symmetric,
                                            quant_min=-qmax, quant_max=qmax)
        observer(W.reshape(-1, G))  # one "channel" per group
        torch_scale, _ = observer.calculate_qparams()  # max|w| / ((qmax - qmin) / 2) = max|w| / qmax
        nonzero = torch_scale > torch.finfo(torch.float32).eps  # the observer floors all-zero groups
        print(name)
        assert mismatches(scale.reshape(-1)[nonzero], torch_scale.half().float()[nonzero]) \
            <= RTN_VS_LIBRARY_MISMATCHES
        ct_q, _, _ = compressed_tensors_rtn(W, bits, group_size, symmetric=True, scale=scale)
        assert mismatches(q, ct_q) <= RTN_VS_LIBRARY_MISMATCHES


def test_minscale_4bit_g32_equals_gguf_q4_1(smollm2_rows):
    import gguf

    Q4_1 = gguf.GGMLQuantizationType.Q4_1
    for name, W in {**gaussian_weights(), **smollm2_rows}.items():
        ours = qb.dequantize_minscale(*qb.quantize_minscale(W, 4, 32))
        theirs = gguf.quants.dequantize(gguf.quants.quantize(W.numpy(), Q4_1), Q4_1)
        print(name)
        assert mismatches(ours, torch.from_numpy(theirs)) <= RTN_VS_LIBRARY_MISMATCHES


def test_q4_1_grid_is_reproduced_on_smollm2(smollm2_rows):
    """SmolLM2's weights came through Q4_1: 4-bit min-scale with G = 32 is exact, nothing else is."""
    cpu = torch.device("cpu")
    aligned = qb.reconstruction_error(smollm2_rows, "minscale", 4, 32, cpu)
    wider = qb.reconstruction_error(smollm2_rows, "minscale", 4, 64, cpu)
    integer_zero = qb.reconstruction_error(smollm2_rows, "zeropoint", 4, 32, cpu)
    print(aligned, wider, integer_zero)
    assert aligned["rel_error"] == 0.0 and aligned["exact_fraction"] == 1.0
    assert wider["rel_error"] > 0.05
    # an integer zero shifts the grid by whole steps, so it misses Q4_1's real-valued minimum
    assert integer_zero["rel_error"] > 0.05


def test_sweep_orders_by_bits_and_group_size(tiny_model):
    result = qb.main(qb.build_parser().parse_args(
        ["--model", str(tiny_model), "--device", "cpu", "--bits", "3", "4", "8",
         "--group-size", "-1", "32", "--quiet"]))
    rows = {(r["scheme"], r["bits"], r["group_size"]): r for r in result["rows"]}
    assert result["n_weights"] == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    for scheme in qb.SCHEMES:
        for group in (-1, 32):
            errors = [rows[scheme, b, group]["rel_error"] for b in (3, 4, 8)]
            print(scheme, group, errors)
            assert errors[0] > errors[1] > errors[2], "more bits must mean less error"
        # smaller groups adapt the grid to fewer weights: less error, more stored bits
        assert rows[scheme, 4, 32]["rel_error"] < rows[scheme, 4, -1]["rel_error"]
        assert rows[scheme, 4, 32]["bits_per_weight"] > rows[scheme, 4, -1]["bits_per_weight"]
    assert rows["absmax", 4, 32]["bits_per_weight"] == pytest.approx(4 + 16 / 32)
    assert rows["zeropoint", 4, 32]["bits_per_weight"] == pytest.approx(4 + 20 / 32)


def test_memory_formula():
    n = 8.03e9
    assert qb.weight_memory_bytes(n, 16) == pytest.approx(16.06e9)  # 2 bytes a weight
    assert qb.weight_memory_bytes(n, 4, 128, 20) == pytest.approx(n * (4 + 20 / 128) / 8)
    rows = {r["model"]: r for r in qb.memory_table(qb.MODELS)}
    assert rows["Llama-3-70B"]["FP16"] == pytest.approx(141.2)
    assert rows["Llama-3-70B"]["INT4 g128"] == pytest.approx(70.6 * (4 + 20 / 128) / 8)
    body, embed = 8.03e9 - 2 * 128256 * 4096, 2 * 128256 * 4096
    expected = (body * (4 + 20 / 128) / 8 + embed * 2) / 1e9
    assert rows["Llama-3-8B"]["INT4 g128 + FP16 embeddings"] == pytest.approx(expected)


def test_script_prints_both_tables(tiny_model):
    proc = run_script(SCRIPT, "--model", tiny_model, "--max-layers", "1", "--bits", "4",
                      "--group-size", "-1", "32", "--quiet")
    assert "minscale" in proc.stdout and "G=per-channel" in proc.stdout
    assert "Llama-3-70B" in proc.stdout and "16.06" in proc.stdout


@pytest.mark.parametrize("flags", [["--bits", "1"], ["--group-size", "0"], ["--group-size", "-2"],
                                   ["--max-layers", "0"]])
def test_bad_sizes_are_parser_errors(tiny_model, flags):
    with pytest.raises(SystemExit) as exit_info:
        qb.main(qb.build_parser().parse_args(["--model", str(tiny_model), *flags]))
    assert exit_info.value.code == 2


def test_group_size_that_does_not_divide_is_refused(tiny_model):
    with pytest.raises(qb.Refusal, match="does not divide"):
        qb.main(qb.build_parser().parse_args(["--model", str(tiny_model), "--group-size", "48", "--quiet"]))


def test_missing_model_and_missing_gpu_are_refused(tmp_path):
    proc = run_script(SCRIPT, "--model", tmp_path / "nowhere", "--quiet", check=False)
    assert_refusal(proc, "cannot load model")
    if not torch.cuda.is_available():
        proc = run_script(SCRIPT, "--device", "cuda", "--quiet", check=False)
        assert_refusal(proc, "--device cuda")


def test_bench_preset_cpu_writes_its_schema(tiny_model, tmp_path):
    run_bench("quant_basics", "cpu", tmp_path, model=tiny_model)
    errors = json.loads((tmp_path / "quant_basics-cpu.json").read_text())
    memory = json.loads((tmp_path / "memory_estimates-cpu.json").read_text())
    for result in (errors, memory):
        assert_results_header(result)
        assert result["quick"] is True
    assert errors["n_weights"] == 7 and errors["n_params"] > 0 and errors["sweep_seconds"] > 0
    settings = errors["settings"]
    assert len(errors["rows"]) == len(settings["schemes"]) * len(settings["bits"]) * len(settings["group_sizes"])
    assert {"scheme", "bits", "group_size", "rel_error", "exact_fraction", "bits_per_weight"} <= set(errors["rows"][0])
    assert {r["model"] for r in memory["memory"]} >= {"Llama-2-7B", "Llama-3-8B", "Llama-3-70B"}
    for stem in ("quant_basics-cpu", "memory_estimates-cpu"):
        for suffix in (".md", ".en.md"):
            assert (tmp_path / f"{stem}{suffix}").stat().st_size > 0
    assert (tmp_path / "quant_basics-cpu.png").stat().st_size > 0
    assert "逐通道" in (tmp_path / "quant_basics-cpu.md").read_text()
    assert np.isfinite([r["rel_error"] for r in errors["rows"]]).all()
