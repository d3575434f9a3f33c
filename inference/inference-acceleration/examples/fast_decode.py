"""Decode at the memory-bandwidth limit: a compact Llama decoder, a static KV cache, INT8 and INT4.

One decode step reads every weight once, so batch-1 decode is bound by bytes per step over memory
bandwidth. In gpt-fast's order: a compact Llama decoder loaded from transformers, with a static KV cache
(fixed shapes, so a CUDA graph can record a step); prefill, decode_one_token, decode_n_tokens, generate;
weight-only INT8 / INT4 as quantize_* / dequantize_* pairs, modules on PyTorch's own int8 and int4
("tinygemm") kernels, quantize_model; bytes per step (tokens/s -> GB/s); torch.compile on a GPU. Triton
kernels: decode_kernels.py; repeats, rooflines, plots, H200 runs: bench/fast_decode.py.

Run it
  python inference/inference-acceleration/examples/fast_decode.py --model HuggingFaceTB/SmolLM2-135M-Instruct \\
      --new-tokens 8

What it prints on SmolLM2-135M (CPU, float32, one thread; about 20 s): per variant decode tokens/s, MB read
per step, GB/s, and how many greedy tokens equal transformers' `generate` up to the first difference (eager:
all; INT8 and INT4 are other models and may drift: INT4 at group 64 changes the first token)."""

from __future__ import annotations

import argparse
import copy
import sys
import time
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

# Shape letters as in the glossary (B, T, H, Hkv, D, N, K, G, V), plus S cache slots and C model width.


class Refusal(Exception):
    """A run-time refusal: one line that names the problem and the fix (exit code 2)."""


# --8<-- [start:decoder]
def check_config(c: Any) -> Any:
    """A transformers LlamaConfig this decoder implements: bias-free Llama, plain RoPE."""
    rope = dict(getattr(c, "rope_parameters", None) or {})
    if (getattr(c, "model_type", None) != "llama" or getattr(c, "attention_bias", False)
            or getattr(c, "mlp_bias", False) or c.hidden_act != "silu"
            or rope.get("rope_type", "default") != "default"):
        found = f"{getattr(c, 'model_type', None)!r} with RoPE {rope.get('rope_type')!r}"
        raise Refusal(f"{found}: this decoder implements bias-free Llama with plain RoPE "
                      "(Llama 2/3, SmolLM2)")
    return c


class KVCache(nn.Module):
    """One layer's static KV cache: (B, Hkv, S, D), preallocated, written in place."""

    def __init__(self, shape: tuple[int, int, int, int], dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        for name in ("k", "v"):  # (B, Hkv, S, D) each
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device),
                                 persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k.index_copy_(2, input_pos, k)  # k: (B, Hkv, T, D) into (B, Hkv, S, D)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


