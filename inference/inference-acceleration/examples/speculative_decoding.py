"""Speculative decoding from scratch: a cheap draft proposes k tokens, the target checks them at once.

Batch-1 decode reads every weight for one token; a forward over k + 1 tokens reads them once too.
A cheap draft guesses k tokens, the target scores all k + 1 positions in one forward, the longest
agreeing prefix is kept plus one target token, and the KV caches roll back past the first
rejection by moving a position pointer. Sampling stays exact with the modified rejection sampling
of Leviathan et al. / Chen et al. (2023): accept x with probability min(1, p(x) / q(x)), else
sample from norm(max(0, p - q)); greedy returns exactly the target's greedy tokens. Drafts: prompt
lookup, the same weights in INT4, early exit (half the layers), `--draft-model`; beside ours,
transformers' assisted generation. Timing, CUDA graphs, the 8B cost curve: bench/speculative.py.

Run it
  python inference/inference-acceleration/examples/speculative_decoding.py \\
      --model HuggingFaceTB/SmolLM2-135M-Instruct --new-tokens 24

What it prints on SmolLM2-135M (CPU, float32; about 30 s): per draft at k = 4 the acceptance rate
alpha, tokens per verify step, tokens/s, the speedup over plain decode and how many greedy tokens
equal plain decode (all: greedy speculative decoding is exact). The prompt asks for a rewrite.
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
import time
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

# Shapes: B batch, T tokens, S cache slots, H / Hkv heads, D head dim, C width, V vocabulary, N x K.

DEFAULT_PROMPT = ("Rewrite the following passage in your own words.\n\nThe KV cache stores the keys "
                  "and values of every token the model has already seen, so each new token only "
                  "computes its own keys and values. The cache grows with the context: two tensors "
                  "per layer, each of size heads times head dimension per token.")


class Refusal(Exception):
    """A run-time refusal: one line that names the problem and the fix (exit code 2)."""


# --8<-- [start:decoder]
class Attention(nn.Module):
    def __init__(self, c: Any):
        super().__init__()
        self.H, self.Hkv = c.num_attention_heads, c.num_key_value_heads
        self.D = c.head_dim
        self.wq = nn.Linear(c.hidden_size, self.H * self.D, bias=False)
        self.wk = nn.Linear(c.hidden_size, self.Hkv * self.D, bias=False)
        self.wv = nn.Linear(c.hidden_size, self.Hkv * self.D, bias=False)
        self.wo = nn.Linear(self.H * self.D, c.hidden_size, bias=False)
        self.k_cache = self.v_cache = None  # (1, Hkv, S, D) each: setup_caches

    def forward(self, x, cos, sin, mask, input_pos):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.H, self.D).transpose(1, 2)      # (B, H, T, D)
        k = self.wk(x).view(B, T, self.Hkv, self.D).transpose(1, 2)    # (B, Hkv, T, D)
        v = self.wv(x).view(B, T, self.Hkv, self.D).transpose(1, 2)
        h = self.D // 2  # RoPE: rotates (x_i, x_{i+D/2}) by position * freq_i
        q, k = (t * cos + torch.cat((-t[..., h:], t[..., :h]), -1) * sin for t in (q, k))
        self.k_cache.index_copy_(2, input_pos, k)  # in place (static); slots past
        self.v_cache.index_copy_(2, input_pos, v)  # input_pos: maybe rejected drafts
        k, v = self.k_cache, self.v_cache                               # (B, Hkv, S, D)
        if x.device.type == "cpu":  # the CPU's bf16 attention is slow for one query row
            q, k, v = q.float(), k.float(), v.float()  # (3x two rows); fp32 is fast
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1).to(x.dtype))  # (B, T, C)


class DecoderLayer(nn.Module):
    def __init__(self, c: Any):
        super().__init__()
        self.attention_norm = nn.RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attention = Attention(c)
        self.ffn_norm = nn.RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.w_gate = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.w_up = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.w_down = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, input_pos):
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, input_pos)
        g = self.ffn_norm(h)
        return h + self.w_down(F.silu(self.w_gate(g)) * self.w_up(g))            # SwiGLU


class Transformer(nn.Module):
    """A bias-free Llama decoder (Llama 2/3, SmolLM2) of a transformers LlamaConfig."""

    def __init__(self, c: Any):
        super().__init__()
        self.config, self.max_len = c, 0
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = nn.RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.output = nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    def setup_caches(self, max_len: int) -> None:
        """Batch-1 static caches, RoPE and causal-mask tables for `max_len` positions."""
        c, w, S = self.config, self.tok_embeddings.weight, max_len
        shape = (1, c.num_key_value_heads, S, c.head_dim)
        for a in (layer.attention for layer in self.layers):
            a.k_cache, a.v_cache = (w.new_zeros(shape) for _ in "kv")
        D, theta = c.head_dim, c.rope_parameters["rope_theta"]
        inv_freq = 1.0 / theta ** (torch.arange(0, D, 2).float() / D)   # (D/2,)
        freqs = torch.outer(torch.arange(S).float(), inv_freq)          # (S, D/2)
        emb = torch.cat((freqs, freqs), dim=-1).to(w.device)            # (S, D)
        self.rope_cos, self.rope_sin = emb.cos(), emb.sin()
        self.causal_mask = torch.ones(S, S, dtype=torch.bool, device=w.device).tril()
        self.max_len = S

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, n_layers=None):
        """tokens (1, T) at positions input_pos (T,) -> logits (1, T, V); fills caches.
        n_layers: only the first layers, then the final norm and LM head (early exit)."""
        x = self.tok_embeddings(tokens)                                 # (1, T, C)
        cos, sin = (t[input_pos].to(x.dtype) for t in (self.rope_cos, self.rope_sin))
        mask = self.causal_mask[input_pos]      # (T, S): t sees the slots <= input_pos[t]
        for layer in self.layers[:n_layers]:
            x = layer(x, cos, sin, mask, input_pos)
        return self.output(self.norm(x)).float()                        # (1, T, V)
# --8<-- [end:decoder]


RENAMES = [("model.embed_tokens", "tok_embeddings"), ("model.norm", "norm"), ("lm_head", "output"),
           ("model.layers", "layers"), ("self_attn.q_proj", "attention.wq"), ("mlp.up_proj", "w_up"),
           ("self_attn.k_proj", "attention.wk"), ("self_attn.v_proj", "attention.wv"),
           ("self_attn.o_proj", "attention.wo"), ("mlp.gate_proj", "w_gate"), ("mlp.down_proj", "w_down"),
           ("post_attention_layernorm", "ffn_norm"), ("input_layernorm", "attention_norm")]


def model_from_hf(hf: nn.Module) -> Transformer:
    """Our decoder sharing the tensors of a loaded transformers LlamaForCausalLM."""
    c = hf.config
    rope = dict(getattr(c, "rope_parameters", None) or {})
    if (c.model_type != "llama" or getattr(c, "attention_bias", False)
            or getattr(c, "mlp_bias", False) or c.hidden_act != "silu"
            or rope.get("rope_type", "default") != "default"):
        raise Refusal(f"{c.model_type!r} with RoPE {rope.get('rope_type')!r}: this decoder "
                      "implements bias-free Llama with plain RoPE (Llama 2/3, SmolLM2)")
    with torch.device("meta"):
        model = Transformer(c)
    state = {functools.reduce(lambda n, r: n.replace(*r), RENAMES, name): tensor
             for name, tensor in hf.state_dict().items()}
    state.setdefault("output.weight", state["tok_embeddings.weight"])  # tied LM head
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


# --8<-- [start:int4]
def quantize_int4(W: torch.Tensor, G: int):
    """Asymmetric round-to-nearest INT4 per group of G inputs: W (N, K) ≈ (q - z) s, with
    q (N, K) uint8 in [0, 15], scale and zero (integers) (N, K/G)."""
    N, K = W.shape
    Wg = W.float().reshape(N, K // G, G)                            # (N, K/G, G)
    lo, hi = Wg.amin(dim=2).clamp(max=0), Wg.amax(dim=2).clamp(min=0)
    scale = ((hi - lo) / 15).clamp(min=1e-8).bfloat16().float()  # as the kernel stores it
    zero = torch.round(-lo / scale).clamp(0, 15)
    q = (torch.round(Wg / scale[..., None]) + zero[..., None]).clamp(0, 15)
    return q.reshape(N, K).to(torch.uint8), scale, zero


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
    N, K = q.shape
    qg = q.float().reshape(N, scale.shape[1], -1)                   # (N, K/G, G)
    return ((qg - zero[..., None]) * scale[..., None]).reshape(N, K)


class Int4Linear(nn.Module):
    """INT4 weights run by PyTorch's W4A16 kernels (gpt-fast's "tinygemm"), a quarter of
    the bf16 bytes. Per group they compute (q - 8) s + m: m = (8 - z) s gives (q - z)s."""

    def __init__(self, W: torch.Tensor, G: int):
        super().__init__()
        N, K = W.shape
        q, s, z = quantize_int4(W, G)
        sz = torch.stack([s.t(), ((8 - z) * s).t()], dim=-1).bfloat16()  # (K/G, N, 2)
        if W.is_cuda:  # two codes a byte, even element high; K in tiles of 16
            tiles = 8 if K % 128 == 0 else 4 if K % 64 == 0 else 2
            pairs = (q[:, ::2] << 4 | q[:, 1::2]).contiguous()           # (N, K/2)
            packed = torch.ops.aten._convert_weight_to_int4pack(pairs, tiles)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 2)
        self.register_buffer("packed", packed)
        self.register_buffer("scales_and_zeros", sz)
        self.G, self.N, self.K = G, N, K

    def forward(self, x: torch.Tensor) -> torch.Tensor:          # (..., K) -> (..., N)
        x2 = x.reshape(-1, self.K).bfloat16()
        mm = (torch.ops.aten._weight_int4pack_mm if x.is_cuda
              else torch.ops.aten._weight_int4pack_mm_for_cpu)
        y = mm(x2, self.packed, self.G, self.scales_and_zeros)
        return y.view(*x.shape[:-1], self.N).to(x.dtype)
# --8<-- [end:int4]


@torch.no_grad()
def int4_copy(model: Transformer) -> Transformer:
    """The quantized self-draft: a copy with every linear in INT4, G = 128, 64 or 32 (SmolLM2: 64)."""
    widths = (model.config.hidden_size, model.config.intermediate_size)
    G = next((g for g in (128, 64, 32) if all(w % g == 0 for w in widths)), 0)
    if not G:
        raise Refusal(f"no INT4 group size in 128/64/32 divides the widths {widths}")
    draft = copy.deepcopy(model)
    for parent in [draft, *draft.layers, *(layer.attention for layer in draft.layers)]:
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int4Linear(child.weight, G))
    return draft


# --8<-- [start:drafts]
class PromptLookupDraft:
    """Copy from the context: find the latest earlier occurrence of the last n tokens
    (n = 3, 2, 1), propose the k tokens that followed it. Deterministic: q is one-hot."""
    name, max_ngram = "prompt lookup", 3

    def start(self, prompt: list[int]) -> None:  # nothing to prefill
        return

    def propose(self, tokens: list[int], k: int, temperature: float, gen):
        for n in range(min(self.max_ngram, len(tokens) - 1), 0, -1):
            tail = tokens[-n:]
            for i in range(len(tokens) - n - 1, -1, -1):            # latest match first
                if tokens[i:i + n] == tail:
                    return tokens[i + n:i + n + k], None
        return [], None


class ModelDraft:
    """A decoder as the draft: k cheap steps from its own cache. With `n_layers` it is the
    target's first layers (early exit), sharing the target's cache (`shares_cache`)."""

    def __init__(self, name: str, model: Transformer, n_layers: int | None = None,
                 shares_cache: bool = False):
        self.name, self.model, self.n_layers = name, model, n_layers
        self.shares_cache, self.pos = shares_cache, 0  # pos: tokens in the draft cache

    def start(self, prompt: list[int]) -> None:
        self.pos = len(prompt)
        if not self.shares_cache:  # a shared cache was filled by the target's prefill
            forward_at(self.model, prompt, 0, self.n_layers)

    def propose(self, tokens: list[int], k: int, temperature: float, gen):
        self.pos = min(self.pos, len(tokens) - 1)  # roll back past the first rejection
        drafted, q = [], []
        while len(drafted) < k:
            new = (tokens + drafted)[self.pos:]    # 1 token, 2 after a full acceptance
            logits = forward_at(self.model, new, self.pos, self.n_layers)[-1]   # (V,)
            self.pos += len(new)
            token, probs = pick(logits, temperature, gen)
            drafted.append(token)
            q.append(probs)
        return drafted, (torch.stack(q) if temperature > 0 else None)      # (k, V)
# --8<-- [end:drafts]


def forward_at(model: Transformer, tokens: list[int], start: int, n_layers=None):  # -> (T, V)
    device = model.tok_embeddings.weight.device
    ids = torch.tensor([tokens], device=device)                        # (1, T)
    return model(ids, torch.arange(start, start + len(tokens), device=device), n_layers)[0]


def pick(logits: torch.Tensor, temperature: float, gen) -> tuple[int, torch.Tensor | None]:
    """Greedy (temperature 0) or one sample from softmax(logits / temperature); logits (V,)."""
    if temperature == 0:
        return int(logits.argmax()), None
    probs = torch.softmax(logits / temperature, dim=-1)  # (V,)
    return int(torch.multinomial(probs, 1, generator=gen)), probs


# --8<-- [start:verify]
def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)): where the target wants more than the draft gave; (V,)."""
    r = (p - q).clamp(min=0)
    return r / r.sum()


