"""KV cache: the same greedy decode with and without a key/value cache, and what the cache costs.

What it shows
-------------
1. The KV memory formula `kv_bytes_per_token`: 2 x layers x Hkv x D x bytes per value, with
   grouped-query attention counted right (Hkv, the key/value heads, not H, the query heads).
2. A decode loop written out by hand on a real model's weights: every layer's keys K and values V
   are kept in explicit tensors and one row is appended per step. Without the cache every step
   recomputes the whole sequence, so step n costs O(n) tokens of work and N tokens cost O(N^2).
3. The library path: transformers' `generate(use_cache=True / False)`.
4. One comparison table: the four runs, their time, tokens/s and whether their greedy tokens equal
   the cached loop's; then the bytes our cache holds beside what the formula predicts.

Run it
------
    python inference/inference-acceleration/examples/kv_cache_optimization.py \\
        --model HuggingFaceTB/SmolLM2-135M-Instruct --max-new-tokens 16

What it prints on SmolLM2-135M-Instruct (CPU, float32, one thread; about 20 s): the greedy text
(" Paris. ..."), a table where both loops and both `generate` calls produce the same 16 tokens and
the runs without a cache are slower (the gap grows with the length: try --max-new-tokens 128), and
the cache's size: 46,080 bytes per token in float32 (2 x 30 layers x 3 KV heads x 64 x 4 bytes),
exactly what the formula says.
Timing against context length, the KV memory of real models, plots: bench/kv_cache.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# Shape letters: B batch, T tokens, H query heads, Hkv KV heads, D head dim, C model width,
# V vocabulary.


class Refusal(Exception):
    """A run-time refusal: one line that names the problem and the fix (exit code 2)."""


# ---------------------------------------------------------------------------------------------
# Part 1: the KV memory formula
# ---------------------------------------------------------------------------------------------

# --8<-- [start:kv_bytes]
def kv_bytes_per_token(config, bytes_per_value: float = 2) -> int:
    """Bytes of KV cache one token occupies in one sequence.

        bytes_per_token = 2 (K and V) x layers x Hkv x D x bytes_per_value

    Hkv is the number of *key/value* heads. With grouped-query attention (GQA)
    several query heads share one K/V head, so Hkv is smaller than the number of
    attention heads H (Llama-3-8B: H = 32, Hkv = 8). Using H instead of Hkv
    overstates the cache by H / Hkv.

    `config` is a transformers config or a tuple (layers, Hkv, D). Not covered:
    sliding-window layers (they keep only the last W positions), multi-head latent
    attention (MLA stores one compressed vector per layer), and the scales a
    quantized KV cache stores beside its values.

    An outside figure: vLLM's CPU backend reports 93,184 tokens for a 2 GiB KV
    pool on SmolLM2-135M in bf16: 728 blocks of 128 = floor(2 GiB / (128 x 23,040 B)).
    """
    if isinstance(config, tuple):
        layers, kv_heads, head_dim = config
    else:
        c = config.get_text_config() if hasattr(config, "get_text_config") else config
        layers, heads = c.num_hidden_layers, c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or heads  # no field: plain MHA
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return int(2 * layers * kv_heads * head_dim * bytes_per_value)


def kv_cache_bytes(config, tokens: int, batch: int = 1, bytes_per_value: float = 2):
    """Whole cache: bytes_per_token x context length x batch (one cache per sequence)."""
    return kv_bytes_per_token(config, bytes_per_value) * tokens * batch
# --8<-- [end:kv_bytes]


# ---------------------------------------------------------------------------------------------
# Part 2: the decode loop, written out, with an explicit per-layer KV cache
# ---------------------------------------------------------------------------------------------

LayerKV = tuple[torch.Tensor, torch.Tensor]  # (K, V), each (B, Hkv, T, D)
KVCache = list[LayerKV]  # one entry per layer


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension, as Llama's RoPE expects."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


# --8<-- [start:attention_step]
def attention_with_cache(attn: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor,
                         past: LayerKV | None) -> tuple[torch.Tensor, LayerKV]:
    """One attention sub-layer that appends this step's keys and values to its cache.

        Q = x W_q,  K_new = x W_k,  V_new = x W_v           (RoPE applied to Q and K_new)
        K = concat(K_past, K_new),  V = concat(V_past, V_new)
        out = softmax(Q K^T / sqrt(D) + causal mask) V W_o

    x: (B, T, C) holds only the *new* tokens (T = prompt length at prefill, 1 when
    decoding). past: the (K, V) of every earlier position, or None. Returns the
    output and the grown cache.
    """
    B, T, _ = x.shape
    D = attn.head_dim
    q = attn.q_proj(x).view(B, T, -1, D).transpose(1, 2)  # (B, H, T, D)
    k = attn.k_proj(x).view(B, T, -1, D).transpose(1, 2)  # (B, Hkv, T, D)
    v = attn.v_proj(x).view(B, T, -1, D).transpose(1, 2)  # (B, Hkv, T, D)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D): same for every head
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    if past is not None:  # the cache: earlier keys and values are never recomputed
        k = torch.cat([past[0], k], dim=2)  # (B, Hkv, T_past + T, D)
        v = torch.cat([past[1], v], dim=2)  # (B, Hkv, T_past + T, D)
    T_all = k.shape[2]
    mask = None
    if T > 1 and T_all > T:  # new tokens after a cached prefix: causal with an offset
        mask = torch.ones(T, T_all, dtype=torch.bool, device=x.device).tril(T_all - T)
    # enable_gqa: H query heads share the Hkv K/V heads in groups of H / Hkv (no copies).
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                         is_causal=(T > 1 and mask is None),
                                         enable_gqa=True)  # (B, H, T, D)
    out = out.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*D)
    return attn.o_proj(out), (k, v)
# --8<-- [end:attention_step]


def check_llama_style(model: torch.nn.Module) -> None:
    """The hand-written forward reads Llama-style module names; refuse other models up front."""
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, name)
                                for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
        raise Refusal(f"{type(model).__name__} is not a Llama-style model: the hand-written loop "
                      "supports Llama, Qwen2, Mistral and SmolLM2 checkpoints")


# --8<-- [start:forward]
@torch.no_grad()
def forward(model: torch.nn.Module, input_ids: torch.Tensor, start: int,
            cache: KVCache | None) -> tuple[torch.Tensor, KVCache]:
    """Run the new tokens `input_ids` (B, T) at positions start..start+T-1.

    With `cache` (one (K, V) per layer, or [] before the prompt) only the new tokens
    are computed and each layer's cache grows by T rows. With `cache=None` nothing is
    kept: the caller must pass the whole sequence every step. Returns the last
    position's logits (B, V) and the cache.
    """
    inner = model.model
    x = inner.embed_tokens(input_ids)  # (B, T, C)
    T = input_ids.shape[1]
    positions = torch.arange(start, start + T, device=input_ids.device)[None]  # (1, T)
    cos, sin = inner.rotary_emb(x, positions)  # (1, T, D) each
    new_cache: KVCache = []
    for i, layer in enumerate(inner.layers):
        past = cache[i] if cache else None
        h, kv = attention_with_cache(layer.self_attn, layer.input_layernorm(x),
                                     cos, sin, past)
        x = x + h
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        new_cache.append(kv)
    logits = model.lm_head(inner.norm(x[:, -1:]))  # (B, 1, V): only the next token
    return logits[:, -1].float(), new_cache
# --8<-- [end:forward]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --8<-- [start:decode_loops]
def greedy_with_cache(model: torch.nn.Module, prompt: torch.Tensor, max_new_tokens: int,
                      stop_ids: set[int]) -> tuple[list[int], list[float], KVCache]:
    """Prefill once, then feed one token per step: each step's work is O(current length).

    Returns the tokens, the seconds of each step (the first one includes the
    prefill) and the final cache."""
    tokens, seconds = [], []
    t0 = time.perf_counter()
    logits, cache = forward(model, prompt, start=0, cache=[])  # prefill: the whole prompt
    for step in range(max_new_tokens):
        token = logits.argmax(dim=-1, keepdim=True)  # (1, 1)
        synchronize(prompt.device)
        seconds.append(time.perf_counter() - t0)
        tokens.append(int(token))
        if tokens[-1] in stop_ids or step == max_new_tokens - 1:
            break
        t0 = time.perf_counter()
        logits, cache = forward(model, token, start=prompt.shape[1] + step, cache=cache)
    return tokens, seconds, cache


def greedy_without_cache(model: torch.nn.Module, prompt: torch.Tensor,
                         max_new_tokens: int,
                         stop_ids: set[int]) -> tuple[list[int], list[float]]:
    """Recompute the whole sequence for every new token: step n costs O(n) work."""
    tokens, seconds = [], []
    seq = prompt  # (1, T)
    for _ in range(max_new_tokens):
        t0 = time.perf_counter()
        logits, _ = forward(model, seq, start=0, cache=None)  # every position, every step
        token = logits.argmax(dim=-1, keepdim=True)  # (1, 1)
        synchronize(prompt.device)
        seconds.append(time.perf_counter() - t0)
        tokens.append(int(token))
        if tokens[-1] in stop_ids:
            break
        seq = torch.cat([seq, token], dim=1)  # (1, T + 1)
    return tokens, seconds
# --8<-- [end:decode_loops]


def cache_bytes(cache: KVCache) -> int:
    """Bytes the cache's tensors actually hold (K and V of every layer)."""
    return sum(t.numel() * t.element_size() for kv in cache for t in kv)