def precompute_rope(c: Any, max_len: int, device: torch.device):
    """cos and sin tables (S, D) in fp32; the two halves repeat, as in transformers."""
    D, theta = c.head_dim, c.rope_parameters["rope_theta"]
    exponents = torch.arange(0, D, 2, dtype=torch.int64).float() / D            # (D/2,)
    inv_freq = 1.0 / (theta ** exponents)                                       # (D/2,)
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)   # (S, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)                                     # (S, D)
    return emb.cos().to(device), emb.sin().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D); cos, sin (T, D): rotates (x_i, x_{i+D/2}) by position * freq_i."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    """Grouped-query attention over the static cache: H query heads share Hkv KV heads."""

    def __init__(self, c: Any):
        super().__init__()
        self.H, self.Hkv = c.num_attention_heads, c.num_key_value_heads
        self.D = c.head_dim
        self.wq = nn.Linear(c.hidden_size, self.H * self.D, bias=False)
        self.wk = nn.Linear(c.hidden_size, self.Hkv * self.D, bias=False)
        self.wv = nn.Linear(c.hidden_size, self.Hkv * self.D, bias=False)
        self.wo = nn.Linear(self.H * self.D, c.hidden_size, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, input_pos):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.H, self.D).transpose(1, 2)      # (B, H, T, D)
        k = self.wk(x).view(B, T, self.Hkv, self.D).transpose(1, 2)    # (B, Hkv, T, D)
        v = self.wv(x).view(B, T, self.Hkv, self.D).transpose(1, 2)    # (B, Hkv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = self.kv_cache.update(input_pos, k, v)                    # (B, Hkv, S, D)
        # mask (T, S): position t sees slots <= input_pos[t]; empty slots stay masked
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           enable_gqa=True)             # (B, H, T, D)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.H * self.D))


class FeedForward(nn.Module):
    """SwiGLU MLP: w_down(silu(w_gate x) * w_up x)."""

    def __init__(self, c: Any):
        super().__init__()
        self.w_gate = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.w_up = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.w_down = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: Any):
        super().__init__()
        self.attention_norm = nn.RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attention = Attention(c)
        self.ffn_norm = nn.RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.feed_forward = FeedForward(c)

    def forward(self, x, cos, sin, mask, input_pos):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """The decoder a transformers LlamaConfig `c` describes (hidden_size is C, ...)."""

    def __init__(self, c: Any):
        super().__init__()
        self.config, self.max_len = check_config(c), 0
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = nn.RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.output = nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    def setup_caches(self, batch: int, max_len: int) -> None:
        """Allocate the static caches and the RoPE / causal-mask tables for `max_len`."""
        c, w = self.config, self.tok_embeddings.weight
        for layer in self.layers:  # (B, Hkv, S, D) each
            shape = (batch, c.num_key_value_heads, max_len, c.head_dim)
            layer.attention.kv_cache = KVCache(shape, w.dtype, w.device)
        self.rope_cos, self.rope_sin = precompute_rope(c, max_len, w.device)  # (S, D)
        ones = torch.ones(max_len, max_len, dtype=torch.bool, device=w.device)
        self.causal_mask = torch.tril(ones)                                   # (S, S)
        self.max_len = max_len

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) at input_pos (T,) -> logits (B, T, V); writes the KV cache."""
        x = self.tok_embeddings(tokens)                      # (B, T, C)
        cos = self.rope_cos[input_pos].to(x.dtype)           # (T, D)
        sin = self.rope_sin[input_pos].to(x.dtype)
        mask = self.causal_mask[input_pos]                   # (T, S)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos)
        return self.output(self.norm(x))                     # (B, T, V)
# --8<-- [end:decoder]


# transformers' LlamaForCausalLM names -> ours (the formulas' symbols)
RENAMES = [("model.embed_tokens", "tok_embeddings"), ("model.norm", "norm"), ("lm_head", "output"),
           ("model.layers", "layers"), ("self_attn.q_proj", "attention.wq"),
           ("self_attn.k_proj", "attention.wk"), ("self_attn.v_proj", "attention.wv"),
           ("self_attn.o_proj", "attention.wo"), ("mlp.gate_proj", "feed_forward.w_gate"),
           ("mlp.up_proj", "feed_forward.w_up"), ("mlp.down_proj", "feed_forward.w_down"),
           ("post_attention_layernorm", "ffn_norm"), ("input_layernorm", "attention_norm")]


def model_from_hf(hf_model: nn.Module, share_weights: bool = True) -> Transformer:
    """Our decoder on a loaded LlamaForCausalLM's device and dtype; share_weights: no second copy."""
    with torch.device("meta"):
        model = Transformer(hf_model.config)
    state = {}
    for name, tensor in hf_model.state_dict().items():
        for old, new in RENAMES:
            name = name.replace(old, new)
        state[name] = tensor if share_weights else tensor.clone()
    state.setdefault("output.weight", state["tok_embeddings.weight"])  # tied embeddings
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise Refusal(f"checkpoint does not fit the decoder (missing {missing[:2]}, "
                      f"unexpected {unexpected[:2]}): use a plain Llama checkpoint")
    if hf_model.config.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


