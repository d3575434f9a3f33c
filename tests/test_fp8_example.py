"""fp8_example.py: FP8 formats, W8A8 linears and the FP8 KV cache, each against a second path.

* the format table read from the bits against torch.finfo and the E4M3 / E5M2 formulas;
* our FP8_DYNAMIC weight scales and codes against llm-compressor's saved checkpoint;
* the simulated W8A8 linear against a float64 product of the same codes, and against the
  unquantized layer;
* the Triton kernels (in Triton's CPU interpreter, and compiled for Hopper without a GPU): the
  activation pass gives quantize_activation's codes bit for bit (every E4M3 value, every tie),
  the fused GEMV the simulated W8A8; on a GPU, the same, and torch._scaled_mm;
* the FP8 KV cache: round trip, memory, the cache inside fast_decode.py's decoder against the
  attention function used with transformers, and a quality bound on SmolLM2;
* MXFP4 / NVFP4 codes on their grids; the bench presets' schema; refusals.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import (ACCEL_EXAMPLES, INTERPRETER, QUANT_EXAMPLES, assert_refusal, assert_results_header,
                      import_example, interpreted, run_bench, run_interpreted_tests, run_script)
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
    ref64 = (xq.double() * xs.double()) @ (layer.weight.double() * layer.scale.double()).t()
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
        err = rel_err((q * scale - zero).flatten(1), W)
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
    assert "E4M3: max 448," in proc.stdout and "E5M2: max 57344," in proc.stdout  # from the bits
    rows = {line[:30].strip(): line[30:].split() for line in proc.stdout.splitlines()
            if line.startswith(("FP (", "FP8 ", "  + FP8"))}
    assert set(rows) == {"FP (unquantized)", "FP8 per tensor", "FP8 per channel + per token",
                         "+ FP8 KV cache (per head)"}, proc.stdout
    fp_ppl, _, _, fp_kl, fp_top1 = rows.pop("FP (unquantized)")
    assert float(fp_kl) == 0 and fp_top1 == "100.0%"  # the model against itself
    for ppl, _, _, kl, top1 in rows.values():           # FP8 moves the model, but not far
        assert float(kl) >= 0 and 50 <= float(top1.rstrip("%")) <= 100
        assert abs(float(ppl) / float(fp_ppl) - 1) < 0.1


def test_refusals(tmp_path) -> None:
    assert_refusal(run_script(SCRIPT, "--model", tmp_path / "missing", "--quiet", check=False), "cannot load")
    with pytest.raises(SystemExit) as stop:  # a bad size stops in argparse, before any loading
        fp8.main(fp8.build_parser().parse_args(["--seqlen", "1"]))
    assert stop.value.code == 2


# ---------------------------------------------------------------------------------------------
# The Triton kernels on the CPU: Triton's interpreter (TRITON_INTERPRET=1, set before triton is
# imported, so in a pytest process of its own) runs the kernels' code with NumPy.
# ---------------------------------------------------------------------------------------------
def test_triton_kernels_in_the_interpreter() -> None:
    run_interpreted_tests(__file__)


def every_e4m3_value_and_tie() -> torch.Tensor:
    """One row whose max|x| is 448 (scale exactly 1): every finite E4M3 value, every midpoint
    between neighbours (ties: to even, some carrying into the exponent), values just off the
    midpoints, subnormals and below, each with both signs, and -0."""
    values = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
    mid = (values[1:] + values[:-1]) / 2
    row = torch.cat([values, mid, mid * (1 + 2**-12), mid * (1 - 2**-12), values / 3, values * 2**-12])
    return torch.cat([row, -row, torch.tensor([-0.0])])[None]           # (1, K)


@interpreted
@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interpreted_quantize_rows_gives_quantize_activation_codes_bit_for_bit(per_token, dtype) -> None:
    torch.manual_seed(0)
    x = (torch.randn(6, 1500) * torch.logspace(-6, 3, 1500)).to(dtype)  # K not a multiple of 1,024
    x[2] = 0                                                   # an all-zero row: scale 1e-12
    x[4, 700:] *= 1e4              # a few large values set the scale: the rest become subnormals or 0
    for rows in (x, every_e4m3_value_and_tie().to(dtype)):
        codes, scale = fp8.quantize_rows(rows, per_token)
        ref_codes, ref_scale = fp8.quantize_activation(rows, per_token)
        assert torch.equal(codes.view(torch.uint8), ref_codes.view(torch.uint8))
        assert torch.equal(scale, ref_scale)


@interpreted
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("M, BLOCK_M, BLOCK_N, BLOCK_K", [(1, 1, 8, 128), (3, 16, 16, 64), (16, 16, 32, 128)])
def test_interpreted_gemv_equals_the_simulation(per_channel, M, BLOCK_M, BLOCK_N, BLOCK_K) -> None:
    """The fused kernel itself (the autotuner needs a GPU to time its candidates) from the raw
    activations: N = 40 and K = 320 are not multiples of the tiles, so the masks are exercised."""
    torch.manual_seed(0)
    N, K = 40, 320
    layer = fp8.FP8Linear(torch.randn(N, K) * 0.02, per_channel)
    x = torch.randn(M, K) * torch.linspace(0.1, 4, K)
    y = torch.empty(M, N)
    grid = (fp8.triton.cdiv(N, BLOCK_N),)
    fp8._fp8_gemv[grid](x, layer.weight, layer.scale, y, M, N, K, int(per_channel), PER_TOKEN=per_channel,
                        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    assert rel_err(y, layer(x)) <= FP8_SIMULATED_VS_FP64_REL


# ---------------------------------------------------------------------------------------------
# The kernels compiled for Hopper (sm_90) by the local Triton, no GPU needed: they build, and the
# divisions are IEEE-rounded like torch's (Triton's `/` on fp32 is an approximate division).
# ---------------------------------------------------------------------------------------------
def compile_for_hopper(fn, types: dict, constexprs: dict, warps: int = 4, stages: int = 3) -> str:
    import triton
    from triton.backends.compiler import GPUTarget

    aligned = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(types.values())}
    source = triton.compiler.ASTSource(fn, signature={**types, **dict.fromkeys(constexprs, "constexpr")},
                                       constexprs=constexprs, attrs=aligned)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": warps, "num_stages": stages})
    return kernel.asm["ptx"]


@pytest.mark.skipif(INTERPRETER or fp8.triton is None, reason="compiles with the real Triton")
def test_kernels_compile_for_hopper() -> None:
    ptx = [compile_for_hopper(fp8._quantize_rows, {"x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "s_ptr": "*fp32",
                                                   "K": "i32"}, {"PER_TOKEN": per_token, "BK": 1024})
           for per_token in (True, False)]
    gemv_args = {"x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "s_ptr": "*fp32", "y_ptr": "*bf16", "M": "i32",
                 "N": "i32", "K": "i32", "s_stride": "i32"}
    for config in fp8._gemv1.configs + fp8._gemv16.configs:  # every autotuning candidate
        ptx.append(compile_for_hopper(fp8._fp8_gemv, gemv_args, {"PER_TOKEN": True, **config.kwargs},
                                      config.num_warps, config.num_stages))
    for code in ptx:
        assert "div.rn.f32" in code and "div.full.f32" not in code and "div.approx.f32" not in code


# ---------------------------------------------------------------------------------------------
# GPU: the kernels against the simulation (run by `make test-gpu` on an H100 / H200)
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("M", [1, 3, 16, 64])
def test_triton_kernels_and_scaled_mm_equal_the_simulation(per_channel, M) -> None:
    torch.manual_seed(0)
    N, K = 1040, 4096  # N not a multiple of the GEMV's tiles
    W = (torch.randn(N, K) * 0.02).cuda()
    x = (torch.randn(M, K) * torch.linspace(0.1, 4, K)).cuda().bfloat16()
    layer = fp8.FP8Linear(W, per_channel)
    simulated = fp8.FP8Linear(W, per_channel).cpu()(x.float().cpu())     # the CPU path
    # The reference runs on the CPU: torch on CUDA divides by a Python scalar as a product with
    # its reciprocal (scales an ulp off max|x| / 448); the kernel divides exactly, as the CPU.
    xq, xs = fp8.quantize_rows(x, per_channel)
    ref_q, ref_s = fp8.quantize_activation(x.cpu(), per_channel)
    assert torch.equal(xq.cpu().float(), ref_q.float()) and torch.equal(xs.cpu(), ref_s)
    ties = every_e4m3_value_and_tie()  # compared as values: the GPU may write -0 as +0
    assert torch.equal(fp8.quantize_rows(ties.cuda(), True)[0].cpu().float(),
                       fp8.quantize_activation(ties, True)[0].float())
    scaled_mm = torch._scaled_mm(xq, layer.weight.t(), scale_a=xs, scale_b=layer.scale.t(),
                                 out_dtype=torch.bfloat16)
    assert rel_err(scaled_mm.cpu(), simulated) <= FP8_GPU_VS_SIMULATED_REL
    if M <= 16:
        gemv = fp8.fp8_gemv(x, layer.weight, layer.scale, per_channel)
        assert rel_err(gemv.cpu(), simulated) <= FP8_GPU_VS_SIMULATED_REL
    for gemv_on in (True, False):  # the module's own dispatch, both paths
        layer.gemv = gemv_on
        assert rel_err(layer(x).cpu(), simulated) <= FP8_GPU_VS_SIMULATED_REL


@pytest.mark.gpu
def test_bench_h200_preset_quick(tmp_path) -> None:
    result = run_bench("fp8", "h200", tmp_path)
    assert_results_header(result)
    scaled_mm, gemv = {"fp8_channel_scaled_mm", "fp8_tensor_scaled_mm"}, {"fp8_channel_gemv", "fp8_tensor_gemv"}
    assert {r["variant"] for r in result["prefill"]} == {"bf16"} | scaled_mm
    assert {r["variant"] for r in result["decode"]} == {"bf16"} | scaled_mm | gemv
    assert {"bf16", "fp8_rowwise", "fp8_tensorwise"} == set(result["matmul_peak_tflops"])
    assert {(r["tokens"], r["per_token"]) for r in result["activation_quantization"]} >= {(1, True), (1, False)}
    assert [r["kv_cache"] for r in result["long_context"]] == ["bf16", "fp8"]
    bf16_gb, fp8_gb = (r["kv_cache_gb"] for r in result["long_context"])
    assert fp8_gb * 2 == pytest.approx(bf16_gb)