def accept_greedy(target_logits: torch.Tensor, drafted: list[int]) -> list[int]:
    """Keep drafts while they equal the target's argmax, then add the target's next token.
    target_logits (k + 1, V) at the last accepted token and the k drafts."""
    best = target_logits.argmax(dim=-1).tolist()                    # (k + 1,)
    n = next((i for i, (d, b) in enumerate(zip(drafted, best)) if d != b), len(drafted))
    return drafted[:n] + [best[n]]


def accept_sampled(p: torch.Tensor, q: torch.Tensor, drafted: list[int], gen):
    """Modified rejection sampling: accept x_i with probability min(1, p_i(x_i)/q_i(x_i));
    at the first rejection sample from norm(max(0, p_i - q_i)); if all k pass, one more
    from p_k. p (k + 1, V) target, q (k, V) draft probabilities: the output follows p."""
    k = len(drafted)
    x = torch.tensor(drafted, dtype=torch.long, device=p.device)    # (k,)
    ratio = p[torch.arange(k), x] / q[torch.arange(k), x]           # (k,)
    u = torch.rand(k, generator=gen, device=p.device)
    for i in range(k):
        if u[i] >= ratio[i]:                                        # rejected
            fix = residual_distribution(p[i], q[i])
            return drafted[:i] + [int(torch.multinomial(fix, 1, generator=gen))]
    return drafted + [int(torch.multinomial(p[k], 1, generator=gen))]


