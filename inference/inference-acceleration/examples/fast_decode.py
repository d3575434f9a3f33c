"""Single-GPU decode at the memory-bandwidth limit: a compact Llama decoder, CUDA graphs, INT8 and INT4.

Decoding one token reads every weight once, so batch-1 decode is bound by
`bytes read per step / memory bandwidth`. This script builds a compact Llama-family decoder that
loads transformers weights, and closes the gap to that limit step by step, each step one variant:

    hf_generate   transformers `generate` (dynamic KV cache), the baseline
    eager         our decoder, static KV cache, plain PyTorch, one Python loop
    eager_int8    the same with INT8 weight-only linears (CPU: PyTorch's int8 kernel; CUDA: ours)
    eager_int4    the same with INT4 group-wise linears  (CPU: PyTorch's int4 kernel; CUDA: ours)
    compiled      `torch.compile(mode="reduce-overhead")` of the eager decode step (CUDA graphs inside)
    fused_bf16    five Triton kernels per layer (GEMVs with fused RMSNorm / SiLU*up / residual, decode
                  attention with RoPE and cache write), the whole step captured in one CUDA graph by hand
    fused_int8    the same with INT8 weights (per-channel scales, dequantized in registers)
    fused_int4    the same with INT4 weights (group-wise scales and zeros, eight weights per int32 word,
                  our W4A16 GEMV: integer arithmetic per weight cut to a shift, an and-or, a subtraction)
    int4_tinygemm the same decoder with PyTorch's stock `_weight_int4pack_mm` for every linear (the
                  baseline gpt-fast uses), epilogues as small PyTorch ops in the same CUDA graph

Public names, in reading order (`tensor_parallel.py` in this folder imports them; the script's own
folder is on `sys.path` when a sibling script runs):

    ModelArgs, RMSNorm, KVCache, precompute_rope, apply_rope, Attention, FeedForward, DecoderLayer,
    Transformer, hf_to_fast_name, load_hf_state_dict, model_from_hf,
    prefill, decode_one_token, decode_n_tokens, generate,
    quantize_int8, dequantize_int8, quantize_int4, dequantize_int4, pack_int4, unpack_int4,
    Int8Linear, Int4Linear, Int4TinyGemmLinear, quantize_model, make_linear, fused_linear, reference_linear,
    decode_attention, FusedDecoder

Run it (from the repository root)
    # H100, Llama-3-8B shape with random bf16 weights (no download), every variant, batch 1/8/32:
    python inference/inference-acceleration/examples/fast_decode.py --random-weights llama-3-8b \
        --profile --json inference/inference-acceleration/results/fast_decode-h100.json
    # CPU, the small real model (under a minute on 2 idle cores):
    python inference/inference-acceleration/examples/fast_decode.py --model <SmolLM2 folder> \
        --device cpu --threads 1 --batch-sizes 1 --prompt-len 16 --slow-new-tokens 4 --group-size 64 \
        --ppl-tokens 128 --ppl-context 64 --json fast_decode-cpu.json
    # rebuild the table and chart of an existing results file (measures nothing):
    python inference/inference-acceleration/examples/fast_decode.py --render fast_decode-cpu.json

On the CPU with SmolLM2-135M it prints decode tokens/s of hf_generate, eager, eager_int8 and
eager_int4, checks that the eager decoder's greedy tokens equal transformers' `generate`
(`matches_hf_generate` in the JSON), and reports perplexity, KL divergence and top-1 agreement of
the INT8 and INT4 models against the unquantized one (INT8: KL about 0.005; INT4 with group 64:
about 0.5, a small model is the hard case). The Triton parts need CUDA and the `triton` package
(imported only if present); on the CPU the quantized layers use PyTorch's own int8/int4 kernels.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # optional: the CPU stack has no triton; only the fused variants need it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None
    tl = None

# Shape letters: B batch, T tokens, S cache positions, H query heads, Hkv KV heads, D head dim,
# C model width (dim), F MLP width, V vocabulary, N output features, K input features, G group size.


class UserError(Exception):
    """Bad input: reported as one line `error: ...` with exit code 2."""


# --8<-- [start:decoder]
@dataclass
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # llama3-style frequency scaling, or None

    @classmethod
    def from_hf_config(cls, config: Any) -> "ModelArgs":
        """Read a transformers LlamaConfig; refuse what this compact decoder does not implement."""
        if getattr(config, "model_type", None) != "llama":
            raise UserError(f"model_type {getattr(config, 'model_type', None)!r} is not 'llama'; "
                            "this decoder implements the Llama architecture only")
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            raise UserError("Llama variants with bias terms are not supported")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise UserError(f"activation {config.hidden_act!r} is not supported (silu only)")
        rope = dict(getattr(config, "rope_parameters", None) or {})
        rope_type = rope.get("rope_type", "default")
        if rope_type not in ("default", "llama3"):
            raise UserError(f"rope_type {rope_type!r} is not supported (default, llama3)")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            dim=config.hidden_size, n_layers=config.num_hidden_layers,
            n_heads=config.num_attention_heads,
            n_kv_heads=config.num_key_value_heads or config.num_attention_heads,
            head_dim=head_dim, ffn_dim=config.intermediate_size, vocab_size=config.vocab_size,
            norm_eps=config.rms_norm_eps, tie_embeddings=bool(config.tie_word_embeddings),
            rope_theta=float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
            rope_scaling=rope if rope_type == "llama3" else None,
        )


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 like transformers' LlamaRMSNorm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class KVCache(nn.Module):
    """Static KV cache of one layer: preallocated (B, Hkv, S, D), written in place at `input_pos`.

    Static shapes are what make the decode step capturable in a CUDA graph: the buffers never move.
    """

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        self.k.index_copy_(2, input_pos, k)  # k: (B, Hkv, T, D) into (B, Hkv, S, D)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/D), with Llama-3's long-context rescaling when configured."""
    D = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    s = args.rope_scaling
    if s:  # llama3: divide low frequencies by `factor`, interpolate the band in between
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / hi) & ~(wavelen > old_len / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def precompute_rope(args: ModelArgs, max_len: int, device: torch.device | str
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (S, D) in fp32; the two halves repeat, as in transformers."""
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), rope_inv_freq(args))  # (S, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (S, D)
    return emb.cos().to(device), emb.sin().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos, sin: (T, D). Rotates pairs (x_i, x_{i+D/2}) by position * freq_i."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    """Grouped-query attention over the static cache. `n_heads` / `n_kv_heads` are the heads this
    module holds (a tensor-parallel shard may hold fewer than the model has)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, H, T, D)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = self.kv_cache.update(input_pos, k, v)                               # (B, Hkv, S, D)
        # mask (T, S): position t sees cache slots <= input_pos[t]; empty slots stay masked
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # (B, H, T, D)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU MLP: w_down(silu(w_gate x) * w_up x)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w_gate = nn.Linear(args.dim, args.ffn_dim, bias=False)
        self.w_up = nn.Linear(args.dim, args.ffn_dim, bias=False)
        self.w_down = nn.Linear(args.ffn_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_len = 0

    def setup_caches(self, batch: int, max_len: int) -> None:
        """Allocate every layer's static cache and the RoPE / causal-mask tables for `max_len`."""
        weight = self.tok_embeddings.weight
        for layer in self.layers:
            attn = layer.attention
            attn.kv_cache = KVCache(batch, attn.n_kv_heads, max_len, attn.head_dim,
                                    weight.dtype, weight.device)
        cos, sin = precompute_rope(self.args, max_len, weight.device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        causal = torch.tril(torch.ones(max_len, max_len, dtype=torch.bool, device=weight.device))
        self.register_buffer("causal_mask", causal, persistent=False)
        self.max_len = max_len

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) at positions input_pos (T,) -> logits (B, T, V); writes the KV cache."""
        x = self.tok_embeddings(tokens)                      # (B, T, C)
        cos = self.rope_cos[input_pos].to(x.dtype)           # (T, D)
        sin = self.rope_sin[input_pos].to(x.dtype)
        mask = self.causal_mask[input_pos]                   # (T, S)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos)
        return self.output(self.norm(x))                     # (B, T, V)
# --8<-- [end:decoder]


# ----------------------------------------------------------------------------------------------
# Loading transformers weights
# ----------------------------------------------------------------------------------------------
_LAYER_NAMES = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w_gate", "mlp.up_proj": "feed_forward.w_up",
    "mlp.down_proj": "feed_forward.w_down",
    "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
}


def hf_to_fast_name(name: str) -> str | None:
    """Map a LlamaForCausalLM state-dict key to this decoder's; None for keys we do not keep."""
    fixed = {"model.embed_tokens.weight": "tok_embeddings.weight",
             "model.norm.weight": "norm.weight", "lm_head.weight": "output.weight"}
    if name in fixed:
        return fixed[name]
    parts = name.split(".")  # model.layers.<i>.<module>.<sub>.weight
    if len(parts) >= 5 and parts[:2] == ["model", "layers"]:
        inner = ".".join(parts[3:-1])
        if inner in _LAYER_NAMES:
            return f"layers.{parts[2]}.{_LAYER_NAMES[inner]}.{parts[-1]}"
    return None


def load_hf_state_dict(model: Transformer, state_dict: dict[str, torch.Tensor],
                       assign: bool = False) -> None:
    """Copy (or, with assign=True, share) a transformers Llama state dict into `model`."""
    mapped = {}
    for name, tensor in state_dict.items():
        new = hf_to_fast_name(name)
        if new is not None and not (new == "output.weight" and model.args.tie_embeddings):
            mapped[new] = tensor
    if model.args.tie_embeddings:
        mapped.pop("output.weight", None)
    missing, unexpected = model.load_state_dict(mapped, strict=False, assign=assign)
    missing = [m for m in missing if not (m == "output.weight" and model.args.tie_embeddings)]
    if missing or unexpected:
        raise UserError(f"state dict does not fit the decoder: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if model.args.tie_embeddings:  # assign=True may have replaced the shared parameter
        model.output.weight = model.tok_embeddings.weight


def model_from_hf(hf_model: nn.Module, share_weights: bool = True) -> Transformer:
    """Build our decoder from a loaded LlamaForCausalLM, on its device and dtype.

    With share_weights the two models use the same tensors (no second copy of an 8B model)."""
    args = ModelArgs.from_hf_config(hf_model.config)
    with torch.device("meta"):
        model = Transformer(args)
    state = hf_model.state_dict()
    if not share_weights:
        state = {k: v.clone() for k, v in state.items()}
    load_hf_state_dict(model, state, assign=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------
# Generation, in reading order
# ----------------------------------------------------------------------------------------------
# --8<-- [start:decode]
def prefill(model: nn.Module, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """Run the prompt (B, T) through the model, filling the cache; return the next token (B, 1)."""
    logits = model(tokens, input_pos)                       # (B, T, V)
    return logits[:, -1].argmax(dim=-1, keepdim=True)       # greedy


def decode_one_token(model: nn.Module, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """One decode step: token (B, 1) at input_pos (1,) -> next token (B, 1)."""
    logits = model(token, input_pos)                        # (B, 1, V)
    return logits[:, -1].argmax(dim=-1, keepdim=True)


def decode_n_tokens(step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], token: torch.Tensor,
                    start_pos: int, n: int) -> list[torch.Tensor]:
    """Call `step(token, input_pos)` n times; positions are plain integers on the host."""
    out = []
    for i in range(n):
        input_pos = torch.tensor([start_pos + i], device=token.device)
        token = step(token, input_pos).clone()  # clone: a CUDA-graph output is overwritten next step
        out.append(token)
    return out


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int,
             step: Callable | None = None) -> torch.Tensor:
    """Greedy generation: prompt (B, T) -> (B, T + max_new_tokens). No early stop at EOS."""
    B, T = prompt.shape
    if model.max_len < T + max_new_tokens or model.layers[0].attention.kv_cache.k.shape[0] != B:
        model.setup_caches(B, T + max_new_tokens)
    step = step or (lambda tok, pos: decode_one_token(model, tok, pos))
    first = prefill(model, prompt, torch.arange(T, device=prompt.device))
    rest = decode_n_tokens(step, first, T, max_new_tokens - 1)
    return torch.cat([prompt, first, *rest], dim=1)
# --8<-- [end:decode]


# ----------------------------------------------------------------------------------------------
# Weight-only quantization: pure functions, then modules
# ----------------------------------------------------------------------------------------------
# PyTorch's CPU weight-only kernels are made for decode (a few rows of x); for a prompt we
# dequantize once and use an ordinary matmul, as engines switch kernels between prefill and decode.
CPU_KERNEL_MAX_ROWS = 32


# --8<-- [start:int8]
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel INT8: w ≈ q * s[:, None], s = max|w_row| / 127, q in [-127, 127].

    w: (N, K) -> q (N, K) int8, s (N,) fp32."""
    w = w.float()
    s = (w.abs().amax(dim=1) / 127).clamp(min=1e-10)
    q = torch.clamp(torch.round(w / s[:, None]), -127, 127).to(torch.int8)
    return q, s


def dequantize_int8(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return q.float() * s[:, None]


class Int8Linear(nn.Module):
    """y = x W^T with W stored as INT8 + one fp32 scale per output row (weight-only: x stays bf16)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        q, s = quantize_int8(weight)
        self.register_buffer("weight", q)    # (N, K) int8
        self.register_buffer("scale", s)     # (N,)  fp32
        self.out_features, self.in_features = q.shape

    def dequantized(self) -> torch.Tensor:
        return dequantize_int8(self.weight, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _kernels_usable(x):
            return fused_linear(x, self)  # our Triton kernel (CUDA)
        if x.device.type == "cpu" and x.numel() <= CPU_KERNEL_MAX_ROWS * self.in_features:
            # decode: PyTorch's own weight-only INT8 kernel for the CPU
            y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features), self.weight, self.scale.to(x.dtype))
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.dequantized().to(x.dtype))  # prompt / reference: dequantize, then matmul
# --8<-- [end:int8]


# --8<-- [start:int4]
def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise INT4 along K: each run of `group` weights of a row gets a scale s and
    an integer zero point z; q = clamp(round(w / s) + z, 0, 15) and w ≈ (q - z) * s.

    w: (N, K) -> q (N, K) uint8 in [0, 15], s (N, K/G) bf16, z (N, K/G) bf16 (integers 0..15)."""
    N, K = w.shape
    wg = w.float().reshape(N, K // group, group)                       # (N, K/G, G)
    lo = wg.amin(dim=2).clamp(max=0)
    hi = wg.amax(dim=2).clamp(min=0)
    s = ((hi - lo) / 15).clamp(min=1e-8).to(torch.bfloat16).float()    # round s to its stored dtype first
    z = torch.clamp(torch.round(-lo / s), 0, 15)
    q = torch.clamp(torch.round(wg / s[..., None]) + z[..., None], 0, 15)
    return q.reshape(N, K).to(torch.uint8), s.to(torch.bfloat16), z.to(torch.bfloat16)


def dequantize_int4(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, group: int) -> torch.Tensor:
    N, K = q.shape
    qg = q.float().reshape(N, K // group, group)
    return ((qg - z.float()[..., None]) * s.float()[..., None]).reshape(N, K)


def pack_int4(q: torch.Tensor, group: int) -> torch.Tensor:
    """Eight 4-bit values per int32 word, in strips: a group's W = G/8 words hold its G weights so
    that field i (bits 4i..4i+3) of word j is element i*W + j. Field i of all W words is then a
    run of W consecutive weights, which a kernel multiplies with a contiguous run of x.

    q: (N, K) uint8 in [0, 15] -> (N, K/8) int32."""
    N, K = q.shape
    W = group // 8
    qg = q.to(torch.int64).reshape(N, K // group, 8, W)                    # (N, K/G, 8, W): field i, word j
    shifts = (4 * torch.arange(8, device=q.device)).view(1, 1, 8, 1)
    words = (qg << shifts).sum(dim=2)                                        # (N, K/G, W) in [0, 2^32)
    words = torch.where(words >= 2**31, words - 2**32, words)                # as signed int32 bits
    return words.to(torch.int32).reshape(N, K // 8)


def unpack_int4(packed: torch.Tensor, group: int) -> torch.Tensor:
    N, K8 = packed.shape
    W = group // 8
    words = packed.to(torch.int64).reshape(N, K8 // W, 1, W)                 # (N, K/G, 1, W)
    shifts = (4 * torch.arange(8, device=packed.device)).view(1, 1, 8, 1)
    return ((words >> shifts) & 15).to(torch.uint8).reshape(N, 8 * K8)      # (N, K)


class Int4Linear(nn.Module):
    """y = x W^T with W stored as packed INT4 (N, K/8) int32 and per-group scales / zeros stored
    transposed (K/G, N), so that a kernel reading a tile of rows loads them contiguously."""

    def __init__(self, weight: torch.Tensor, group: int):
        super().__init__()
        N, K = weight.shape
        if K % group or group % 8 or group & (group - 1):
            raise UserError(f"--group-size {group} must be a power of two >= 8 dividing the input width {K}")
        q, s, z = quantize_int4(weight, group)
        self.group = group
        self.register_buffer("packed", pack_int4(q, group))     # (N, K/8) int32
        self.register_buffer("scale", s.t().contiguous())       # (K/G, N) bf16
        self.register_buffer("zero", z.t().contiguous())        # (K/G, N) bf16
        self.out_features, self.in_features = N, K

    def dequantized(self) -> torch.Tensor:
        q = unpack_int4(self.packed, self.group)
        return dequantize_int4(q, self.scale.t(), self.zero.t(), self.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _kernels_usable(x):
            return fused_linear(x, self)  # our Triton kernel (CUDA)
        if x.device.type == "cpu" and x.numel() <= CPU_KERNEL_MAX_ROWS * self.in_features:
            # decode: PyTorch's weight-only INT4 kernel for the CPU (its own packing)
            packed, scales_zeros = self._cpu_format()
            y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).contiguous(), packed,
                                                  self.group, scales_zeros.to(x.dtype))
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.dequantized().to(x.dtype))  # prompt / reference: dequantize, then matmul

    def _cpu_format(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Repack once for PyTorch's CPU kernel, which computes w = (q - 8) * s + m per group:
        our (q - z) * s is the same with m = (8 - z) * s."""
        if getattr(self, "_cpu", None) is None:
            q = unpack_int4(self.packed, self.group).to(torch.int32)                # (N, K)
            s, z = self.scale.float(), self.zero.float()                            # (K/G, N)
            self._cpu = (torch._convert_weight_to_int4pack_for_cpu(q, 2), torch.stack([s, (8 - z) * s], dim=-1))
        return self._cpu
# --8<-- [end:int4]


# --8<-- [start:tinygemm]
class Int4TinyGemmLinear(nn.Module):
    """The same INT4 weights (same q, s, z) for PyTorch's stock CUDA kernel `_weight_int4pack_mm`
    (tinygemm, gpt-fast's int4 path): the baseline our Triton kernel is measured against. Its packing
    is its own (tiles for the tensor cores, `inner_k_tiles` 8), fed two values per byte with the even
    element in the high nibble; it computes w = (q - 8) * s + m per group, i.e. m = (8 - z) * s."""

    def __init__(self, weight: torch.Tensor, group: int, inner_k_tiles: int = 8):
        super().__init__()
        q, s, z = quantize_int4(weight, group)                               # (N, K), (N, K/G) x 2
        pairs = (q[:, ::2] << 4 | q[:, 1::2]).contiguous()                    # (N, K/2) uint8
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack(pairs, inner_k_tiles))
        s, z = s.float().t(), z.float().t()                                  # (K/G, N)
        self.register_buffer("scales_zeros", torch.stack([s, (8 - z) * s], dim=-1).to(torch.bfloat16))
        self.group, (self.out_features, self.in_features) = group, weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., K) bf16 on CUDA -> (..., N)
        y = torch.ops.aten._weight_int4pack_mm(x.reshape(-1, self.in_features).contiguous(), self.packed,
                                               self.group, self.scales_zeros)
        return y.view(*x.shape[:-1], self.out_features)