# --8<-- [start:decode]
def prefill(model: nn.Module, tokens: torch.Tensor,
            input_pos: torch.Tensor) -> torch.Tensor:
    """Run the prompt (B, T) through the model, filling the cache -> next token (B, 1)."""
    logits = model(tokens, input_pos)                       # (B, T, V)
    return logits[:, -1].argmax(dim=-1, keepdim=True)       # greedy


def decode_one_token(model: nn.Module, token: torch.Tensor,
                     input_pos: torch.Tensor) -> torch.Tensor:
    """One decode step: token (B, 1) at input_pos (1,) -> next token (B, 1)."""
    logits = model(token, input_pos)                        # (B, 1, V)
    return logits[:, -1].argmax(dim=-1, keepdim=True)


def decode_n_tokens(step: Callable, token: torch.Tensor, start_pos: int,
                    n: int) -> list[torch.Tensor]:
    """Call `step(token, input_pos)` n times; positions are plain integers on the host."""
    out = []
    for i in range(n):
        input_pos = torch.tensor([start_pos + i], device=token.device)
        token = step(token, input_pos).clone()  # a CUDA graph reuses its output buffer
        out.append(token)
    return out


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int,
             step: Callable | None = None) -> torch.Tensor:
    """Greedy: prompt (B, T) -> (B, T + max_new_tokens); no early stop at EOS."""
    B, T = prompt.shape
    model.setup_caches(B, T + max_new_tokens)
    step = step or (lambda tok, pos: decode_one_token(model, tok, pos))
    first = prefill(model, prompt, torch.arange(T, device=prompt.device))
    rest = decode_n_tokens(step, first, T, max_new_tokens - 1)
    return torch.cat([prompt, first, *rest], dim=1)
# --8<-- [end:decode]


