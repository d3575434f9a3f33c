"""FP8 on Hopper: the E4M3 and E5M2 formats, W8A8 linears and an FP8 KV cache, from scratch
and with llm-compressor.

What it shows
  1. The formats read from the bits: all 256 codes of float8_e4m3fn and float8_e5m2 decoded
     (range, smallest normal and subnormal, spacing near 1 and near the maximum); E2M1 beside.
  2. From scratch: FP8 weights per tensor or per output channel (scale = max|w| / 448),
     activation scales per token at run time, the W8A8 linear: on FP8 tensor cores (8.9+) a
     Triton pass writes activation codes for torch._scaled_mm, up to 16 rows take one Triton
     kernel that quantizes and multiplies; on the CPU, simulated. MXFP4, NVFP4 simulated.
  3. An FP8 KV cache (E4M3, a scale per KV head): a static cache layer; an attention function
     for transformers that reads K and V through E4M3.
  4. Library: llm-compressor's FP8_DYNAMIC checkpoint, its weight scales against ours; the
     vLLM command.  5. One table: perplexity, KL and top-1 against FP.

Run it
  python inference/quantization/examples/fp8_example.py --model HuggingFaceTB/SmolLM2-135M-Instruct \\
      --eval-tokens 1024 --quiet

What it prints on SmolLM2-135M (CPU, float32, about a minute): the format table (E4M3: max 448,
spacing 0.125 near 1 and 32 near 448; E5M2: max 57344, spacing 0.25 near 1); the largest
difference between our weight scales and llm-compressor's (0: the same numbers); then the
quality rows: FP8 per tensor, FP8 per channel + per token, and with the FP8 KV cache on top
(KL about 0.03 against the FP model). Speed and the full quality table: bench/fp8.py.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

try:  # optional: only the small-batch GPU kernel needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = tl = None

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8_MAX = 448.0  # the largest finite E4M3 value
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # the non-negative FP4 (E2M1) values


class Refusal(Exception):
    """A run-time refusal: one line that names the problem and the fix (exit code 2)."""


# --8<-- [start:formats]
def float8_format(dtype: torch.dtype, exponent_bits: int) -> dict[str, float]:
    """Decode all 256 codes of an FP8 dtype and read its range off the values. A code is
    sign | exponent (e bits) | mantissa (7 - e bits); exponent field 0 holds subnormals
    (no implicit leading 1): the smallest normal has the first non-zero exponent field."""
    codes = torch.arange(256, dtype=torch.int32)
    values = codes.to(torch.uint8).view(dtype).float()                  # (256,)
    positive = (codes < 128) & torch.isfinite(values) & (values > 0)
    normal = positive & ((codes >> (7 - exponent_bits)) > 0)
    finite = values[positive].sort().values
    up = finite[finite > 1]
    return {"max": finite[-1].item(), "min_normal": values[normal].min().item(),
            "min_subnormal": finite[0].item(), "spacing_near_1": (up[0] - 1).item(),
            "spacing_near_max": (finite[-1] - finite[-2]).item(),
            "nan_or_inf_codes": int((~torch.isfinite(values)).sum())}
# --8<-- [end:formats]


# --8<-- [start:quantize]
def quantize_fp8(W: torch.Tensor, per_channel: bool):
    """FP8 E4M3 weights: scale = max|w| / 448 per output row (N, 1) or per tensor (1, 1).
    W (N, K) -> q (N, K) float8_e4m3fn, scale fp32, zero = 0. Unlike an integer grid, each
    code keeps about two significant digits (3 mantissa bits), large weight or small."""
    amax = W.abs().amax(dim=1, keepdim=True) if per_channel else W.abs().amax().view(1, 1)
    scale = (amax.float() / FP8_MAX).clamp(min=1e-12)
    q = (W.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(E4M3)  # rounds to nearest
    return q, scale, torch.zeros_like(scale)


def quantize_activation(x: torch.Tensor, per_token: bool):
    """Scales from x (M, K) at run time, as for weights: the "DYNAMIC" of FP8_DYNAMIC."""
    return quantize_fp8(x, per_token)[:2]           # codes (M, K), scale (M, 1) or (1, 1)
# --8<-- [end:quantize]


# --8<-- [start:linear]
class FP8Linear(nn.Module):
    """W8A8: y = (x_q · W_q^T) · s_x · s_w, FP8 codes multiplied, sums in fp32.
    per_channel: scales per output row and per token (FP8_DYNAMIC); else one each."""
    def __init__(self, weight: torch.Tensor, per_channel: bool):
        super().__init__()
        q, scale, _ = quantize_fp8(weight.detach(), per_channel)
        self.register_buffer("weight", q)                               # (N, K) E4M3
        self.register_buffer("scale", scale)                            # (N, 1) or (1, 1)
        self.per_token, self.gemv = per_channel, True  # gemv False: _scaled_mm only
        self.out_features, self.in_features = q.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).contiguous()               # (M, K)
        if not x.is_cuda:  # simulated: FP8 codes cast up, the same products and fp32 sums
            xq, xs = quantize_activation(x2, self.per_token)
            y = (xq.float() @ self.weight.float().t()) * xs * self.scale.t()
        elif self.gemv and triton is not None and x2.shape[0] <= 16:  # one launch
            y = fp8_gemv(x2, self.weight, self.scale, self.per_token)
        else:  # codes by one Triton pass, then cuBLASLt's FP8 matmul (W^T column-major)
            xq, xs = quantize_rows(x2, self.per_token)
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=xs, scale_b=self.scale.t(),
                                 out_dtype=x.dtype)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


def fp8_model(model: nn.Module, per_channel: bool, skip: tuple = ("lm_head", "output")):
    """Swap every nn.Linear but the output layer for FP8Linear, in place."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name not in skip:
                setattr(module, child_name, FP8Linear(child.weight, per_channel))
    return model
