"""fp8_example.py: FP8 formats, W8A8 linears and the FP8 KV cache, each against a second path.

* the format table read from the bits against torch.finfo and the E4M3 / E5M2 formulas;
* our FP8_DYNAMIC weight scales and codes against llm-compressor's saved checkpoint;
* the simulated W8A8 linear against a float64 product of the same codes, and against the
  unquantized layer; on a GPU, torch._scaled_mm and our Triton GEMV against the simulation;
* the FP8 KV cache: round trip, memory, the cache inside fast_decode.py's decoder against the
  attention function used with transformers, and a quality bound on SmolLM2;
* MXFP4 / NVFP4 codes on their grids; the bench presets' schema; refusals.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import (ACCEL_EXAMPLES, QUANT_EXAMPLES, assert_refusal, assert_results_header, import_example,
                      interpreted, run_bench, run_interpreted_tests, run_script)
from tolerances import (FP8_GPU_VS_SIMULATED_REL, FP8_KV_DECODER_VS_ATTENTION_REL, FP8_KV_KL_SMOLLM2,
                        FP8_SCALES_VS_LIBRARY, FP8_SIMULATED_VS_FP64_REL, FP8_W8A8_KL_SMOLLM2,
                        FP8_W8A8_LINEAR_REL, rel_err)

SCRIPT = QUANT_EXAMPLES / "fp8_example.py"
fp8 = import_example(SCRIPT)


@pytest.mark.parametrize("dtype, e, m", [(torch.float8_e4m3fn, 4, 3), (torch.float8_e5m2, 5, 2)])
def test_formats_read_from_the_bits_match_finfo_and_the_formulas(dtype, e, m) -> None:
    table = fp8.float8_format(dtype, e)
    info = torch.finfo(dtype)
    bias = 2 ** (e - 1) - 1
    print(table)
    assert table["max"] == info.max
    assert table["min_normal"] == info.smallest_normal == 2.0 ** (1 - bias)
    assert table["min_subnormal"] == 2.0 ** (1 - bias - m)
    assert table["spacing_near_1"] == info.eps == 2.0 ** -m
    top_field = 15 if e == 4 else 30  # E4M3 keeps the all-ones exponent (only S.1111.111 is NaN)
    assert table["spacing_near_max"] == 2.0 ** (top_field - bias - m)


def test_scales_and_codes_equal_llmcompressor(tiny_model, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    save_dir = fp8.llmcompressor_fp8(str(tiny_model), tmp_path / "fp8")
    theirs = fp8.checkpoint_scales(save_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    from safetensors import safe_open

    linears = {n: m for n, m in model.named_modules() if n in theirs}
    assert len(linears) == 7 * model.config.num_hidden_layers  # q k v o gate up down; lm_head ignored
    with safe_open(next(save_dir.glob("*.safetensors")), "pt") as f:
        for name, module in linears.items():
            q, scale, _ = fp8.quantize_fp8(module.weight, per_channel=True)
            assert (scale - theirs[name]).abs().max().item() <= FP8_SCALES_VS_LIBRARY, name
            codes = f.get_tensor(f"{name}.weight")
            assert int((codes.view(torch.uint8) != q.view(torch.uint8)).sum()) == 0, name


@pytest.mark.parametrize("per_channel", [False, True])
def test_simulated_w8a8_equals_the_product_of_its_codes(per_channel) -> None:
    torch.manual_seed(0)
    W, x = torch.randn(96, 160) * 0.02, torch.randn(2, 7, 160) * torch.linspace(0.1, 4, 160)
    layer = fp8.FP8Linear(W, per_channel)
    y = layer(x)                                                        # (2, 7, 96)
    xq, xs = fp8.quantize_activation(x.reshape(-1, 160), per_channel)
    ref64 = (fp8.dequantize_fp8(xq, xs, torch.zeros_like(xs)).double()
             @ fp8.dequantize_fp8(layer.weight, layer.scale, torch.zeros_like(layer.scale)).double().t())
    assert rel_err(y.reshape(-1, 96), ref64) <= FP8_SIMULATED_VS_FP64_REL
    assert rel_err(y, F.linear(x, W)) <= FP8_W8A8_LINEAR_REL  # the quantization error itself


def test_fp8_model_swaps_every_linear_but_the_head(tiny_model) -> None:
    from transformers import AutoModelForCausalLM

    model = fp8.fp8_model(AutoModelForCausalLM.from_pretrained(tiny_model), per_channel=True)
    kinds = {type(m).__name__ for n, m in model.named_modules() if ".layers." in n and "proj" in n}
    assert kinds == {"FP8Linear"} and isinstance(model.lm_head, torch.nn.Linear)


def test_fp8_kv_cache_round_trip_and_memory() -> None:
    torch.manual_seed(0)
    B, Hkv, S, D = 2, 3, 16, 8
    k = torch.randn(B, Hkv, 5, D) * torch.tensor([0.1, 1.0, 30.0]).view(1, 3, 1, 1)  # per-head ranges
    v = torch.randn(B, Hkv, 5, D)
    k_scale = k.abs().amax(dim=(0, 2, 3), keepdim=True) / fp8.FP8_MAX
    v_scale = v.abs().amax(dim=(0, 2, 3), keepdim=True) / fp8.FP8_MAX
    cache = fp8.FP8KVCache((B, Hkv, S, D), k_scale, v_scale, torch.float32, torch.device("cpu"))
    pos = torch.tensor([3, 4, 5, 9, 10])
    k_all, v_all = cache.update(pos, k, v)                                # (B, Hkv, S, D) each
    for new, back, scale in ((k, k_all[:, :, pos], k_scale), (v, v_all[:, :, pos], v_scale)):
        # E4M3 rounds to 3 mantissa bits: at most 2^-4 relative, or half a subnormal step
        bound = new.abs() * 2**-4 + scale * 2**-10
        assert bool(((back - new).abs() <= bound).all())
    untouched = torch.ones(S, dtype=torch.bool)
    untouched[pos] = False
    assert bool((k_all[:, :, untouched] == 0).all())
    bf16_bytes = 2 * B * Hkv * S * D * 2
    assert sum(b.numel() * b.element_size() for b in cache.buffers()) * 2 == bf16_bytes


def test_fp8_kv_cache_in_our_decoder_equals_the_attention_function(tiny_model) -> None:
    """Two paths to one number: fast_decode.py's decoder with FP8KVCache layers, and
    transformers with keys and values read through E4M3 in the attention function."""
    from transformers import AutoModelForCausalLM

    fast = import_example(ACCEL_EXAMPLES / "fast_decode.py")
    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa")
    torch.manual_seed(0)
    tokens = torch.randint(0, hf.config.vocab_size, (1, 48))
    scales = fp8.calibrate_kv_scales(hf, tokens)
    ours = fast.model_from_hf(hf)
    ours.setup_caches(1, 64)
    for i, layer in enumerate(ours.layers):
        layer.attention.kv_cache = fp8.FP8KVCache(layer.attention.kv_cache.k.shape, *scales[i],
                                                  torch.float32, torch.device("cpu"))
    with torch.no_grad():
        decoder = ours(tokens, torch.arange(48))
        fp = hf(tokens).logits
        fp8.use_fp8_kv(hf, scales)
        attention = hf(tokens).logits
    assert rel_err(decoder, attention) <= FP8_KV_DECODER_VS_ATTENTION_REL
    assert rel_err(attention, fp) > 0  # the FP8 cache did change something


def test_quality_on_smollm2_fp8_w8a8_and_fp8_kv(smollm2) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32, attn_implementation="sdpa")
    windows = fp8.token_windows(tokenizer, 1, 256, calibration=False)
    scales = fp8.calibrate_kv_scales(model, fp8.token_windows(tokenizer, 1, 256, calibration=True))
    reference = fp8.log_probs(model, windows)
    w8a8 = fp8.fp8_model(copy.deepcopy(model), per_channel=True)
    kv = copy.deepcopy(model)
    fp8.use_fp8_kv(kv, scales)
    r_w8a8 = fp8.compare(windows, reference, fp8.log_probs(w8a8, windows))
    r_kv = fp8.compare(windows, reference, fp8.log_probs(kv, windows))
    print(r_w8a8, r_kv)
    assert 0 < r_w8a8["kl"] <= FP8_W8A8_KL_SMOLLM2
    assert 0 < r_kv["kl"] <= FP8_KV_KL_SMOLLM2


def test_mxfp4_and_nvfp4_codes_lie_on_their_grids() -> None:
    torch.manual_seed(0)
    W = torch.randn(32, 128) * 0.05
    grid = torch.tensor(fp8.E2M1_VALUES)
    for quantize in (fp8.quantize_mxfp4, fp8.quantize_nvfp4):
        q, scale, zero = quantize(W)
        assert bool(torch.isin(q.abs(), grid).all())
        err = rel_err(fp8.dequantize_fp4(q, scale, zero), W)
        assert err < 0.2  # 4-bit floats: about 10 % on Gaussian weights, like INT4 groups
    _, mx_scale, _ = fp8.quantize_mxfp4(W)
    assert bool((torch.log2(mx_scale) == torch.log2(mx_scale).round()).all())  # powers of two (E8M0)


def test_bench_cpu_preset_quick(tiny_model, tmp_path) -> None:
    result = run_bench("fp8", "cpu", tmp_path, model=tiny_model)
    assert_results_header(result)
    keys = [r["key"] for r in result["rows"]]
    assert keys[0] == "fp" and {"fp8_per_channel_token", "int8_rtn_weight_only", "nvfp4", "mxfp4"} <= set(keys)
    assert result["library"]["mismatched_codes"] == 0
    assert (tmp_path / "fp8-cpu.md").exists() and (tmp_path / "fp8-cpu.en.md").exists()


def test_script_runs_as_a_reader_runs_it(tiny_model) -> None:
    proc = run_script(SCRIPT, "--model", tiny_model, "--eval-tokens", "128", "--seqlen", "64",
                      "--no-library", "--quiet")
    assert "E4M3" in proc.stdout and "FP8 per channel + per token" in proc.stdout


def test_refusals(tmp_path) -> None:
    assert_refusal(run_script(SCRIPT, "--model", tmp_path / "missing", "--quiet", check=False), "cannot load")
    with pytest.raises(SystemExit) as stop:  # a bad size stops in argparse, before any loading
        fp8.main(fp8.build_parser().parse_args(["--seqlen", "1"]))
    assert stop.value.code == 2


# ---------------------------------------------------------------------------------------------
# The Triton kernel on the CPU: Triton's interpreter (TRITON_INTERPRET=1, set before triton is
# imported, so in a pytest process of its own) runs the kernel's code with NumPy.
# ---------------------------------------------------------------------------------------------
def test_gemv_kernel_in_the_interpreter() -> None:
    run_interpreted_tests(__file__)


@interpreted
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("M, BLOCK_M, BLOCK_N, BLOCK_K", [(1, 1, 8, 128), (3, 16, 16, 64)])
def test_interpreted_gemv_equals_the_simulation(per_channel, M, BLOCK_M, BLOCK_N, BLOCK_K) -> None:
    """The kernel itself (the autotuner needs a GPU to time its candidates): N = 40 is not a
    multiple of the tile, so the masks are exercised too."""
    torch.manual_seed(0)
    N, K = 40, 256
    layer = fp8.FP8Linear(torch.randn(N, K) * 0.02, per_channel)
    x = torch.randn(M, K)
    xq, xs = fp8.quantize_activation(x, per_channel)
    y = torch.empty(M, N)
    grid = (fp8.triton.cdiv(N, BLOCK_N),)
    fp8._fp8_gemv[grid](xq, xs, layer.weight, layer.scale, y, M, N, K, int(M > 1 and per_channel),
                               int(per_channel), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    assert rel_err(y, layer(x)) <= FP8_SIMULATED_VS_FP64_REL


# ---------------------------------------------------------------------------------------------
# GPU: the two FP8 kernels against the simulation (run by `make test-gpu` on an H100 / H200)
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("M", [1, 3, 16, 64])
def test_scaled_mm_and_gemv_equal_the_simulation(per_channel, M) -> None:
    torch.manual_seed(0)
    N, K = 1040, 4096  # N not a multiple of the GEMV's tiles
    W = (torch.randn(N, K) * 0.02).cuda()
    x = (torch.randn(M, K) * torch.linspace(0.1, 4, K)).cuda().bfloat16()
    layer = fp8.FP8Linear(W, per_channel)
    simulated = fp8.FP8Linear(W, per_channel).cpu()(x.float().cpu())     # the CPU path
    xq, xs = fp8.quantize_activation(x, per_channel)
    scaled_mm = torch._scaled_mm(xq, layer.weight.t(), scale_a=xs, scale_b=layer.scale.t(),
                                 out_dtype=torch.bfloat16)
    assert rel_err(scaled_mm.cpu(), simulated) <= FP8_GPU_VS_SIMULATED_REL
    if M <= 16:
        gemv = fp8.fp8_gemv(xq, xs, layer.weight, layer.scale, torch.bfloat16)
        assert rel_err(gemv.cpu(), simulated) <= FP8_GPU_VS_SIMULATED_REL
    assert rel_err(layer(x).cpu(), simulated) <= FP8_GPU_VS_SIMULATED_REL


@pytest.mark.gpu
def test_bench_h200_preset_quick(tmp_path) -> None:
    result = run_bench("fp8", "h200", tmp_path)
    assert_results_header(result)
    assert {r["variant"] for r in result["decode"]} == {"bf16", "fp8_scaled_mm", "fp8_gemv"}
    assert [r["kv_cache"] for r in result["long_context"]] == ["bf16", "fp8"]
    bf16_gb, fp8_gb = (r["kv_cache_gb"] for r in result["long_context"])
    assert fp8_gb * 2 == pytest.approx(bf16_gb)