@torch.no_grad()
def speculative_generate(target: Transformer, draft, prompt: list[int], max_new: int,
                         k: int, temperature: float = 0.0, gen=None):
    """Draft k, verify k + 1 positions in one target forward, keep accepted prefix + 1.
    draft None (or k = 0) is plain decode through the same loop. -> (new tokens, stats)"""
    if target.max_len < len(prompt) + max_new + k + 1:
        raise Refusal("the target's cache is too small: setup_caches(prompt+new+k+1)")
    tokens = prompt + [pick(forward_at(target, prompt, 0)[-1], temperature, gen)[0]]
    if draft is not None:
        draft.start(prompt)
    stats = {"verify_steps": 0, "drafted": 0, "accepted": 0}
    while len(tokens) - len(prompt) < max_new:
        budget = min(k, max_new - (len(tokens) - len(prompt)) - 1)
        drafted, q = ([], None) if draft is None or budget < 1 else \
            draft.propose(tokens, budget, temperature, gen)
        pos = len(tokens) - 1                  # the last token is not in the cache yet
        logits = forward_at(target, tokens[-1:] + drafted, pos)        # (k + 1, V)
        if temperature == 0:
            new = accept_greedy(logits, drafted)
        else:
            p = torch.softmax(logits / temperature, dim=-1)            # (k + 1, V)
            if q is None:                      # a deterministic draft: q is one-hot
                q = F.one_hot(torch.tensor(drafted, dtype=torch.long), p.shape[-1])
            new = accept_sampled(p, q.to(p), drafted, gen)
        tokens += new  # pointer now len(tokens) - 1: rejected slots are overwritten
        stats["verify_steps"] += 1  # by the next verify before any query sees them
        stats["drafted"] += len(drafted)
        stats["accepted"] += len(new) - 1
    stats["tokens_per_step"] = (max_new - 1) / (stats["verify_steps"] or 1)
    return tokens[len(prompt):], stats