# --8<-- [end:linear]


# --8<-- [start:gemv]
if triton is not None:
    @triton.jit
    def _e4m3(x, scale):
        """quantize_activation's codes: IEEE x / scale to nearest even, ±448. Rounded in
        fp32 first, so the cast is exact also in Triton's interpreter (its casts differ):
        for |v| in [2^e, 2^(e+1)), |v| + max(2^(e+20), 2^14) keeps 3 mantissa bits."""
        v = tl.clamp(tl.div_rn(x, scale), -448.0, 448.0)
        bits = v.to(tl.int32, bitcast=True)
        power = (bits & 0x7F800000).to(tl.float32, bitcast=True)         # 2^e
        c = tl.maximum(power * 1048576.0, 16384.0)
        r = (tl.abs(v) + c) - c                                         # to nearest even
        return tl.where(bits < 0, -r, r).to(tl.float8e4nv)

    @triton.jit
    def _quantize_rows(x_ptr, q_ptr, s_ptr, K, PER_TOKEN: tl.constexpr, BK: tl.constexpr):
        """One program per row of x (M, K): loop 1 reads it for max|x| (per tensor, the
        scale is given), loop 2 writes the codes. scale = max(max|x| / 448, 1e-12)."""
        k, row = tl.arange(0, BK), tl.program_id(0).to(tl.int64)
        x_ptr, q_ptr = x_ptr + row * K, q_ptr + row * K
        if PER_TOKEN:
            amax = tl.zeros((BK,), dtype=tl.float32)
            for k0 in range(0, K, BK):
                x = tl.load(x_ptr + k0 + k, mask=k0 + k < K, other=0.0)
                amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
            scale = tl.maximum(tl.div_rn(tl.max(amax, axis=0), 448.0), 1e-12)
            tl.store(s_ptr + row, scale)
        else:
            scale = tl.load(s_ptr)
        for k0 in range(0, K, BK):
            x = tl.load(x_ptr + k0 + k, mask=k0 + k < K, other=0.0).to(tl.float32)
            tl.store(q_ptr + k0 + k, _e4m3(x, scale), mask=k0 + k < K)

    @triton.jit
    def _fp8_gemv(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, s_stride, PER_TOKEN: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """y (M, N) = (x_q · w_q^T) · s_x · s_w from x, M <= BLOCK_M rows, in one launch.
        A program reads x (L2) for its scales, then streams BLOCK_N weight rows once,
        quantizing x tiles in registers. One row: an fp32 FMA per weight, summed across
        threads once after the loop; a few rows: tl.dot on the tensor cores."""
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m, k = tl.arange(0, BLOCK_M)[:, None], tl.arange(0, BLOCK_K)[None, :]
        x_ptr = x_ptr + m * K + k                                     # (BM, BK) pointers
        amax = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptr + k0, mask=(m < M) & (k0 + k < K), other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        amax = tl.max(amax, axis=1)                                       # (BM,)
        if not PER_TOKEN:  # one scale for the whole tensor
            amax = tl.zeros_like(amax) + tl.max(amax, axis=0)
        xs = tl.maximum(tl.div_rn(amax, 448.0), 1e-12)[:, None]           # (BM, 1)
        acc = tl.zeros((BLOCK_N, BLOCK_K) if BLOCK_M == 1 else (BLOCK_M, BLOCK_N),
                       dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            w = tl.load(w_ptr + n[:, None] * K + k0 + k,
                        mask=(n[:, None] < N) & (k0 + k < K), other=0.0)  # (BN, BK)
            x = tl.load(x_ptr + k0, mask=(m < M) & (k0 + k < K), other=0.0).to(tl.float32)
            xq = _e4m3(x, xs)                                             # (BM, BK) codes
            if BLOCK_M == 1:
                acc += w.to(tl.float32) * xq.to(tl.float32)
            else:
                acc = tl.dot(xq, tl.trans(w), acc)
        if BLOCK_M == 1:
            acc = tl.sum(acc, axis=1)[None, :]                            # (1, BN)
        ws = tl.load(s_ptr + n * s_stride, mask=n < N, other=0.0)  # stride 0: per tensor
        y = acc * xs * ws[None, :]
        tl.store(y_ptr + m * N + n[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=(m < M) & (n[None, :] < N))

    # --8<-- [end:gemv]
    def _tuned(bm: int, tiles: list):  # tiles (BLOCK_N, BLOCK_K, warps, stages), timed per (N, K)
        return triton.autotune([triton.Config({"BLOCK_M": bm, "BLOCK_N": n, "BLOCK_K": k},
                                              num_warps=w, num_stages=s)
                                for n, k, w, s in tiles], key=["N", "K"])(_fp8_gemv)
    # one row: BLOCK_N 8-16 gives N = 4,096 256+ programs for 132 SMs; wider tiles reuse x more
    _gemv1 = _tuned(1, [(8, 512, 4, 3), (16, 256, 2, 4), (32, 256, 4, 3), (64, 128, 4, 3)])
    _gemv16 = _tuned(16, [(16, 256, 4, 4), (32, 256, 4, 4), (64, 128, 4, 4)])


def fp8_gemv(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, per_token: bool) -> torch.Tensor:
    """x (M, K), M <= 16; wq (N, K) E4M3; ws (N, 1) or (1, 1) -> y (M, N) in x's dtype: one launch."""
    (M, K), N = x.shape, wq.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    (_gemv1 if M == 1 else _gemv16)[grid](x, wq, ws, y, M, N, K, ws.numel() // N, PER_TOKEN=per_token)
    return y


def quantize_rows(x: torch.Tensor, per_token: bool):
    """quantize_activation in one launch: x (M, K) -> codes (M, K), scale (M, 1) or (1, 1)."""
    xq, xs = torch.empty(x.shape, dtype=E4M3, device=x.device), torch.empty(len(x), 1, device=x.device)
    if not per_token:  # torch finds max|x| first (one reduction); the kernel then only writes codes
        xs = (torch.linalg.vector_norm(x, float("inf")).float() / FP8_MAX).clamp(min=1e-12)
    _quantize_rows[(len(x),)](x, xq, xs, x.shape[1], PER_TOKEN=per_token, BK=1024)
    return xq, xs.view(-1, 1)


# --8<-- [start:fp4]
def round_to_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest E2M1 value (±0, 0.5, 1, 1.5, 2, 3, 4, 6); saturates at 6."""
    grid = torch.tensor(E2M1_VALUES, device=x.device)
    index = torch.bucketize(x.abs(), (grid[1:] + grid[:-1]) / 2)  # nearest grid point
    return torch.sign(x) * grid[index]


def quantize_mxfp4(W: torch.Tensor, block: int = 32):
    """OCP MXFP4: E2M1 codes, one power-of-two (E8M0) scale per block of 32 inputs,
    2^(floor(log2 max|w|) - 2) (E2M1's largest exponent is 2: 6 = 1.5 · 2^2)."""
    Wb = W.float().reshape(W.shape[0], -1, block)                      # (N, K/32, 32)
    amax = Wb.abs().amax(dim=-1, keepdim=True).clamp(min=2**-126)
    scale = torch.exp2(torch.floor(torch.log2(amax)) - 2)
    return round_to_e2m1(Wb / scale), scale, torch.zeros_like(scale)


def quantize_nvfp4(W: torch.Tensor, block: int = 16):
    """NVFP4: E2M1 codes, one E4M3 scale per block of 16 inputs and one fp32 scale per
    tensor, which puts the block scales (≈ max|w| / 6) into E4M3's range."""
    Wb = W.float().reshape(W.shape[0], -1, block)                      # (N, K/16, 16)
    tensor_scale = (W.abs().max().float() / (FP8_MAX * 6)).clamp(min=1e-12)
    block_scale = (Wb.abs().amax(-1, keepdim=True) / 6 / tensor_scale).to(E4M3).float()
    scale = (block_scale * tensor_scale).clamp(min=1e-12)               # (N, K/16, 1)
    return round_to_e2m1(Wb / scale), scale, torch.zeros_like(scale)
# --8<-- [end:fp4]


# --8<-- [start:kv]
def fp8_round_trip(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What reading an E4M3 cache gives back: x / scale stored in FP8, times scale."""
    codes = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(E4M3)
    return (codes.float() * scale).to(x.dtype)


class FP8KVCache(nn.Module):
    """A static KV cache layer (B, Hkv, S, D) in E4M3, one fp32 scale per KV head: half
    the bytes of bf16. update() writes at input_pos, returns the cache as `dtype`."""
    def __init__(self, shape, k_scale, v_scale, dtype: torch.dtype, device: torch.device):
        super().__init__()  # codes kept as uint8: index_copy_ works on every device
        self.register_buffer("k", torch.zeros(shape, dtype=torch.uint8, device=device))
        self.register_buffer("v", torch.zeros(shape, dtype=torch.uint8, device=device))
        self.k_scale, self.v_scale = k_scale.to(device), v_scale.to(device)  # per head
        self.dtype = dtype

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        for cache, x, scale in ((self.k, k, self.k_scale), (self.v, v, self.v_scale)):
            codes = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(E4M3)  # (B, Hkv, T, D), fp32
            cache.index_copy_(2, input_pos, codes.view(torch.uint8))
        return (self.k.view(E4M3).to(self.dtype) * self.k_scale.to(self.dtype),
                self.v.view(E4M3).to(self.dtype) * self.v_scale.to(self.dtype))


def fp8_kv_attention(scales: dict[int, tuple[torch.Tensor, torch.Tensor]]):
    """An attention function for transformers: keys and values read through E4M3 with
    per-head scales {layer: (k_scale, v_scale)}, as an FP8 KV cache holds them."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    def attention(module, query, key, value, attention_mask, **kw):  # (B, Hkv, T, D)
        k_scale, v_scale = scales[module.layer_idx]
        key, value = fp8_round_trip(key, k_scale), fp8_round_trip(value, v_scale)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)
    return attention


@torch.no_grad()
def calibrate_kv_scales(model: nn.Module, windows: torch.Tensor) -> dict:
    """Per-head max|k| / 448, max|v| / 448 over windows (NW, T), off the model's cache."""
    amax: dict[int, list[torch.Tensor]] = {}
    for w in windows:
        for i, kv in enumerate(model(w[None], use_cache=True).past_key_values.layers):
            now = [t.abs().amax((0, 2, 3), True).float() for t in (kv.keys, kv.values)]
            amax[i] = [torch.maximum(a, b) for a, b in zip(amax.get(i, now), now)]
    return {i: tuple(a / FP8_MAX for a in pair) for i, pair in amax.items()}


def use_fp8_kv(model: nn.Module, scales: dict) -> None:
    from transformers import AttentionInterface
    name = f"fp8_kv_{id(scales)}"  # the registry is global: one name per set of scales
    AttentionInterface.register(name, fp8_kv_attention(scales))
    model.set_attn_implementation(name)
# --8<-- [end:kv]


# --8<-- [start:library]
def llmcompressor_fp8(model_path: str, save_dir: Path) -> Path:
    """llm-compressor's FP8_DYNAMIC: per-channel E4M3 weights, per-token activation
    scales at run time, no calibration data; saved as a compressed-tensors checkpoint."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    recipe = QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC",
                                  ignore=["lm_head"])
    oneshot(model=model, recipe=recipe)
    model.save_pretrained(save_dir, save_compressed=True)  # E4M3 weights + weight_scale
    AutoTokenizer.from_pretrained(model_path).save_pretrained(save_dir)
    return save_dir


def checkpoint_scales(save_dir: Path) -> dict[str, torch.Tensor]:
    """The weight_scale tensors of a compressed-tensors checkpoint, by layer name."""
    from safetensors import safe_open
    scales = {}
    for path in sorted(save_dir.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            scales.update({key.removesuffix(".weight_scale"): f.get_tensor(key)
                           for key in f.keys() if key.endswith(".weight_scale")})
    return scales


# vLLM quantizes a BF16 checkpoint itself while loading it (FP8 per tensor), Hopper GPU:
VLLM_GPU_COMMAND = """from vllm import LLM
llm = LLM("meta-llama/Meta-Llama-3-8B-Instruct", quantization="fp8", kv_cache_dtype="fp8")
print(llm.generate("The capital of France is")[0].outputs[0].text)"""
# --8<-- [end:library]


# One comparison: perplexity, KL and top-1 against the FP model on the same tokens
@torch.no_grad()
def log_probs(model: nn.Module, windows: torch.Tensor) -> list[torch.Tensor]:
    return [torch.log_softmax(model(w[None]).logits[0, :-1].float(), -1) for w in windows]


def compare(windows: torch.Tensor, reference: list, logqs: list) -> dict[str, float]:
    """perplexity = exp(mean -log q(x_t)) with its delta-method s.e.; KL(p || q); top-1."""
    nll = torch.cat([-lq.gather(1, w[1:, None])[:, 0] for w, lq in zip(windows, logqs)]).double()
    kl = torch.cat([(lp.exp() * (lp - lq)).sum(-1) for lp, lq in zip(reference, logqs)])
    top1 = torch.cat([(lp.argmax(-1) == lq.argmax(-1)).double() for lp, lq in zip(reference, logqs)])
    ppl = math.exp(nll.mean())
    return {"perplexity": ppl, "ppl_stderr": ppl * nll.std().item() / math.sqrt(len(nll)),
            "kl": kl.mean().item(), "top1": top1.mean().item()}


def token_windows(tokenizer, n: int, seqlen: int, calibration: bool) -> torch.Tensor:
    """Windows (n, T) of Python's docs: the first 40 % is calibration text, the rest evaluation."""
    from pydoc_data.topics import topics
    text = "\n\n".join(topics[key] for key in sorted(topics))
    cut = text.index("\n\n", int(len(text) * 0.4))
    tokenizer.model_max_length = 10**9
    part = text[:cut] if calibration else text[cut:]
    ids = torch.tensor(tokenizer(part, add_special_tokens=False)["input_ids"])
    if len(ids) < n * seqlen:
        raise Refusal(f"the text has {len(ids)} tokens, fewer than {n} x {seqlen}: ask for less")
    return ids[: n * seqlen].view(n, seqlen)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                        help="hub id or local transformers folder (a Llama-style decoder)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: cuda if available; the CPU simulates FP8")
    parser.add_argument("--eval-tokens", type=int, default=2048, help="evaluation tokens")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per evaluation window")
    parser.add_argument("--library", action=argparse.BooleanOptionalAction, default=True,
                        help="run llm-compressor's FP8_DYNAMIC and compare its scales with ours")
    parser.add_argument("--quiet", action="store_true", help="no progress bars from transformers")
    return parser


def load(path: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    except (OSError, ValueError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:120]
        raise Refusal(f"cannot load model {path!r} ({first}): pass a hub id or a local folder") from None
    if not hasattr(getattr(model, "model", None), "layers"):
        raise Refusal(f"{path!r} has no model.layers: use a Llama-style decoder-only model")
    return model.to(device).eval(), tokenizer


@torch.no_grad()
def main(args: argparse.Namespace) -> dict:
    if args.eval_tokens < args.seqlen or args.seqlen < 2:
        build_parser().error("--seqlen must be at least 2 and --eval-tokens at least --seqlen")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise Refusal("--device cuda was asked for but no CUDA GPU is visible: use --device cpu")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and (triton is None or torch.cuda.get_device_capability(device) < (8, 9)):
        raise Refusal("FP8 on a GPU needs compute capability 8.9+ (Ada, Hopper) and triton "
                      "(pip install triton): use --device cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # FP8 on GPU: bf16 out
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    if args.quiet:
        hf_logging.disable_progress_bar()
    model, tokenizer = load(args.model, device, dtype)
    formats = {"E4M3": float8_format(E4M3, 4), "E5M2": float8_format(E5M2, 5)}
    for name, f in formats.items():
        print(f"{name}: " + ", ".join(f"{key.replace('_', ' ')} {value:.6g}" for key, value in f.items()))
    print(f"E2M1 (MXFP4, NVFP4 elements): ±{', '.join(f'{v:g}' for v in E2M1_VALUES)}\n")
    scale_diff = None
    if args.library:
        with tempfile.TemporaryDirectory() as tmp:  # the checkpoint is read, then deleted
            theirs = checkpoint_scales(llmcompressor_fp8(args.model, Path(tmp)))
            scale_diff = max((quantize_fp8(m.weight, True)[1].cpu() - theirs[n]).abs().max().item()
                             for n, m in model.named_modules() if n in theirs)
        print(f"llm-compressor FP8_DYNAMIC: {len(theirs)} layers; largest |our scale - theirs| = "
              f"{scale_diff:.3g}\nvLLM on a GPU, quantizing a BF16 checkpoint itself (not run "
              f"here):\n{VLLM_GPU_COMMAND}\n")
    windows = token_windows(tokenizer, args.eval_tokens // args.seqlen, args.seqlen, False).to(device)
    reference = log_probs(model, windows)
    kv_scales = calibrate_kv_scales(model, token_windows(tokenizer, 2, args.seqlen, True).to(device))
    rows = {}
    for name, per_channel, fp8_kv in (("FP8 per tensor", False, False),
                                      ("FP8 per channel + per token", True, False),
                                      ("  + FP8 KV cache (per head)", True, True)):
        quantized = fp8_model(copy.deepcopy(model), per_channel)
        if fp8_kv:
            use_fp8_kv(quantized, kv_scales)
        rows[name] = compare(windows, reference, log_probs(quantized, windows))
    print(f"{'SmolLM2 variant' if 'SmolLM2' in args.model else 'variant':<30} {'ppl ± s.e.':>16} "
          f"{'KL vs FP':>9} {'top-1':>7}   ({windows.numel() - len(windows)} scored tokens)")
    fp = compare(windows, reference, reference)
    for name, r in {"FP (unquantized)": fp, **rows}.items():
        print(f"{name:<30} {r['perplexity']:>8.3f} ± {r['ppl_stderr']:<5.3f} {r['kl']:>9.4f} "
              f"{100 * r['top1']:>6.1f}%")
    return {"formats": formats, "scale_diff": scale_diff, "rows": {"FP": fp, **rows}}


if __name__ == "__main__":
    try:
        main(build_parser().parse_args())
    except Refusal as why:
        print(f"error: {why}", file=sys.stderr)
        sys.exit(2)