# ---------------------------------------------------------------------------------------------
# Part 3: the library path, transformers' generate
# ---------------------------------------------------------------------------------------------

# --8<-- [start:library]
@torch.no_grad()
def generate_tokens(model: torch.nn.Module, prompt: torch.Tensor, max_new_tokens: int,
                    use_cache: bool) -> list[int]:
    """transformers' own loop; `use_cache=False` recomputes the whole sequence."""
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                         max_new_tokens=max_new_tokens, use_cache=use_cache)
    return out[0, prompt.shape[1]:].tolist()
# --8<-- [end:library]


def stop_token_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    """The tokens that end a generation: generate() reads them from the generation config."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    return set(ids) if isinstance(ids, (list, tuple)) else ({ids} if ids is not None else set())


def load(model_name: str, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer) from a hub id or a local folder, or a Refusal naming the fix."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    looks_local = model_name.startswith((".", "/", "~")) or model_name.count("/") > 1
    if looks_local and not Path(model_name).expanduser().is_dir():
        raise Refusal(f"no model folder at {model_name!r}: pass a local transformers folder or "
                      "a hub id with --model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name)
        model = AutoModelForCausalLM.from_pretrained(model_name, dtype=dtype)
    except (OSError, ValueError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise Refusal(f"cannot load model {model_name!r} ({first}): pass a local folder or a "
                      "hub id with --model") from None
    check_llama_style(model)
    return model.to(device).eval(), tokenizer


def encode_prompt(tokenizer, text: str, chat: bool, device: torch.device) -> torch.Tensor:
    """The prompt's ids (1, T); inside the chat template if asked (instruct models answer at length)."""
    if not text.strip():
        raise Refusal("the prompt is empty: pass --prompt with some text")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise Refusal("this tokenizer has no chat template: drop --chat")
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt", add_special_tokens=not chat).input_ids.to(device)