# --8<-- [end:verify]


# --8<-- [start:library]
def transformers_generate(hf: nn.Module, prompt: list[int], max_new: int, k: int,
                          assistant: nn.Module | None = None, lookup: bool = False):
    """transformers' greedy generate: plain, with prompt lookup or with an assistant."""
    ids = torch.tensor([prompt], device=hf.device)
    extra = ({"prompt_lookup_num_tokens": k, "max_matching_ngram_size": 3} if lookup else
             {"assistant_model": assistant, "num_assistant_tokens": k,
              "num_assistant_tokens_schedule": "constant"} if assistant else {})
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                      min_new_tokens=max_new, do_sample=False, pad_token_id=0, **extra)
    return out[0, len(prompt):].tolist()


# vLLM takes the same drafts as one engine argument (ngram also runs on its CPU backend):
#   LLM(model=..., speculative_config={"method": "ngram", "num_speculative_tokens": 4,
#                                      "prompt_lookup_max": 3, "prompt_lookup_min": 1})
#   speculative_config={"model": "<small draft>", "num_speculative_tokens": 4}
#   EAGLE: {"method": "eagle", "model": "<EAGLE head>", "num_speculative_tokens": 4}
# --8<-- [end:library]


def load(name: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer, logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        hf = AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device).eval()
    except (OSError, ValueError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise Refusal(f"cannot load model {name!r} ({first}): pass a hub id or a local folder") from None
    return hf, tokenizer


def encode(tokenizer, text: str) -> list[int]:
    """The chat template where the tokenizer has one (instruct models), else the plain text."""
    if not tokenizer.chat_template:
        return tokenizer(text)["input_ids"]
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                              add_generation_prompt=True, return_dict=True)["input_ids"])