# --8<-- [end:tinygemm]


@torch.no_grad()  # built under no_grad: otherwise every scale keeps an fp32 copy of its weight alive
def quantize_model(model: Transformer, fmt: str, group: int, lm_head: bool = True) -> Transformer:
    """Swap every nn.Linear of the decoder layers (and the LM head if `lm_head`) for Int8/Int4Linear."""
    def make(lin: nn.Linear) -> nn.Module:
        return Int8Linear(lin.weight) if fmt == "int8" else Int4Linear(lin.weight, group)

    for layer in model.layers:
        for parent in (layer.attention, layer.feed_forward):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, make(child))
    if lm_head:
        model.output = make(model.output)
    return model


def linear_bytes(module: nn.Module) -> int:
    """Bytes a linear layer reads per step: its weight as stored, scales and zeros included."""
    if isinstance(module, nn.Linear):
        return module.weight.numel() * module.weight.element_size()
    return sum(b.numel() * b.element_size() for b in module.buffers())


# ----------------------------------------------------------------------------------------------
# Triton kernels (CUDA only)
# ----------------------------------------------------------------------------------------------
def _kernels_usable(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


# The Triton interpreter (TRITON_INTERPRET=1, runs kernels on the CPU for tests) cannot multiply
# bf16 matrices; there the tensor-core operands are fp32 instead.
_DOT_F32 = os.environ.get("TRITON_INTERPRET") == "1"

if triton is not None:

    @triton.jit
    def _mma_in(v, DOT_F32: tl.constexpr):
        """Operand dtype for tl.dot: bf16 on the GPU's tensor cores (fp32 in the interpreter)."""
        if DOT_F32:
            return v.to(tl.float32)
        return v.to(tl.bfloat16)

    @triton.jit
    def _load_act(x_ptr, rows, cols, rmask, stride_x, K):
        """Activation tile (BM, BK) in fp32 (zeros outside the matrix)."""
        mask = rmask[:, None] & (cols[None, :] < K)
        return tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _u8_to_f32(v, OFFSET: tl.constexpr):
        """Exact byte -> float without the slow int-to-float unit: 0x4B000000 | v is 2^23 + v as a
        float, so subtracting 2^23 + OFFSET gives v - OFFSET with one OR and one subtraction."""
        bits = v.to(tl.int32) | 0x4B000000
        return bits.to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)

    @triton.jit
    def _store_out(acc, acc_up, rows, cols, rmask, nmask, r_ptr, y_ptr, stride_r, stride_y,
                   GLU: tl.constexpr, RES: tl.constexpr):
        """Epilogue: GLU -> silu(gate) * up (the MLP's activation, so the down projection reads
        plain inputs); RES -> add the residual stream (no separate add kernel); cast and store."""
        if GLU:
            acc = acc * tl.sigmoid(acc) * acc_up
        mask = rmask[:, None] & nmask[None, :]
        if RES:
            acc += tl.load(r_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)

    # --8<-- [start:gemv]
    @triton.jit
    def _dense_tile(w_ptr, rows_w, nmask, k, K, INT8: tl.constexpr):
        """Weight tile (BN, BK) in fp32; INT8 bits turn into exact integers without the int->float unit."""
        w = tl.load(w_ptr + rows_w[:, None] * K + k[None, :], mask=nmask[:, None] & (k[None, :] < K), other=0)
        if INT8:
            return _u8_to_f32(w.to(tl.uint8, bitcast=True) ^ 0x80, 128.0)
        return w.to(tl.float32)

    @triton.jit
    def _mac(acc, w, x, BLOCK_M: tl.constexpr, DOT_F32: tl.constexpr):
        """acc (BM, BN) += x (BM, BK) @ w (BN, BK)^T: CUDA-core multiply-and-sum for one row,
        tensor cores (tl.dot) for a batch."""
        if BLOCK_M == 1:
            return acc + tl.sum(w * x, axis=1)[None, :]
        return acc + tl.dot(_mma_in(x, DOT_F32), tl.trans(_mma_in(w, DOT_F32)))

    @triton.jit
    def _linear_kernel(x_ptr, w_ptr, s_ptr, r_ptr, y_ptr, M, N, K, stride_x, stride_r, stride_y, eps,
                       INT8: tl.constexpr, RMS: tl.constexpr, GLU: tl.constexpr, RES: tl.constexpr,
                       DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
        """y (M, N) = x (M, K) @ W^T for bf16 or INT8 W; one program per BLOCK_N output columns.

        RMS: RMSNorm of x, its weight folded into W: sum(x^2) is gathered in the same loop and
        1/rms scales the output. GLU: W holds [gate; up] (2N rows); the program reads row n and
        row N + n and writes silu(gate) * up."""
        pid_n, pid_m = tl.program_id(0), tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask, nmask = rows < M, cols < N
        kk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        ss = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = _load_act(x_ptr, rows, k0 + kk, rmask, stride_x, K)                           # (BM, BK)
            acc = _mac(acc, _dense_tile(w_ptr, cols, nmask, k0 + kk, K, INT8), x, BLOCK_M, DOT_F32)
            if GLU:
                acc_up = _mac(acc_up, _dense_tile(w_ptr, cols + N, nmask, k0 + kk, K, INT8), x, BLOCK_M, DOT_F32)
            if RMS:
                ss += tl.sum(x * x, axis=1)
        if INT8:  # per-row scale once at the end: sum_k (q s) x = s sum_k q x
            acc *= tl.load(s_ptr + cols, mask=nmask, other=0.0)[None, :]
            if GLU:
                acc_up *= tl.load(s_ptr + N + cols, mask=nmask, other=0.0)[None, :]
        if RMS:
            rstd = tl.rsqrt(ss / K + eps)[:, None]
            acc *= rstd
            acc_up *= rstd
        _store_out(acc, acc_up, rows, cols, rmask, nmask, r_ptr, y_ptr, stride_r, stride_y, GLU, RES)

    # INT4 layout (pack_int4), group G = 8W weights of one row in W int32 words, "strips":
    #
    #   weights of the group  q[0 .. W-1] | q[W .. 2W-1] | ... | q[7W .. 8W-1]
    #   word j (j < W)        bits 0-3 = q[j], bits 4-7 = q[W + j], ..., bits 28-31 = q[7W + j]
    #   packed (N, K/8)       row n: the W words of group 0, then of group 1, ...
    #
    # One (BLOCK_N, W) tile of words is loaded along K (16 bytes per thread); strip i,
    # (words >> 4i) & 15, meets the contiguous run x[gG + iW : gG + (i+1)W], loaded once per program
    # and reused by all BLOCK_N rows.
    @triton.jit
    def _int4_strip(words, i: tl.constexpr, z):
        """Strip i of a (BN, W) tile of words as exact floats q - z (for the tensor cores), z (BN, 1).
        The field OR-ed into the mantissa of 2^23 (bits 0x4B000000) reads as the float 2^23 + q."""
        bits = ((words >> (4 * i)) & 15) | 0x4B000000
        return bits.to(tl.float32, bitcast=True) - (8388608.0 + z)

    @triton.jit
    def _int4_strip_unit(words, i: tl.constexpr):
        """Strip i as the floats f = 1 + q/16: the field moved to the top of the mantissa of 1.0
        (bits 19-22 under 0x3F800000). Two integer instructions (a shift, one and-or) per weight and
        no subtraction: the kernel multiplies f by x and removes the 1 per group, sum f x - sum x."""
        if 4 * i <= 19:
            bits = words << (19 - 4 * i)
        else:
            bits = words >> (4 * i - 19)
        return ((bits & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)

    @triton.jit
    def _int4_mac(part, words, i: tl.constexpr, z, x, BLOCK_M: tl.constexpr, DOT_F32: tl.constexpr):
        """One row: part (BN, W) += (1 + q/16) x, one FMA per weight, summed over W only after the
        loop. A batch: part (BM, BN) += x . (q - z) on the tensor cores."""
        if BLOCK_M == 1:
            part += _int4_strip_unit(words, i) * x                                       # x (1, W)
        else:
            w = _int4_strip(words, i, z)                                                 # (BN, W)
            part += tl.dot(_mma_in(x, DOT_F32), tl.trans(_mma_in(w, DOT_F32)))           # x (BM, W)
        return part

    @triton.jit
    def _rms_rstd(x_ptr, rows, rmask, stride_x, K, eps, BLOCK_M: tl.constexpr):
        """1 / sqrt(mean(x^2) + eps) per row (BM,), in a short loop of its own before the GEMV."""
        kk = tl.arange(0, 512)
        ss = tl.zeros((BLOCK_M, 512), dtype=tl.float32)
        for k0 in range(0, K, 512):
            x = _load_act(x_ptr, rows, k0 + kk, rmask, stride_x, K)                       # (BM, 512)
            ss += x * x
        return tl.rsqrt(tl.sum(ss, axis=1) / K + eps)

    @triton.jit
    def _int4_linear_kernel(x_ptr, w_ptr, s_ptr, z_ptr, r_ptr, y_ptr, M, N, K, NW,
                            stride_x, stride_w, stride_r, stride_y, eps,
                            GROUP: tl.constexpr, RMS: tl.constexpr, GLU: tl.constexpr, RES: tl.constexpr,
                            DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            GROUPS: tl.constexpr):
        """W4A16: y = x @ W^T with W packed (NW, K/8) int32 in strips, scales s and zeros z (K/G, NW).

        y_n = sum_g s_ng * sum_{k in g} (q_nk - z_ng) x_k, the scale applied once per group and row.
        One row: with f = 1 + q/16 and X_g = sum_{k in g} x_k, the inner sum is 16 sum f x - (16 + z) X_g,
        so a weight costs a shift, an and-or and one FMA (fp32 throughout). One program owns BLOCK_N rows
        and the whole K, so the fused epilogue (RMSNorm, SiLU*up, residual) stays in one kernel;
        GROUPS groups (a divisor of K/G) per loop iteration are unrolled, so their loads are in
        flight together. One row (BLOCK_M = 1): CUDA-core FMAs into a (BN, W) accumulator, one
        cross-thread sum at the very end. A batch: tensor cores (tl.dot per strip; W = G/8 >= 16).
        RMS and GLU as in _linear_kernel (NW = 2N rows with GLU)."""
        pid_n, pid_m = tl.program_id(0), tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask, nmask = rows < M, cols < N
        W: tl.constexpr = GROUP // 8
        j = tl.arange(0, W)
        if BLOCK_M == 1:
            acc = tl.zeros((BLOCK_N, W), dtype=tl.float32)     # per (row, word column), summed at the end
            x_row = x_ptr + j[None, :]                         # row 0 always exists: no mask on x
            xsum = tl.zeros((1, W), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros_like(acc)
        for g0 in range(0, K // GROUP, GROUPS):
            for gi in tl.static_range(GROUPS):
                g = g0 + gi
                words = tl.load(w_ptr + cols[:, None] * stride_w + g * W + j[None, :],
                                mask=nmask[:, None], other=0)                            # (BN, W) int32
                s = tl.load(s_ptr + g * NW + cols, mask=nmask, other=0.0).to(tl.float32)   # (BN,)
                z = tl.load(z_ptr + g * NW + cols, mask=nmask, other=0.0).to(tl.float32)
                part = tl.zeros_like(acc)
                if GLU:  # rows N + n: the up projection, same x
                    words_up = tl.load(w_ptr + (cols + N)[:, None] * stride_w + g * W + j[None, :],
                                       mask=nmask[:, None], other=0)
                    s_up = tl.load(s_ptr + g * NW + N + cols, mask=nmask, other=0.0).to(tl.float32)
                    z_up = tl.load(z_ptr + g * NW + N + cols, mask=nmask, other=0.0).to(tl.float32)
                    part_up = tl.zeros_like(acc)
                if BLOCK_M == 1:
                    xsum = tl.zeros((1, W), dtype=tl.float32)  # X_g per word column
                for i in tl.static_range(8):
                    if BLOCK_M == 1:
                        x = tl.load(x_row + g * GROUP + i * W).to(tl.float32)                   # (1, W)
                        xsum += x
                    else:
                        x = _load_act(x_ptr, rows, g * GROUP + i * W + j, rmask, stride_x, K)  # (BM, W)
                    part = _int4_mac(part, words, i, z[:, None], x, BLOCK_M, DOT_F32)
                    if GLU:
                        part_up = _int4_mac(part_up, words_up, i, z_up[:, None], x, BLOCK_M, DOT_F32)
                if BLOCK_M == 1:  # s (16 sum f x - (16 + z) X_g), once per group and (row, word column)
                    acc += (16.0 * s)[:, None] * part - (s * (16.0 + z))[:, None] * xsum
                    if GLU:
                        acc_up += (16.0 * s_up)[:, None] * part_up - (s_up * (16.0 + z_up))[:, None] * xsum
                else:
                    acc += part * s[None, :]
                    if GLU:
                        acc_up += part_up * s_up[None, :]
        if BLOCK_M == 1:
            acc = tl.sum(acc, axis=1)[None, :]                                           # (1, BN)
            acc_up = tl.sum(acc_up, axis=1)[None, :]
        if RMS:
            rstd = _rms_rstd(x_ptr, rows, rmask, stride_x, K, eps, BLOCK_M)[:, None]
            acc *= rstd
            acc_up *= rstd
        _store_out(acc, acc_up, rows, cols, rmask, nmask, r_ptr, y_ptr, stride_r, stride_y, GLU, RES)
    # --8<-- [end:gemv]

    # --8<-- [start:attention]
    @triton.jit
    def _decode_attention_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, k_ptr, v_ptr, o_ptr,
                                 stride_qkv, stride_cb, stride_ch, stride_cs, stride_o, sm_scale,
                                 H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                                 G_PAD: tl.constexpr, BLOCK_S: tl.constexpr, DOT_F32: tl.constexpr):
        """One program per (sequence, KV head): RoPE on q and the new k, write k and v into the cache
        at `pos`, then attention of the G query heads of this group over slots 0..pos only (online
        softmax), so the step reads the cache up to the current length, not its full size."""
        b, hk = tl.program_id(0), tl.program_id(1)
        G: tl.constexpr = H // HKV
        HALF: tl.constexpr = D // 2
        pos = tl.load(pos_ptr)
        d = tl.arange(0, HALF)
        cos = tl.load(cos_ptr + pos * D + d)
        sin = tl.load(sin_ptr + pos * D + d)
        gi = tl.arange(0, G_PAD)
        gmask = gi < G
        row = qkv_ptr + b * stride_qkv
        q_ptrs = row + (hk * G + gi)[:, None] * D + d[None, :]                         # (G_PAD, D/2)
        q1 = tl.load(q_ptrs, mask=gmask[:, None], other=0.0).to(tl.float32)
        q2 = tl.load(q_ptrs + HALF, mask=gmask[:, None], other=0.0).to(tl.float32)
        qscale = sm_scale * 1.4426950408889634  # fold log2(e): softmax with exp2
        q1r = _mma_in((q1 * cos - q2 * sin) * qscale, DOT_F32)                        # (G_PAD, D/2)
        q2r = _mma_in((q2 * cos + q1 * sin) * qscale, DOT_F32)
        k1 = tl.load(row + (H + hk) * D + d).to(tl.float32)
        k2 = tl.load(row + (H + hk) * D + HALF + d).to(tl.float32)
        dd = tl.arange(0, D)
        v_new = tl.load(row + (H + HKV + hk) * D + dd)
        kc = k_ptr + b * stride_cb + hk * stride_ch
        vc = v_ptr + b * stride_cb + hk * stride_ch
        tl.store(kc + pos * stride_cs + d, (k1 * cos - k2 * sin).to(kc.dtype.element_ty))
        tl.store(kc + pos * stride_cs + HALF + d, (k2 * cos + k1 * sin).to(kc.dtype.element_ty))
        tl.store(vc + pos * stride_cs + dd, v_new.to(vc.dtype.element_ty))
        tl.debug_barrier()  # the block's own stores above are visible to all its threads below
        m_i = tl.full((G_PAD,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((G_PAD,), dtype=tl.float32)
        acc = tl.zeros((G_PAD, D), dtype=tl.float32)
        for s0 in range(0, pos + 1, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            smask = s <= pos
            kt1 = tl.load(kc + s[:, None] * stride_cs + d[None, :], mask=smask[:, None], other=0.0)
            kt2 = tl.load(kc + s[:, None] * stride_cs + HALF + d[None, :], mask=smask[:, None], other=0.0)
            sc = tl.dot(q1r, tl.trans(_mma_in(kt1, DOT_F32))) + tl.dot(q2r, tl.trans(_mma_in(kt2, DOT_F32)))
            sc = tl.where(smask[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            p = tl.exp2(sc - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            vt = tl.load(vc + s[:, None] * stride_cs + dd[None, :], mask=smask[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(_mma_in(p, DOT_F32), _mma_in(vt, DOT_F32))  # (G_PAD, D)
            m_i = m_new
        out = acc / l_i[:, None]
        o_ptrs = o_ptr + b * stride_o + (hk * G + gi)[:, None] * D + dd[None, :]
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=gmask[:, None])
    # --8<-- [end:attention]


# Launch configurations (BLOCK_N, BLOCK_K, num_warps, num_stages); for INT4 the second number is the
# groups unrolled per loop iteration. `--tune` times the candidates on the real shapes and keeps the
# fastest; without it the defaults below are used. Small BLOCK_N = many programs = more loads in flight;
# for INT4 at batch 1, the bytes in flight per SM grow with the groups unrolled (16 bytes per thread
# each), and BLOCK_N = 32 x num_warps / 4 x r gives each thread r rows that share its registers of x.
GEMV_CANDIDATES = {
    "bf16": [(2, 2048, 4, 2), (4, 1024, 4, 3), (4, 2048, 8, 2), (8, 512, 4, 3), (8, 1024, 4, 3),
             (8, 1024, 8, 3), (16, 512, 4, 3), (16, 1024, 8, 3)],
    "int8": [(2, 4096, 8, 2), (4, 2048, 4, 3), (4, 4096, 8, 2), (8, 1024, 4, 3), (8, 2048, 8, 3),
             (16, 1024, 4, 3), (16, 2048, 8, 3)],
    "int4": [(16, 8, 2, 1), (16, 16, 1, 1), (32, 8, 1, 1), (32, 16, 2, 1), (64, 8, 2, 1), (64, 8, 4, 1),
             (128, 4, 4, 1), (128, 8, 8, 1)],
}
GEMM_CANDIDATES = [(32, 128, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4), (128, 64, 8, 3)]
GEMM_INT4_CANDIDATES = [(32, 1, 4, 3), (64, 1, 4, 3), (64, 2, 4, 3), (128, 1, 8, 3)]
DEFAULT_GEMV = {"bf16": (8, 512, 4, 3), "int8": (8, 1024, 4, 3), "int4": (64, 8, 4, 1)}


def weight_format(lin: nn.Module) -> str:
    return {Int8Linear: "int8", Int4Linear: "int4", Int4TinyGemmLinear: "int4_tinygemm"}.get(type(lin), "bf16")


def _launch_config(lin: nn.Module, M: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for M rows: tuned if available."""
    block_m = 1 if M == 1 else (16 if M <= 16 else 32)
    tuned = getattr(lin, "_tuned", {}).get(block_m)
    if tuned is not None:
        return (block_m, *tuned)
    if block_m == 1:
        return (1, *DEFAULT_GEMV[weight_format(lin)])
    return (block_m, *(GEMM_INT4_CANDIDATES if isinstance(lin, Int4Linear) else GEMM_CANDIDATES)[1])


def make_linear(w: torch.Tensor, fmt: str, group: int = 128) -> nn.Module:
    """A bias-free linear layer holding `w` (N, K) as bf16 (nn.Linear), Int8Linear, Int4Linear or
    Int4TinyGemmLinear (fmt "int4_tinygemm", CUDA only)."""
    if fmt == "int8":
        return Int8Linear(w)
    if fmt == "int4_tinygemm":
        return Int4TinyGemmLinear(w, group)
    if fmt == "int4":
        return Int4Linear(w, group)
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(w.to(torch.bfloat16), requires_grad=False)  # shares when already bf16
    return lin


def reference_linear(x: torch.Tensor, lin: nn.Module, rms: bool = False, glu: bool = False,
                     residual: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """What `fused_linear` computes, in plain fp32 PyTorch on the dequantized weight (for tests)."""
    W = lin.weight.float() if isinstance(lin, nn.Linear) else lin.dequantized()
    x = x.float()
    if isinstance(lin, Int4Linear):
        x = x.bfloat16().float()  # the kernel rounds x to bf16 for its tensor-core path and sums
    y = x @ W.t()
    if rms:
        y = y * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if glu:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    return y + residual.float() if residual is not None else y


def fused_linear(x: torch.Tensor, lin: nn.Module, out: torch.Tensor | None = None, rms: bool = False,
                 glu: bool = False, residual: torch.Tensor | None = None, eps: float = 0.0,
                 config: tuple[int, ...] | None = None) -> torch.Tensor:
    """y = x @ W^T through the Triton kernels, for nn.Linear (bf16), Int8Linear or Int4Linear
    (Int4TinyGemmLinear: PyTorch's stock kernel, the same epilogue in plain PyTorch ops).

    rms: x is RMS-normalized on the fly (norm weight already folded into W); glu: W is [gate; up]
    and y = silu(x W_gate^T) * (x W_up^T); residual: y += residual. x: (..., K), out: (..., N)."""
    K, NW = lin.in_features, lin.out_features
    N = NW // 2 if glu else NW
    x2 = x.reshape(-1, x.shape[-1])
    M = x2.shape[0]
    if out is None:
        out = torch.empty((*x.shape[:-1], N), dtype=x.dtype, device=x.device)
    y2 = out.view(-1, N)
    r2 = residual.view(-1, N) if residual is not None else y2
    if isinstance(lin, Int4TinyGemmLinear):  # the baseline: stock GEMM, then the epilogue as small ops
        if rms:
            x2 = (x2.float() * torch.rsqrt(x2.float().pow(2).mean(-1, keepdim=True) + eps)).to(x2.dtype)
        y = lin(x2).float()                                                      # (M, NW)
        if glu:
            y = F.silu(y[:, :N]) * y[:, N:]
        y2.copy_(y + r2.float() if residual is not None else y)
        return out
    BM, BN, BK, warps, stages = config or _launch_config(lin, M)
    grid = (triton.cdiv(N, BN), triton.cdiv(M, BM))
    common = dict(RMS=rms, GLU=glu, RES=residual is not None, DOT_F32=_DOT_F32, BLOCK_M=BM, BLOCK_N=BN,
                  num_warps=warps, num_stages=stages)
    if isinstance(lin, Int4Linear):
        _int4_linear_kernel[grid](x2, lin.packed, lin.scale, lin.zero, r2, y2, M, N, K, NW,
                                  x2.stride(0), lin.packed.stride(0), r2.stride(0), y2.stride(0), eps,
                                  GROUP=lin.group, GROUPS=math.gcd(BK, K // lin.group), **common)
    else:
        w = lin.weight
        s = lin.scale if isinstance(lin, Int8Linear) else w
        _linear_kernel[grid](x2, w, s, r2, y2, M, N, K, x2.stride(0), r2.stride(0), y2.stride(0), eps,
                             INT8=isinstance(lin, Int8Linear), BLOCK_K=BK, **common)
    return out


def tune_linear(lin: nn.Module, M: int, rms: bool = False, glu: bool = False) -> dict:
    """Time the candidate launch configurations on this layer's real shape (do_bench flushes the L2
    cache between runs, so the weights come from HBM as in decoding) and keep the fastest.
    Returns the choice with its time and the weight bandwidth it reached."""
    block_m = 1 if M == 1 else (16 if M <= 16 else 32)
    fmt = weight_format(lin)
    cands = [()] if fmt == "int4_tinygemm" else GEMV_CANDIDATES[fmt] if block_m == 1 \
        else GEMM_INT4_CANDIDATES if fmt == "int4" else GEMM_CANDIDATES  # tinygemm: nothing to tune, timed
    x = torch.randn(M, lin.in_features, device="cuda", dtype=torch.bfloat16)
    best, best_ms, tried = None, float("inf"), {}
    for cand in cands:
        try:
            ms = triton.testing.do_bench(lambda: fused_linear(x, lin, rms=rms, glu=glu, config=(block_m, *cand)),
                                         warmup=5, rep=20, return_mode="median")
        except Exception as error:  # a config the compiler rejects (resources) is skipped, not fatal
            tried[str(cand)] = f"skipped: {type(error).__name__}"
            continue
        tried[str(cand)] = round(ms * 1000, 1)
        if ms < best_ms:
            best, best_ms = cand, ms
    if best is None:  # nothing compiled: keep the defaults
        return {"config": None, "us": float("nan"), "weight_gbps": float("nan"), "tried_us": tried}
    lin._tuned = {**getattr(lin, "_tuned", {}), block_m: best}
    return {"config": best, "us": best_ms * 1000, "weight_gbps": linear_bytes(lin) / best_ms / 1e6,
            "tried_us": tried}


def decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                     cache: KVCache, out: torch.Tensor, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """qkv (B, (H + 2 Hkv) D) -> out (B, H D); writes this step's k, v into `cache` at `pos` (1,)."""
    B = qkv.shape[0]
    D = cache.k.shape[-1]
    G = n_heads // n_kv_heads
    _decode_attention_kernel[(B, n_kv_heads)](
        qkv, cos, sin, pos, cache.k, cache.v, out,
        qkv.stride(0), cache.k.stride(0), cache.k.stride(1), cache.k.stride(2), out.stride(0),
        1.0 / math.sqrt(D), H=n_heads, HKV=n_kv_heads, D=D, G_PAD=max(16, triton.next_power_of_2(G)),
        BLOCK_S=64, DOT_F32=_DOT_F32, num_warps=4)
    return out


# ----------------------------------------------------------------------------------------------
# The fused decoder: five kernels per layer, one CUDA graph per step
# ----------------------------------------------------------------------------------------------
class FusedDecoder:
    """Decode-only fast path built from a `Transformer` (whose caches and prefill it shares).

    Per layer: [RMSNorm + qkv GEMV] -> [RoPE + cache write + attention] -> [o GEMV + residual]
    -> [RMSNorm + gate/up GEMV + SiLU*up] -> [down GEMV + residual]. RMSNorm weights are folded
    into the next weight matrix (W' = W diag(g)), q/k/v and gate/up are concatenated, so each
    GEMV reads its weights once; `fmt` picks bf16, int8 or int4 storage for all of them."""

    @torch.no_grad()
    def __init__(self, model: Transformer, fmt: str, group: int = 128, quantize_lm_head: bool = True):
        D = model.args.head_dim
        if D < 32 or D & (D - 1):
            raise UserError(f"the fused attention kernel needs a power-of-two head dim >= 32, not {D}")
        self.model, self.fmt, self.args = model, fmt, model.args
        self.layers = []
        for layer in model.layers:
            a, f = layer.attention, layer.feed_forward
            g1, g2 = layer.attention_norm.weight.float(), layer.ffn_norm.weight.float()
            wqkv = torch.cat([a.wq.weight, a.wk.weight, a.wv.weight]).float() * g1  # (N_qkv, C)
            wgu = torch.cat([f.w_gate.weight, f.w_up.weight]).float() * g2          # (2F, C)
            self.layers.append({
                "qkv": self._make(wqkv, group), "o": self._make(a.wo.weight, group),
                "gate_up": self._make(wgu, group), "down": self._make(f.w_down.weight, group),
                "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads})
            del wqkv, wgu
        head = model.output.weight.float() * model.norm.weight.float()
        self.head = self._make(head, group) if quantize_lm_head else self._make(head, group, "bf16")
        del head
        self.embedding = model.tok_embeddings.weight.detach()  # (V, C), shared

    def _make(self, w: torch.Tensor, group: int, fmt: str | None = None) -> nn.Module:
        return make_linear(w, fmt or self.fmt, group)

    def linears(self) -> list[nn.Module]:
        return [lay[k] for lay in self.layers for k in ("qkv", "o", "gate_up", "down")] + [self.head]

    def weight_bytes(self) -> int:
        return sum(linear_bytes(m) for m in self.linears())

    def bind(self, batch: int) -> None:
        """Static buffers for one batch size: the step reads `tok`/`pos` and updates them in place."""
        a, dev, dt = self.args, self.embedding.device, self.embedding.dtype
        n_qkv = self.layers[0]["qkv"].out_features
        self.tok = torch.zeros(batch, dtype=torch.long, device=dev)              # (B,)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)                  # (1,)
        self.h = torch.empty(batch, a.dim, dtype=dt, device=dev)                 # (B, C) residual stream
        self.qkv = torch.empty(batch, n_qkv, dtype=dt, device=dev)               # (B, (H + 2Hkv) D)
        self.attn = torch.empty(batch, self.layers[0]["n_heads"] * a.head_dim, dtype=dt, device=dev)
        self.act = torch.empty(batch, self.layers[0]["down"].in_features, dtype=dt, device=dev)  # (B, F)
        self.logits = torch.empty(batch, self.head.out_features, dtype=torch.float32, device=dev)
        self.history = torch.zeros(batch, self.model.max_len, dtype=torch.long, device=dev)  # (B, S)
        for lay, layer in zip(self.layers, self.model.layers):  # share the prefill's caches
            lay["cache"] = layer.attention.kv_cache
        self.graph = None

    def tune(self, batch: int) -> dict[str, dict]:
        """Tune each distinct weight shape once (all layers share the shapes) and copy the choice."""
        chosen = {}
        first = self.layers[0]
        for key, rms, glu in (("qkv", True, False), ("o", False, False), ("gate_up", True, True),
                              ("down", False, False)):
            chosen[key] = tune_linear(first[key], batch, rms, glu)
            for lay in self.layers[1:]:
                lay[key]._tuned = dict(getattr(first[key], "_tuned", {}))
        chosen["head"] = tune_linear(self.head, batch, rms=True)
        return chosen

    # --8<-- [start:fused_step]
    @torch.no_grad()
    def step(self) -> None:
        """One decode step on the static buffers: tok (B,) at pos -> tok for pos + 1; pos += 1."""
        m, eps = self.model, self.args.norm_eps
        torch.index_select(self.embedding, 0, self.tok, out=self.h)              # (B, C)
        for lay in self.layers:
            fused_linear(self.h, lay["qkv"], out=self.qkv, rms=True, eps=eps)    # norm folded into W
            decode_attention(self.qkv, m.rope_cos, m.rope_sin, self.pos, lay["cache"],
                             self.attn, lay["n_heads"], lay["n_kv_heads"])
            fused_linear(self.attn, lay["o"], out=self.h, residual=self.h)       # h += attn Wo^T
            fused_linear(self.h, lay["gate_up"], out=self.act, rms=True, glu=True, eps=eps)  # (B, F)
            fused_linear(self.act, lay["down"], out=self.h, residual=self.h)     # h += act Wd^T
        fused_linear(self.h, self.head, out=self.logits, rms=True, eps=eps)      # (B, V) fp32
        torch.argmax(self.logits, dim=-1, out=self.tok)
        self.history.index_copy_(1, self.pos, self.tok.unsqueeze(1))          # token for pos + 1
        self.pos.add_(1)  # inside the graph: no host work between steps

    def capture(self) -> torch.cuda.CUDAGraph:
        """Warm up (compiles the kernels) on a side stream, then record one step as a CUDA graph;
        replaying it launches all ~5 x n_layers kernels with one call and no Python in between."""
        saved_tok, saved_pos = self.tok.clone(), self.pos.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()
        self.tok.copy_(saved_tok)
        self.pos.copy_(saved_pos)
        return self.graph
    # --8<-- [end:fused_step]


# ----------------------------------------------------------------------------------------------
# Models for the benchmark: a real checkpoint, or random weights in a real model's shape
# ----------------------------------------------------------------------------------------------
LLAMA3_8B = dict(  # Meta-Llama-3-8B's config.json, so no download is needed for speed measurements
    model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    bos_token_id=128000, eos_token_id=128001, hidden_act="silu",
)


def load_config(spec: str) -> Any:
    """`llama-3-8b`, a config.json path or a model folder -> transformers LlamaConfig."""
    from transformers import AutoConfig, LlamaConfig
    if spec == "llama-3-8b":
        cfg = dict(LLAMA3_8B)
        cfg.pop("model_type")
        return LlamaConfig(**cfg)
    path = Path(spec)
    if path.is_file():
        data = json.loads(path.read_text())
        if data.get("model_type") != "llama":
            raise UserError(f"{spec}: model_type {data.get('model_type')!r} is not 'llama'")
        data.pop("model_type")
        return LlamaConfig(**data)
    if path.is_dir():
        return AutoConfig.from_pretrained(path)
    raise UserError(f"--random-weights {spec}: not 'llama-3-8b', a config.json or a model folder")


@torch.no_grad()
def random_model(config: Any, device: str, dtype: torch.dtype, seed: int) -> Transformer:
    """Our decoder with N(0, 0.02) weights created directly on `device` (speed does not depend on
    weight values; no checkpoint is read)."""
    args = ModelArgs.from_hf_config(config)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Transformer(args)
    finally:
        torch.set_default_dtype(default)
    for name, p in model.named_parameters():
        if p.dim() == 2:
            p.normal_(0.0, 0.02)
    return model.eval()


def hf_from_model(model: Transformer, config: Any) -> nn.Module:
    """A transformers LlamaForCausalLM that shares our model's tensors (for the baseline)."""
    from transformers import LlamaForCausalLM
    device = model.tok_embeddings.weight.device
    with torch.device("meta"):
        hf = LlamaForCausalLM(config)
    ours = model.state_dict()
    state = {k: ours[hf_to_fast_name(k) if not (k == "lm_head.weight" and model.args.tie_embeddings)
                     else "tok_embeddings.weight"] for k in hf.state_dict()}
    hf.load_state_dict(state, assign=True, strict=True)
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config, device=device)  # non-persistent buffers
    if model.args.tie_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    return hf.eval()


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_bandwidth(device: torch.device, gib: float = 1.0, repeats: int = 20) -> float:
    """Device-to-device copy, bytes read + written per second (GB/s): the roofline's denominator."""
    n = int(gib * 2**30) // 2
    src = torch.randn(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(repeats + 3):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 2 / statistics.median(times) / 1e9


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, n: int = 8192, repeats: int = 10) -> float:
    """Rate of one large matrix product in the run's dtype: the ceiling for compute-bound prefill."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    times = []
    for i in range(repeats + 3):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e12


# --8<-- [start:roofline]
def plain_weight_bytes(model: Transformer) -> int:
    """Bytes of every weight a decode step of the layer-by-layer model reads (embedding excluded:
    a step reads one row of it per sequence)."""
    total = linear_bytes(model.output) + model.norm.weight.numel() * model.norm.weight.element_size()
    for layer in model.layers:
        for mod in (*layer.attention.children(), *layer.feed_forward.children(),
                    layer.attention_norm, layer.ffn_norm):
            if isinstance(mod, RMSNorm):
                total += mod.weight.numel() * mod.weight.element_size()
            elif not isinstance(mod, KVCache):
                total += linear_bytes(mod)
    return total


def step_bytes(weight_bytes: int, args: ModelArgs, batch: int, kv_len: float, elem: int) -> float:
    """Bytes read by one decode step: weights as stored + one embedding row per sequence + the KV
    cache up to the current length (K and V, every layer)."""
    embedding_rows = batch * args.dim * elem
    kv = batch * kv_len * args.n_layers * 2 * args.n_kv_heads * args.head_dim * elem
    return weight_bytes + embedding_rows + kv


def roofline_tokens_per_s(bytes_per_step: float, bandwidth_gbps: float, batch: int) -> float:
    """Upper bound when each step is a pure read of its bytes at the measured copy bandwidth."""
    return batch / (bytes_per_step / (bandwidth_gbps * 1e9))
# --8<-- [end:roofline]


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[float, Any]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


@torch.no_grad()
def run_hf_generate(hf: nn.Module, prompt: torch.Tensor, n_new: int, repeats: int) -> dict:
    """transformers `generate`, greedy; decode rate from (t(n) - t(1)) so the prompt is excluded."""
    device = prompt.device
    kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    gen = lambda n: hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kw)  # noqa: E731
    setup, _ = timed(device, lambda: gen(2))
    t1 = statistics.median(timed(device, lambda: gen(1))[0] for _ in range(repeats))
    runs = [timed(device, lambda: gen(n_new)) for _ in range(repeats)]
    tn = statistics.median(r[0] for r in runs)
    B = prompt.shape[0]
    return {"tokens_per_s": B * (n_new - 1) / max(tn - t1, 1e-9), "decode_s": tn - t1,
            "new_tokens": n_new - 1, "setup_s": setup, "tokens": runs[0][1]}


@torch.no_grad()
def run_loop(model: Transformer, step: Callable, prompt: torch.Tensor, n_new: int, repeats: int,
             warmup_steps: int) -> dict:
    """Prefill, then n_new decode steps through `step(token, input_pos)`; the warm-up (and with it
    any compilation) is timed separately as setup_s."""
    device = prompt.device
    B, T = prompt.shape
    model.setup_caches(B, T + n_new + 2)
    pos = torch.arange(T, device=device)

    def once() -> torch.Tensor:
        first = prefill(model, prompt, pos)
        sync(device)
        t0 = time.perf_counter()
        rest = decode_n_tokens(step, first, T, n_new)
        sync(device)
        return time.perf_counter() - t0, torch.cat([prompt, first, *rest], dim=1)

    setup, _ = timed(device, lambda: decode_n_tokens(step, prefill(model, prompt, pos), T, warmup_steps))
    runs = [once() for _ in range(repeats)]
    dt = statistics.median(r[0] for r in runs)
    return {"tokens_per_s": B * n_new / dt, "decode_s": dt, "new_tokens": n_new, "setup_s": setup,
            "tokens": runs[0][1]}


@torch.no_grad()
def run_fused(fused: FusedDecoder, prompt: torch.Tensor, n_new: int, repeats: int, tune: bool) -> dict:
    """Prefill with the layer-by-layer model (it shares the caches), then replay the step graph."""
    model, device = fused.model, prompt.device
    B, T = prompt.shape
    model.setup_caches(B, T + n_new + 2)
    t0 = time.perf_counter()
    fused.bind(B)
    configs = fused.tune(B) if tune else None
    pos = torch.arange(T, device=device)

    def start() -> torch.Tensor:
        first = prefill(model, prompt, pos)                  # (B, 1), token for position T
        fused.tok.copy_(first[:, 0])
        fused.pos.fill_(T)
        return first

    start()
    graph = fused.capture()
    setup = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        first = start()
        sync(device)
        t1 = time.perf_counter()
        for _ in range(n_new):
            graph.replay()  # one launch per token; tok, pos and history advance on the GPU
        sync(device)
        times.append(time.perf_counter() - t1)
    dt = statistics.median(times)
    tokens = torch.cat([prompt, first, fused.history[:, T:T + n_new]], dim=1)
    return {"tokens_per_s": B * n_new / dt, "decode_s": dt, "new_tokens": n_new, "setup_s": setup,
            "tokens": tokens,
            "launch_configs": configs}


def profile_fused(fused: FusedDecoder, start_pos: int, steps: int = 5) -> tuple[list[dict], float]:
    """torch.profiler over `steps` graph replays from `start_pos`: GPU time per kernel per step, and
    the summed kernel time per step (compare it with the step's wall time: the rest is gaps)."""
    from torch.profiler import ProfilerActivity, profile

    def collect(fn: Callable[[], None]) -> list:
        fused.pos.fill_(start_pos)  # the cache has room for `steps` more positions from here
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                fn()
            torch.cuda.synchronize()
        return [e for e in prof.key_averages() if e.self_device_time_total > 0]

    events = collect(fused.graph.replay)
    source = "graph replay"
    if not events:  # some profiler builds do not see kernels inside graphs: launch them directly
        events, source = collect(fused.step), "direct launches"
    total = sum(e.self_device_time_total for e in events)
    rows = [{"kernel": e.key[:90], "calls_per_step": e.count / steps,
             "us_per_step": e.self_device_time_total / steps,
             "share": e.self_device_time_total / total, "source": source}
            for e in sorted(events, key=lambda e: -e.self_device_time_total)]
    return rows, total / steps


@torch.no_grad()
def evaluate_quality(models: dict[str, Transformer], tokens: torch.Tensor, context: int) -> list[dict]:
    """Perplexity (with its standard error) on non-overlapping windows, and, against the first
    (unquantized) model on the same tokens: mean KL divergence and top-1 agreement."""
    names = list(models)
    nll: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    kl = {n: [] for n in names}
    agree = {n: [] for n in names}
    for start in range(0, tokens.numel() - 1, context):
        window = tokens[start:start + context + 1]
        if window.numel() < 2:
            break
        inp, target = window[:-1][None], window[1:]
        ref_logp = None
        for name in names:
            m = models[name]
            if m.max_len < inp.shape[1] or m.layers[0].attention.kv_cache.k.shape[0] != 1:
                m.setup_caches(1, context)
            logp = F.log_softmax(m(inp, torch.arange(inp.shape[1], device=inp.device))[0].float(), -1)
            nll[name].append(-logp.gather(1, target[:, None])[:, 0])
            if ref_logp is None:
                ref_logp = logp
            kl[name].append((ref_logp.exp() * (ref_logp - logp)).sum(-1))
            agree[name].append((logp.argmax(-1) == ref_logp.argmax(-1)).float())
    out = []
    for name in names:
        losses = torch.cat(nll[name]).double()
        mean, se = losses.mean().item(), (losses.std() / math.sqrt(losses.numel())).item()
        out.append({"variant": name, "tokens": losses.numel(), "ppl": math.exp(mean),
                    "ppl_se": math.exp(mean) * se, "kl_vs_unquantized": torch.cat(kl[name]).mean().item(),
                    "top1_agreement": torch.cat(agree[name]).mean().item()})
    return out


# ----------------------------------------------------------------------------------------------
# Results: table and chart written from the JSON
# ----------------------------------------------------------------------------------------------
def markdown_table(result: dict) -> str:
    decode = [r for r in result["runs"] if r["variant"] != "prefill"]
    eager = {r["batch_size"]: r["tokens_per_s"] for r in decode if r["variant"] == "eager"}
    lines = ["| variant | batch | decode tokens/s | × eager | bytes/step (GB) | achieved GB/s | "
             "roofline tokens/s | fraction of roofline | setup (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in decode:
        speed = f"{r['tokens_per_s'] / eager[r['batch_size']]:.2f}" if r["batch_size"] in eager else "–"
        name = f"**{r['variant']}** ({r['source']})" if "source" in r else r["variant"]
        lines.append(f"| {name} | {r['batch_size']} | {r['tokens_per_s']:.1f} | {speed} | "
                     f"{r['bytes_per_step'] / 1e9:.2f} | {r['achieved_gbps']:.0f} | "
                     f"{r['roofline_tokens_per_s']:.1f} | {r['roofline_fraction']:.2f} | {r.get('setup_s', 0):.1f} |")
    pre = [r for r in result["runs"] if r["variant"] == "prefill"]
    if pre:
        lines += ["", "| prefill | batch | prompt tokens | tokens/s | TFLOP/s | fraction of matmul peak |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in pre:
            lines.append(f"| {r['model_variant']} | {r['batch_size']} | {r['prompt_len']} | "
                         f"{r['tokens_per_s']:.0f} | {r['tflops']:.1f} | {r['roofline_fraction']:.2f} |")
    gemv = [r for r in decode if "source" not in r and r["batch_size"] == 1 and r.get("launch_configs")]
    if gemv:  # each weight shape timed alone (cold L2, do_bench median) while tuning, batch 1
        lines += ["", "| GEMV, batch 1 (tuning, each kernel alone) | " + " | ".join(r["variant"] for r in gemv) + " |",
                  "| --- |" + " ---: |" * len(gemv)]
        for key in gemv[0]["launch_configs"]:
            cells = []
            for r in gemv:
                c = r["launch_configs"][key]
                mb = c["us"] * c["weight_gbps"] / 1e3
                cells.append(f"{mb:.0f} MB, {c['us']:.1f} µs, {c['weight_gbps']:.0f} GB/s")
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
    if result.get("quality"):
        lines += ["", "| quality | tokens | perplexity | KL vs unquantized | top-1 agreement |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for q in result["quality"]:
            lines.append(f"| {q['variant']} | {q['tokens']} | {q['ppl']:.2f} ± {q['ppl_se']:.2f} | "
                         f"{q['kl_vs_unquantized']:.4f} | {q['top1_agreement']:.3f} |")
    head = (f"{result['model']} on {result['hardware']}; copy bandwidth {result['bandwidth_gbps']:.0f} GB/s "
            f"(read + write); prompt {result['prompt_len']} tokens; torch {result['versions']['torch']}; "
            f"{result['date'][:10]}. Command: `{result['command']}`")
    return head + "\n\n" + "\n".join(lines) + "\n"


def bar_chart(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decode = [r for r in result["runs"] if r["variant"] != "prefill" and "source" not in r]
    batches = sorted({r["batch_size"] for r in decode})
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2), squeeze=False)
    for ax, B in zip(axes[0], batches):
        rows = [r for r in decode if r["batch_size"] == B]
        names = [r["variant"] for r in rows]
        ax.bar(names, [r["tokens_per_s"] for r in rows], color="#4c72b0", label="measured")
        ax.scatter(names, [r["roofline_tokens_per_s"] for r in rows], marker="_", s=600, color="#c44e52",
                   zorder=3, label="roofline")
        for i, r in enumerate(rows):
            ax.text(i, r["tokens_per_s"], f"{r['roofline_fraction']:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"batch {B}")
        ax.set_ylabel("decode tokens/s")
        ax.tick_params(axis="x", rotation=40)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['model']} — {result['hardware']} (labels: fraction of roofline)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
ALL_VARIANTS = ["hf_generate", "eager", "eager_int8", "eager_int4", "compiled",
                "fused_bf16", "fused_int8", "fused_int4", "int4_tinygemm"]
CUDA_VARIANTS = {"compiled", "fused_bf16", "fused_int8", "fused_int4", "int4_tinygemm"}
ALIASES = {"bf16": "fused_bf16", "int8": "fused_int8", "int4": "fused_int4"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("Model")
    g.add_argument("--model", default="meta-llama/Meta-Llama-3-8B",
                   help="transformers Llama checkpoint: hub id or local folder (default: %(default)s)")
    g.add_argument("--random-weights", metavar="CONFIG",
                   help="instead of --model, random N(0, 0.02) weights built on the device in the shape of "
                        "CONFIG: 'llama-3-8b' (built in), a config.json or a model folder; speed only")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: cuda if available, else cpu")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="activation and weight dtype; auto: bfloat16 on CUDA, float32 on CPU")
    g.add_argument("--seed", type=int, default=0, help="seed for random weights and random prompts")
    g.add_argument("--threads", type=int, default=0, help="CPU threads for torch; 0 keeps torch's choice")
    m = p.add_argument_group("Method")
    m.add_argument("--variants", default="auto",
                   help="comma list of " + ", ".join(ALL_VARIANTS) + " (aliases bf16, int8, int4 = fused_*; "
                        "int4_tinygemm: the fused decoder with PyTorch's stock int4 kernel); "
                        "auto: all on CUDA except eager_int8/int4, hf_generate + eager + eager_int8 + eager_int4 on CPU")
    m.add_argument("--group-size", type=int, default=128, help="INT4 group size along the input dimension")
    m.add_argument("--quantize-lm-head", action=argparse.BooleanOptionalAction, default=True,
                   help="quantize the LM head too in the int8/int4 variants")
    m.add_argument("--tune", action=argparse.BooleanOptionalAction, default=True,
                   help="time the Triton launch configurations on the real shapes before capturing")
    b = p.add_argument_group("Benchmark")
    b.add_argument("--batch-sizes", default="1,8,32", help="comma list of batch sizes")
    b.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per sequence")
    b.add_argument("--new-tokens", type=int, default=256, help="decode steps timed for the fast variants")
    b.add_argument("--slow-new-tokens", type=int, default=32,
                   help="decode steps timed for hf_generate and the eager variants (steady rate, less time)")
    b.add_argument("--repeats", type=int, default=3,
                   help="timed repeats of the fast variants (compiled, fused_*); the median is reported")
    b.add_argument("--slow-repeats", type=int, default=1, help="timed repeats of hf_generate and the eager variants")
    b.add_argument("--profile", action="store_true",
                   help="profile one decode step of fused_bf16 (batch 1) and write <json stem>-profile.md")
    q = p.add_argument_group("Quality (real weights only)")
    q.add_argument("--ppl-tokens", type=int, default=1024, help="evaluation tokens for perplexity; 0 skips")
    q.add_argument("--ppl-context", type=int, default=256, help="window length for perplexity")
    o = p.add_argument_group("Output")
    o.add_argument("--json", metavar="PATH", help="write results JSON here, plus PATH.md table and PATH.png chart")
    o.add_argument("--quiet", action="store_true", help="no progress output")
    o.add_argument("--render", metavar="JSON", help="measure nothing: rebuild JSON's .md table, .png chart "
                   "and profile table from an existing results file")
    return p


def parse_variants(text: str, device: torch.device) -> list[str]:
    if text == "auto":
        if device.type == "cuda":
            return [v for v in ALL_VARIANTS if v not in ("eager_int8", "eager_int4")]
        return ["hf_generate", "eager", "eager_int8", "eager_int4"]
    variants = [ALIASES.get(v.strip(), v.strip()) for v in text.split(",") if v.strip()]
    for v in variants:
        if v not in ALL_VARIANTS:
            raise UserError(f"unknown variant {v!r}; choose from {', '.join(ALL_VARIANTS)}")
    return variants


def check_inputs(args: argparse.Namespace) -> tuple[torch.device, torch.dtype, list[str], list[int]]:
    """Every bad input is found here, before a model is loaded."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA GPU is visible; use --device cpu")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    variants = parse_variants(args.variants, device)
    for v in variants:
        if v in CUDA_VARIANTS - {"compiled"} and triton is None:
            raise UserError(f"variant {v} needs the triton package: pip install triton")
        if v in CUDA_VARIANTS and device.type != "cuda":
            raise UserError(f"variant {v} needs a CUDA GPU (torch.compile's CUDA graphs / Triton kernels); "
                            "on the CPU use hf_generate, eager, eager_int8, eager_int4")
        if v in CUDA_VARIANTS - {"compiled"} and dtype != torch.bfloat16:
            raise UserError(f"variant {v} runs in bfloat16; pass --dtype bfloat16")
    try:
        batches = [int(x) for x in args.batch_sizes.split(",")]
    except ValueError:
        raise UserError(f"--batch-sizes {args.batch_sizes!r} is not a comma list of integers") from None
    if any(b < 1 for b in batches) or args.prompt_len < 1 or args.new_tokens < 8 or args.slow_new_tokens < 2:
        raise UserError("batch sizes and --prompt-len must be >= 1, --new-tokens >= 8, --slow-new-tokens >= 2")
    G = args.group_size
    if any(v.endswith("int4") or v == "int4_tinygemm" for v in variants) and (G < 8 or G & (G - 1)):
        raise UserError(f"--group-size {G} is not a power of two >= 8 (the INT4 packing puts 8 weights in a word)")
    if "fused_int4" in variants and max(batches) > 1 and G < 128:
        raise UserError(f"fused_int4 with batch > 1 needs --group-size >= 128 (tensor-core strips of G/8 >= 16)")
    if not args.random_weights:
        folder = Path(args.model)
        if folder.is_dir():
            cfg_file = folder / "config.json"
            if not cfg_file.exists():
                raise UserError(f"{folder} has no config.json; pass a transformers model folder")
            model_type = json.loads(cfg_file.read_text()).get("model_type")
            if model_type != "llama":
                raise UserError(f"{folder}: model_type {model_type!r} is not 'llama'; "
                                "this decoder implements the Llama architecture only")
    return device, dtype, variants, batches


def pydoc_corpus() -> tuple[str, str]:
    """(calibration, evaluation) text from Python's pydoc topics, split at 40 % (never overlapping)."""
    from pydoc_data.topics import topics
    text = "\n\n".join(topics[key] for key in sorted(topics))
    cut = text.index("\n\n", int(len(text) * 0.4))
    return text[:cut], text[cut:]


def versions() -> dict[str, str]:
    import transformers
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__}
    if triton is not None:
        out["triton"] = triton.__version__
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def log(args: argparse.Namespace, msg: str) -> None:
    if not args.quiet:
        print(msg, file=sys.stderr, flush=True)


def prefill_flops(args: ModelArgs, batch: int, T: int) -> float:
    """2 x (weights touched per token) x tokens, plus causal attention (QK^T and PV)."""
    per_layer = args.dim * (args.n_heads + 2 * args.n_kv_heads) * args.head_dim \
        + args.n_heads * args.head_dim * args.dim + 3 * args.dim * args.ffn_dim
    linear = 2 * (args.n_layers * per_layer + args.dim * args.vocab_size) * batch * T
    attention = args.n_layers * 2 * 2 * batch * args.n_heads * args.head_dim * T * T / 2
    return linear + attention


def summarize(runs: list[dict]) -> list[dict]:
    """`bf16`, `int8`, `int4`: the fastest compiled variant of each precision at each batch size."""
    out = []
    for prec, names in (("bf16", ("compiled", "fused_bf16")), ("int8", ("fused_int8",)),
                        ("int4", ("fused_int4", "int4_tinygemm"))):
        for B in sorted({r["batch_size"] for r in runs}):
            cands = [r for r in runs if r["variant"] in names and r["batch_size"] == B]
            if cands:
                best = max(cands, key=lambda r: r["tokens_per_s"])
                out.append({**best, "variant": prec, "source": best["variant"]})
    return out


def tokens_match(a: torch.Tensor, b: torch.Tensor, start: int, eos: int | None) -> bool:
    """Generated parts equal, up to the shorter one and up to the first EOS of `a`."""
    n = min(a.shape[1], b.shape[1])
    ga, gb = a[:, start:n].cpu(), b[:, start:n].cpu()
    if eos is not None and (ga == eos).any():
        stop = int((ga == eos).float().argmax(dim=1).min())
        ga, gb = ga[:, :stop], gb[:, :stop]
    return bool(torch.equal(ga, gb))


@torch.no_grad()
def main(args: argparse.Namespace) -> dict:
    device, dtype, variants, batches = check_inputs(args)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    if args.quiet:
        hf_logging.disable_progress_bar()

    tokenizer = None
    t_load = time.perf_counter()
    if args.random_weights:
        config = load_config(args.random_weights)
        model = random_model(config, str(device), dtype, args.seed)
        hf = hf_from_model(model, config) if "hf_generate" in variants else None
        model_name = f"{args.random_weights} shape, random weights"
    else:
        try:
            hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
            tokenizer = AutoTokenizer.from_pretrained(args.model)
        except (OSError, ValueError) as error:
            raise UserError(f"cannot load {args.model}: {str(error).splitlines()[0]}") from None
        model = model_from_hf(hf)
        model_name = args.model
    margs = model.args
    if any(v.endswith("int4") or v == "int4_tinygemm" for v in variants):
        for width in (margs.dim, margs.ffn_dim, margs.n_heads * margs.head_dim):
            if width % args.group_size:
                raise UserError(f"--group-size {args.group_size} does not divide {width}; "
                                "pick a divisor of the hidden and MLP widths (64 works for SmolLM2)")
    log(args, f"model ready in {time.perf_counter() - t_load:.1f} s: {model_name}")

    torch.manual_seed(args.seed)
    T = args.prompt_len
    calibration, evaluation = pydoc_corpus()
    if tokenizer is not None:
        ids = torch.tensor(tokenizer(calibration[:50_000])["input_ids"][:T])
        if ids.numel() < T:
            raise UserError(f"--prompt-len {T} is longer than the prompt text ({ids.numel()} tokens)")
    else:
        ids = torch.randint(0, margs.vocab_size, (T,))
    ids = ids.to(device)
    cuda = device.type == "cuda"
    bandwidth = measure_bandwidth(device, 1.0 if cuda else 0.125, 20 if cuda else 5)
    tflops = measure_matmul_tflops(device, dtype, 8192 if cuda else 512, 10 if cuda else 3)
    log(args, f"copy bandwidth {bandwidth:.0f} GB/s, matmul {tflops:.2f} TFLOP/s")
    elem = torch.finfo(dtype).bits // 8
    eos = getattr(tokenizer, "eos_token_id", None)

    runs: list[dict] = []
    generated: dict[tuple[str, int], torch.Tensor] = {}
    profile_rows, kernel_us = None, None
    quantized: dict[str, Transformer] = {}
    errors: list[dict] = []

    def record(variant: str, B: int, res: dict, weight_bytes: int) -> dict:
        kv_len = T + (res["new_tokens"] + 1) / 2  # average cache length read over the timed steps
        nbytes = step_bytes(weight_bytes, margs, B, kv_len, elem)
        roof = roofline_tokens_per_s(nbytes, bandwidth, B)
        entry = {"variant": variant, "batch_size": B, "tokens_per_s": res["tokens_per_s"],
                 "roofline_fraction": res["tokens_per_s"] / roof, "roofline_tokens_per_s": roof,
                 "bytes_per_step": nbytes, "achieved_gbps": res["tokens_per_s"] / B * nbytes / 1e9,
                 "new_tokens": res["new_tokens"], "decode_s": res["decode_s"], "setup_s": res["setup_s"]}
        if res.get("launch_configs"):
            entry["launch_configs"] = res["launch_configs"]
            for key, c in res["launch_configs"].items():
                log(args, f"    {key:>8}: config {c['config']} {c['us']:.1f} us, {c['weight_gbps']:.0f} GB/s of weights")
        if "tokens" in res:
            generated[(variant, B)] = res["tokens"]
            ref = generated.get(("hf_generate", B))
            if ref is not None and variant in ("eager", "compiled", "fused_bf16") and not args.random_weights:
                entry["matches_hf_generate"] = tokens_match(ref, res["tokens"], T, eos)
        runs.append(entry)
        log(args, f"{variant:>11} batch {B:>3}: {entry['tokens_per_s']:8.1f} tokens/s, "
                  f"{entry['roofline_fraction']:.2f} of roofline, setup {entry['setup_s']:.1f} s")
        return entry

    def quantized_copy(fmt: str) -> Transformer:
        if fmt not in quantized:
            quantized[fmt] = quantize_model(copy.deepcopy(model), fmt, args.group_size, args.quantize_lm_head)
        return quantized[fmt]

    def run_variant(variant: str, B: int, prompt: torch.Tensor, fused: FusedDecoder | None,
                compiled_step: Callable | None) -> None:
        nonlocal profile_rows, kernel_us
        if variant == "hf_generate":
            res = run_hf_generate(hf, prompt, args.slow_new_tokens, args.slow_repeats)
            record(variant, B, res, plain_weight_bytes(model))
        elif variant in ("eager", "eager_int8", "eager_int4"):
            m = model if variant == "eager" else quantized_copy(variant.split("_")[1])
            step = lambda tok, pos, m=m: decode_one_token(m, tok, pos)  # noqa: E731
            res = run_loop(m, step, prompt, args.slow_new_tokens, args.slow_repeats, warmup_steps=2)
            record(variant, B, res, plain_weight_bytes(m))
        elif variant == "compiled":
            step = lambda tok, pos: compiled_step(model, tok, pos)  # noqa: E731
            res = run_loop(model, step, prompt, args.new_tokens, args.repeats, warmup_steps=3)
            record(variant, B, res, plain_weight_bytes(model))
        else:
            res = run_fused(fused, prompt, args.new_tokens, args.repeats, args.tune)
            entry = record(variant, B, res, fused.weight_bytes())
            if args.profile and variant == "fused_bf16" and B == batches[0]:
                profile_rows, kernel_us = profile_fused(fused, T + args.new_tokens // 2)
                entry["profile_kernel_us_per_step"] = kernel_us
                entry["profile_wall_us_per_step"] = 1e6 * res["decode_s"] / res["new_tokens"]

    for variant in variants:
        fused = None
        if variant.startswith("fused") or variant == "int4_tinygemm":
            fused = FusedDecoder(model, variant.removeprefix("fused_"), args.group_size, args.quantize_lm_head)
        compiled_step = None
        if variant == "compiled":
            compiled_step = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
        for B in batches:
            prompt = ids[None].expand(B, -1).contiguous()
            try:
                run_variant(variant, B, prompt, fused, compiled_step)
            except UserError:
                raise
            except Exception as error:  # e.g. a kernel the compiler rejects: report it, run the others
                line = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
                log(args, f"{variant} batch {B} failed: {line}")
                errors.append({"variant": variant, "batch_size": B, "error": line})
        del fused, compiled_step
        if args.json:  # a partial file after each variant, so a run cut short still leaves its numbers
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"partial": True, "runs": runs, "errors": errors}, indent=1))
        if variant == "hf_generate":
            hf = None if args.random_weights else hf
        if cuda:
            torch.cuda.empty_cache()

    for B in batches:  # prefill: compute-bound, reported against the measured matmul rate
        prompt = ids[None].expand(B, -1).contiguous()
        model.setup_caches(B, T + 2)
        pos = torch.arange(T, device=device)
        prefill(model, prompt, pos)
        t = statistics.median(timed(device, lambda: prefill(model, prompt, pos))[0] for _ in range(args.repeats))
        achieved = prefill_flops(margs, B, T) / t / 1e12
        runs.append({"variant": "prefill", "model_variant": f"eager {str(dtype).split('.')[-1]}",
                     "batch_size": B, "prompt_len": T, "tokens_per_s": B * T / t, "tflops": achieved,
                     "roofline_fraction": achieved / tflops})
    runs += summarize(runs)

    quality, quality_note = None, None
    qvariants = [v for v in variants if v.endswith("int8") or v.endswith("int4")]
    if args.random_weights:
        quality_note = "random weights: quality not measured (speed only)"
    elif args.ppl_tokens > 0 and qvariants:
        eval_ids = torch.tensor(tokenizer(evaluation[:200_000])["input_ids"][:args.ppl_tokens + 1], device=device)
        models = {"unquantized": model}
        for fmt in [f for f in ("int8", "int4") if any(v.endswith(f) for v in qvariants)]:
            models[f"{fmt} (group {args.group_size})" if fmt == "int4" else fmt] = quantized_copy(fmt)
        quality = evaluate_quality(models, eval_ids, args.ppl_context)

    result = {
        "script": "fast_decode.py", "hardware": hardware(device), "versions": versions(),
        "command": "python " + " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": model_name, "device": device.type, "dtype": str(dtype).split(".")[-1],
        "bandwidth_gbps": bandwidth, "matmul_tflops": tflops, "prompt_len": T,
        "new_tokens": args.new_tokens, "slow_new_tokens": args.slow_new_tokens, "repeats": args.repeats,
        "slow_repeats": args.slow_repeats,
        "group_size": args.group_size, "quantize_lm_head": args.quantize_lm_head,
        "weight_bytes_bf16_layers": plain_weight_bytes(model), "runs": runs,
        "quality": quality, "quality_note": quality_note, "profile": profile_rows, "errors": errors,
    }
    print(markdown_table(result))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        render(path)
    return result


def render(path: Path) -> None:
    """Write the table (.md), the chart (.png) and, if profiled, the profile table beside the JSON."""
    result = json.loads(path.read_text())
    path.with_suffix(".md").write_text(markdown_table(result))
    bar_chart(result, path.with_suffix(".png"))
    if result.get("profile"):
        path.with_name(path.stem + "-profile.md").write_text(profile_table(result))


def profile_table(result: dict) -> str:
    rows = result["profile"]
    entry = next(r for r in result["runs"] if "profile_kernel_us_per_step" in r)
    wall, busy = entry["profile_wall_us_per_step"], entry["profile_kernel_us_per_step"]
    lines = [f"One decode step of fused_bf16, batch {entry['batch_size']}: wall time {wall:.0f} µs, "
             f"kernel time {busy:.0f} µs ({busy / wall:.0%} busy; the rest is gaps between kernels).", "",
             "| kernel | calls per step | µs per step | share of kernel time |",
             "| --- | ---: | ---: | ---: |"]
    for r in rows[:12]:
        lines.append(f"| `{r['kernel']}` | {r['calls_per_step']:.0f} | {r['us_per_step']:.1f} | {r['share']:.1%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    cli = build_parser()
    try:
        cli_args = cli.parse_args()
        if cli_args.render:
            render(Path(cli_args.render))
        else:
            main(cli_args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