def comparison(model, tokenizer, prompt: torch.Tensor, max_new_tokens: int) -> dict:
    """The four runs, each timed once; tokens of every run beside the cached loop's."""
    device = prompt.device
    stop = stop_token_ids(model, tokenizer)
    forward(model, prompt, start=0, cache=[])  # warm-up: the first call allocates, picks kernels
    cached, step_s, cache = greedy_with_cache(model, prompt, max_new_tokens, stop)
    plain, plain_s = greedy_without_cache(model, prompt, max_new_tokens, stop)
    runs = {"our loop, with cache": (cached, sum(step_s)),
            "our loop, without cache": (plain, sum(plain_s))}
    for use_cache in (True, False):
        synchronize(device)
        t0 = time.perf_counter()
        tokens = generate_tokens(model, prompt, max_new_tokens, use_cache)
        synchronize(device)
        runs[f"generate(use_cache={use_cache})"] = (tokens, time.perf_counter() - t0)
    return {"runs": runs, "reference": cached, "cache": cache, "prompt_tokens": prompt.shape[1],
            "step_seconds_cache": step_s, "step_seconds_no_cache": plain_s}


def print_table(result: dict, model, dtype: torch.dtype, tokenizer) -> None:
    reference = result["reference"]
    print(f"greedy text: {tokenizer.decode(reference)!r}")
    print(f"\n{'run':<26} {'tokens':>6} {'seconds':>8} {'tokens/s':>9}  same tokens as cached loop")
    for name, (tokens, seconds) in result["runs"].items():
        print(f"{name:<26} {len(tokens):>6} {seconds:>8.2f} {len(tokens) / seconds:>9.1f}  "
              f"{tokens == reference}")
    T = result["prompt_tokens"] + len(reference) - 1  # the last token is sampled, never cached
    elem = torch.finfo(dtype).bits // 8
    per_token = kv_bytes_per_token(model.config, elem)
    print(f"\nKV cache after {T} positions: our tensors hold {cache_bytes(result['cache']):,} bytes;"
          f" formula {per_token:,} B/token x {T} = {per_token * T:,} bytes "
          f"({str(dtype).removeprefix('torch.')})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                        help="hub id or local folder of a Llama-style model")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto = cuda if available, else cpu")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="weights and activations; auto = float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--prompt", default="The capital of France is",
                        help="prompt of the greedy decode")
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument("--max-new-tokens", type=int, default=32,
                        help="tokens generated by each of the four runs")
    return parser


def main(args: argparse.Namespace) -> dict:
    if args.max_new_tokens < 1:
        build_parser().error("--max-new-tokens must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise Refusal("--device cuda was asked for but no CUDA GPU is visible: use --device cpu")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model, tokenizer = load(args.model, device, dtype)
    prompt = encode_prompt(tokenizer, args.prompt, args.chat, device)  # (1, T)
    print(f"{args.model} on {device.type} ({str(dtype).removeprefix('torch.')}, "
          f"{torch.get_num_threads()} threads); prompt of {prompt.shape[1]} tokens")
    result = comparison(model, tokenizer, prompt, args.max_new_tokens)
    print_table(result, model, dtype, tokenizer)
    return result


if __name__ == "__main__":
    try:
        main(build_parser().parse_args())
    except Refusal as why:
        print(f"error: {why}", file=sys.stderr)
        sys.exit(2)