# --8<-- [start:int8]
def quantize_int8(W: torch.Tensor):
    """Symmetric per-channel INT8: scale = max|W_n,:| / 127, q = round(W / scale).

    W (N, K) -> q (N, K) int8 in [-127, 127], scale (N,) fp32, zero (N,) = 0."""
    W = W.float()
    scale = (W.abs().amax(dim=1) / 127).clamp(min=1e-10)                # (N,)
    q = torch.clamp(torch.round(W / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale, torch.zeros_like(scale)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor,
                    zero: torch.Tensor) -> torch.Tensor:
    return (q.float() - zero[:, None]) * scale[:, None]                 # (N, K)


class Int8Linear(nn.Module):
    """y = x W^T with W as INT8 codes + one fp32 scale per output row; x stays float."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        q, scale, _ = quantize_int8(weight)
        self.register_buffer("weight", q)                               # (N, K) int8
        self.register_buffer("scale", scale)                            # (N,) fp32
        self.out_features, self.in_features = q.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":  # CPU W8A16 kernel: bf16 activations (fp32 is slow)
            x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
            y = torch._weight_int8pack_mm(x2, self.weight, self.scale.to(torch.bfloat16))
            return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        # GPU (gpt-fast's form): torch.compile fuses the int8 -> bf16 cast into the matmul
        return F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
# --8<-- [end:int8]


# --8<-- [start:int4]
def quantize_int4(W: torch.Tensor, group: int):
    """Asymmetric group-wise INT4 along K: each run of G weights of a row has a scale s
    and an integer zero z; q = clamp(round(W / s) + z, 0, 15), W ≈ (q - z) s.

    W (N, K) -> q (N, K) uint8 in [0, 15]; scale, zero (N, K/G) bf16 (zero: integers)."""
    N, K = W.shape
    Wg = W.float().reshape(N, K // group, group)                         # (N, K/G, G)
    lo, hi = Wg.amin(dim=2).clamp(max=0), Wg.amax(dim=2).clamp(min=0)
    scale = ((hi - lo) / 15).clamp(min=1e-8).to(torch.bfloat16).float()  # bf16 as stored
    zero = torch.clamp(torch.round(-lo / scale), 0, 15)
    q = torch.clamp(torch.round(Wg / scale[..., None]) + zero[..., None], 0, 15)
    return (q.reshape(N, K).to(torch.uint8), scale.to(torch.bfloat16),
            zero.to(torch.bfloat16))


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor,
                    zero: torch.Tensor) -> torch.Tensor:
    N, K = q.shape
    G = K // scale.shape[1]
    qg = q.float().reshape(N, K // G, G)                                 # (N, K/G, G)
    return ((qg - zero.float()[..., None]) * scale.float()[..., None]).reshape(N, K)
# --8<-- [end:int4]


# --8<-- [start:tinygemm]
class Int4Linear(nn.Module):
    """INT4 weights for PyTorch's own W4A16 kernels ("tinygemm", gpt-fast's int4 path):
    CUDA's `_weight_int4pack_mm` and the CPU's `_weight_int4pack_mm_for_cpu`. Each packs
    the codes its own way (tiles for the tensor cores) and computes w = (q - 8) s + m per
    group, so our (q - z) s becomes m = (8 - z) s; scales and offsets are (K/G, N, 2)."""

    def __init__(self, weight: torch.Tensor, group: int):
        super().__init__()
        N, K = weight.shape
        q, scale, zero = quantize_int4(weight, group)  # (N, K), (N, K/G) x 2
        s, z = scale.float().t(), zero.float().t()                      # (K/G, N)
        sz = torch.stack([s, (8 - z) * s], dim=-1).to(torch.bfloat16)  # (K/G, N, 2)
        self.register_buffer("scales_and_zeros", sz)
        if weight.is_cuda:  # two codes per byte, even element in the high nibble
            tiles = 8 if K % 128 == 0 else 4 if K % 64 == 0 else 2  # inner k-tiles of 16
            pairs = (q[:, ::2] << 4 | q[:, 1::2]).contiguous()      # (N, K/2) uint8
            packed = torch.ops.aten._convert_weight_to_int4pack(pairs, tiles)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 2)
        self.register_buffer("packed", packed)
        self.group, self.out_features, self.in_features = group, N, K

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., K) -> (..., N)
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        packed, group, sz = self.packed, self.group, self.scales_and_zeros
        if x.is_cuda:
            y = torch.ops.aten._weight_int4pack_mm(x2, packed, group, sz)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, group, sz)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
# --8<-- [end:tinygemm]


@torch.no_grad()  # under no_grad: otherwise every scale keeps an fp32 copy of its weight alive
def quantize_model(model: Transformer, fmt: str, group: int) -> Transformer:
    """Swap every linear (layers and LM head) for Int8Linear / Int4Linear, in place."""
    for parent in [m for layer in model.layers for m in (layer.attention, layer.feed_forward)] + [model]:
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child.weight) if fmt == "int8"
                        else Int4Linear(child.weight, group))
    return model


# --8<-- [start:roofline]
def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights a decode step reads, as stored (codes, scales, zeros): the
    embedding table counts only if the LM head shares it (else a step reads one row)."""
    kinds = (nn.Linear, Int8Linear, Int4Linear, nn.RMSNorm)
    tensors = {id(t): t for m in model.modules() if isinstance(m, kinds)
               for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]}
    return sum(t.numel() * t.element_size() for t in tensors.values())  # each tensor once


def step_bytes(weights: int, c: Any, batch: int, kv_len: float, elem: int) -> float:
    """Bytes one decode step reads: weights as stored + one embedding row per sequence +
    the KV cache up to length L, K and V of every layer (B L layers 2 Hkv D elements)."""
    embedding_rows = batch * c.hidden_size * elem
    kv = (batch * kv_len * c.num_hidden_layers * 2 * c.num_key_value_heads
          * c.head_dim * elem)
    return weights + embedding_rows + kv  # roofline tokens/s = B * bandwidth / step_bytes
# --8<-- [end:roofline]