def build_drafts(target: Transformer, names: list[str], draft_hf: nn.Module | None) -> list:
    half = len(target.layers) // 2
    make = {"prompt-lookup": lambda: PromptLookupDraft(),
            "int4": lambda: ModelDraft("int4 self-draft", int4_copy(target)),
            "early-exit": lambda: ModelDraft(f"early exit ({half} layers)", target, half, True),
            "draft-model": lambda: ModelDraft("draft model", model_from_hf(draft_hf))}
    return [make[name]() for name in names]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="target: hub id or folder")
    p.add_argument("--draft-model", help="a smaller model with the same tokenizer, as one more draft")
    p.add_argument("--drafts", nargs="+", default=["prompt-lookup", "int4", "early-exit"],
                   choices=["prompt-lookup", "int4", "early-exit"], help="drafts to compare")
    p.add_argument("--k", type=int, default=4, help="tokens drafted per verify step")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: exact sampling")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt text (chat template applied)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda if there")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="float32: exact greedy")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    return p


@torch.no_grad()
def main(args: argparse.Namespace) -> list[dict]:
    if args.k < 1 or args.new_tokens < 1 or args.temperature < 0:
        build_parser().error("--k and --new-tokens must be at least 1, --temperature at least 0")
    if not args.prompt.strip():
        raise Refusal("the prompt is empty: pass --prompt with some text")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise Refusal("--device cuda was asked for but no CUDA GPU is visible: use --device cpu")
    auto, dtype = "cuda" if torch.cuda.is_available() else "cpu", getattr(torch, args.dtype)
    device = torch.device(auto if args.device == "auto" else args.device)
    hf, tokenizer = load(args.model, device, dtype)
    draft_hf = load(args.draft_model, device, dtype)[0] if args.draft_model else None
    target = model_from_hf(hf)
    drafts = build_drafts(target, args.drafts + (["draft-model"] if draft_hf else []), draft_hf)
    prompt, n, k, temp = encode(tokenizer, args.prompt), args.new_tokens, args.k, args.temperature
    for m in [target] + [d.model for d in drafts if isinstance(d, ModelDraft)]:
        m.setup_caches(len(prompt) + n + k + 1)
    runs = [("plain decode (ours)", lambda g: speculative_generate(target, None, prompt, n, 0, temp, g))]
    runs += [(d.name, lambda g, d=d: speculative_generate(target, d, prompt, n, k, temp, g)) for d in drafts]
    if temp == 0:  # the library's assisted generation, compared greedy
        runs += [(f"transformers {label}", lambda g, kw=kw: (transformers_generate(hf, prompt, n, k, **kw), {}))
                 for label, kw in [("generate", {}), ("prompt lookup", {"lookup": True})]
                 + ([("assistant_model", {"assistant": draft_hf})] if draft_hf else [])]
    rows = []
    for label, fn in runs:
        start = time.perf_counter()
        tokens, stats = fn(torch.Generator(device).manual_seed(args.seed))
        rows.append({"run": label, "tokens": tokens, "tokens_per_s": n / (time.perf_counter() - start), **stats})
    print(f"{args.model} on {device.type} ({args.dtype}); prompt {len(prompt)} tokens, {n} new, k = {k}")
    print(f"{'run':<30} {'alpha':>6} {'tok/step':>9} {'tokens/s':>9} {'speedup':>8}  same as plain")
    base = rows[0]  # plain decode
    for r in rows:
        same = next((i for i, (a, b) in enumerate(zip(r["tokens"], base["tokens"])) if a != b), n)
        alpha = f"{r['accepted'] / r['drafted']:.2f}" if r.get("drafted") else "-"
        per_step = f"{r['tokens_per_step']:.2f}" if "verify_steps" in r else "-"
        print(f"{r['run']:<30} {alpha:>6} {per_step:>9} {r['tokens_per_s']:>9.1f} "
              f"{r['tokens_per_s'] / base['tokens_per_s']:>7.2f}x  {same}/{n}")
    print("plain decode:", repr(tokenizer.decode(base["tokens"])))
    return rows


if __name__ == "__main__":
    try:
        main(build_parser().parse_args())
    except Refusal as why:
        print(f"error: {why}", file=sys.stderr)
        sys.exit(2)