def decode_rate(gen: Callable[[int], torch.Tensor], n: int, device: torch.device):
    """Greedy tokens (1 + n new), decode tokens/s from time(1 + n) - time(1); warm-up (compile) first."""
    gen(2)
    times, outs = [], []
    for k in (n + 1, 1):
        start = time.perf_counter()
        outs.append(gen(k))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return outs[0], n / max(times[0] - times[1], 1e-9)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                        help="a Llama-architecture hub id or local transformers folder")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: cuda if available, else cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="weights and activations; auto: float32 on the CPU, bfloat16 on CUDA")
    parser.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128, 256],
                        help="INT4 group size G (INT8: per channel); 64 suits SmolLM2, 128 Llama-3-8B")
    parser.add_argument("--prompt", default="The capital of France is Paris. The capital of Germany is",
                        help="prompt text (greedy decoding)")
    parser.add_argument("--new-tokens", type=int, default=16, help="decode steps per variant")
    return parser


@torch.no_grad()
def main(args: argparse.Namespace) -> list[dict]:
    if args.new_tokens < 1:
        build_parser().error("--new-tokens must be at least 1")
    if not args.prompt.strip():
        raise Refusal("the prompt is empty: pass --prompt with some text")
    elif args.device == "cuda" and not torch.cuda.is_available():
        raise Refusal("--device cuda was asked for but no CUDA GPU is visible: use --device cpu")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    from transformers import AutoModelForCausalLM, AutoTokenizer, logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    except (OSError, ValueError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise Refusal(f"cannot load model {args.model!r} ({first}): pass a hub id or a local folder") from None
    model = model_from_hf(hf)
    c = model.config
    if c.hidden_size % args.group_size or c.intermediate_size % args.group_size:
        raise Refusal(f"--group-size {args.group_size} does not divide the widths {c.hidden_size}, "
                      f"{c.intermediate_size}: pick one that does (32 or 64 for SmolLM2)")
    prompt = tokenizer(args.prompt, return_tensors="pt")["input_ids"].to(device)   # (1, T)
    T, n, elem = prompt.shape[1], args.new_tokens, torch.finfo(dtype).bits // 8
    def hf_generate(new: int) -> torch.Tensor:
        return hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           attention_mask=torch.ones_like(prompt), pad_token_id=0)
    reference, rate = decode_rate(hf_generate, n, device)
    runs = [("hf_generate", model, reference, rate),
            ("eager", model, *decode_rate(lambda k: generate(model, prompt, k), n, device))]
    if device.type == "cuda":  # torch.compile + CUDA graphs (on the CPU: minutes of C++ builds)
        step = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)
        compiled = lambda k: generate(model, prompt, k, lambda t, p: step(model, t, p))  # noqa: E731
        runs.append(("compiled", model, *decode_rate(compiled, n, device)))
    for fmt in ("int8", "int4"):
        m = quantize_model(copy.deepcopy(model), fmt, args.group_size)
        runs.append((f"eager_{fmt}", m, *decode_rate(lambda k: generate(m, prompt, k), n, device)))
    print(f"{args.model} on {device.type} ({dtype}, {torch.get_num_threads()} threads); "
          f"prompt {T} tokens, {n} decoded; INT4 group {args.group_size}")
    print(f"{'variant':<12} {'tokens/s':>9} {'MB/step':>9} {'GB/s':>7}  same tokens as transformers")
    rows = []
    for variant, m, tokens, tokens_per_s in runs:
        nbytes = step_bytes(weight_bytes(m), c, 1, T + n / 2, elem)   # mean cache length
        same = int((tokens[0, T:] == reference[0, T:]).cumprod(0).sum())  # up to the first miss
        rows.append(dict(variant=variant, tokens_per_s=tokens_per_s, bytes_per_step=nbytes, same_tokens=same))
        print(f"{variant:<12} {tokens_per_s:>9.1f} {nbytes / 1e6:>9.1f} "
              f"{tokens_per_s * nbytes / 1e9:>7.2f}  {same}/{n + 1}")
    print("greedy:", repr(tokenizer.decode(reference[0, T:])))
    return rows


if __name__ == "__main__":
    try:
        main(build_parser().parse_args())
    except Refusal as why:
        print(f"error: {why}", file=sys.stderr)
        sys.exit(2)
