"""KV cache: the same greedy decode with and without a key/value cache, and what the cache costs.

What it shows
-------------
1. A decode loop written out by hand on a real model's weights (SmolLM2-135M-Instruct by default):
   every layer's keys K and values V are kept in explicit tensors and one new row is appended per
   step. Without the cache every step recomputes the whole sequence. Both loops, and transformers'
   `generate(use_cache=True/False)`, must produce identical greedy tokens.
2. Time per token against position: with the cache a step processes 1 token and reads n cached
   rows (O(n) work); without it a step processes all n tokens again (O(n^2) attention, O(n)
   matmuls), so a whole generation of N tokens costs O(N^2) instead of O(N).
3. The KV memory calculator `kv_bytes_per_token`: 2 x layers x KV heads x head dim x bytes, with
   grouped-query attention counted right, as a table for real models beside the common mistake of
   using the number of attention heads.

With `--random-weights llama-3-8b` the model is built from Llama-3-8B's configuration with random
weights directly on the device (nothing is downloaded); speed does not depend on weight values, so
this measures the cache on a real-size shape. Greedy tokens are not compared in that mode: random
logits are almost flat, and bf16 rounding differs between the two paths.

Run it
------
    python inference/inference-acceleration/examples/kv_cache_optimization.py \\
        --model .cache/models/SmolLM2-135M-Instruct --max-new-tokens 64 --lengths 64,256,1024

On the small model on 2 CPU cores it prints the tokens of both loops (identical), a table of
milliseconds per token by position (the no-cache column grows with the position, the cached one
hardly moves), the per-length sweep and the KV memory table (Llama-3-8B: 131,072 bytes per token
in bf16; counting attention heads instead of KV heads would say 524,288).

`--json PATH` writes the results, and beside it PATH's stem with `.md` (tables), `.png` (plot) and
`-kv-memory.md` (the calculator's table). Other examples of this folder (the vLLM one) import
`kv_bytes_per_token` from here (the script's folder is on `sys.path` when a script of it runs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.nn.functional as F

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

# Bytes per stored K or V element. fp8 and int4 are the quantized KV caches some engines offer
# (int4 ignores the scales stored beside the values).
DTYPE_BYTES: dict[str, float] = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1, "int4": 0.5}


def fail(message: str) -> NoReturn:
    """Bad input ends with one line on stderr and exit code 2, never a traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


# ---------------------------------------------------------------------------------------------
# Part 1: the KV memory calculator (no torch needed)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KVShape:
    """The numbers the KV cache depends on (attention heads only to show the classic mistake)."""

    name: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    note: str = ""


# Published configurations (config.json of each model on the Hugging Face hub).
KNOWN_SHAPES: list[KVShape] = [
    KVShape("SmolLM2-135M", 30, 9, 3, 64, "GQA 3:1"),
    KVShape("Llama-2-7B", 32, 32, 32, 128, "MHA: every head keeps its own K/V"),
    KVShape("Llama-3-8B", 32, 32, 8, 128, "GQA 4:1"),
    KVShape("Llama-3-70B", 80, 64, 8, 128, "GQA 8:1"),
    KVShape("Qwen2.5-7B", 28, 28, 4, 128, "GQA 7:1"),
    KVShape("Qwen2.5-72B", 80, 64, 8, 128, "GQA 8:1"),
    KVShape("Mistral-7B-v0.1", 32, 32, 8, 128, "sliding window 4096: stores at most 4096 positions"),
    KVShape("Gemma-2-9B", 42, 16, 8, 256, "every other layer has a 4096 sliding window"),
]


def _shape_numbers(config_or_numbers: Any) -> tuple[int, int, int]:
    """Return (layers, kv_heads, head_dim) from a KVShape, a transformers config, a dict or a tuple."""
    if isinstance(config_or_numbers, KVShape):
        s = config_or_numbers
        return s.layers, s.kv_heads, s.head_dim
    if isinstance(config_or_numbers, Sequence) and not isinstance(config_or_numbers, str):
        layers, kv_heads, head_dim = config_or_numbers
        return int(layers), int(kv_heads), int(head_dim)
    cfg = config_or_numbers
    if hasattr(cfg, "get_text_config"):  # multimodal configs keep the language model's numbers inside
        cfg = cfg.get_text_config()
    get = cfg.get if isinstance(cfg, Mapping) else (lambda key, default=None: getattr(cfg, key, default))
    layers = get("num_hidden_layers")
    heads = get("num_attention_heads")
    kv_heads = get("num_key_value_heads") or heads  # configs without the field are plain MHA
    head_dim = get("head_dim") or get("hidden_size") // heads
    return int(layers), int(kv_heads), int(head_dim)


# --8<-- [start:kv_bytes]
def kv_bytes_per_token(config_or_numbers: Any, bytes_per_value: float = 2) -> int:
    """Bytes of KV cache one token occupies in one sequence.

        bytes_per_token = 2 (K and V) x layers x Hkv x D x bytes_per_value

    Hkv is the number of *key/value* heads. With grouped-query attention (GQA) several query heads
    share one K/V head, so Hkv is smaller than the number of attention heads H (Llama-3-8B: H = 32,
    Hkv = 8). Using H instead of Hkv overstates the cache by H / Hkv (4x to 8x on Llama-3 models).

    `config_or_numbers` is a transformers config (or its dict), a `KVShape`, or a tuple
    (layers, Hkv, D). Not covered: sliding-window layers (they keep only the last W positions),
    multi-head latent attention (MLA stores one compressed vector per layer instead of K and V),
    and the scales a quantized KV cache stores beside its values.
    """
    layers, kv_heads, head_dim = _shape_numbers(config_or_numbers)
    return int(2 * layers * kv_heads * head_dim * bytes_per_value)


def kv_cache_bytes(config_or_numbers: Any, tokens: int, batch: int = 1, bytes_per_value: float = 2) -> int:
    """Whole cache: bytes_per_token x context length x batch size (every sequence keeps its own)."""
    return kv_bytes_per_token(config_or_numbers, bytes_per_value) * tokens * batch
# --8<-- [end:kv_bytes]


# (batch B, context T) pairs of the table: one long chat, a long document, a full 128k window, and two serving loads.
MEMORY_SETTINGS: list[tuple[int, int]] = [(1, 4096), (1, 32768), (1, 131072), (32, 2048), (64, 8192)]


def memory_table(shapes: list[KVShape], bytes_per_value: float = 2) -> list[dict[str, Any]]:
    """One row per model: bytes per token (right and wrong) and GiB for a few (batch, context) pairs."""
    rows = []
    for shape in shapes:
        right = kv_bytes_per_token(shape, bytes_per_value)
        wrong = kv_bytes_per_token((shape.layers, shape.heads, shape.head_dim), bytes_per_value)
        gib = {f"B={b}, T={t}": kv_cache_bytes(shape, t, b, bytes_per_value) / 2**30 for b, t in MEMORY_SETTINGS}
        rows.append({"model": shape.name, "layers": shape.layers, "heads": shape.heads,
                     "kv_heads": shape.kv_heads, "head_dim": shape.head_dim,
                     "bytes_per_token": right, "bytes_per_token_with_attention_heads": wrong,
                     "overstatement": wrong / right, "gib": gib, "note": shape.note})
    return rows


def memory_markdown(rows: list[dict[str, Any]], dtype_name: str) -> str:
    settings = list(rows[0]["gib"])
    head = ["model", "layers", "H / Hkv", "D", f"KV per token ({dtype_name})", "with H instead of Hkv (wrong)"]
    head += [f"GiB, {s}" for s in settings]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], str(r["layers"]), f"{r['heads']} / {r['kv_heads']}", str(r["head_dim"]),
                 f"{r['bytes_per_token']:,} B ({r['bytes_per_token'] / 1024:g} KiB)",
                 f"{r['bytes_per_token_with_attention_heads']:,} B ({r['overstatement']:g}x)"]
        cells += [f"{r['gib'][s]:,.2f}" for s in settings]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {r['model']}: {r['note']}" for r in rows if "window" in r["note"]]
    lines += ["", "T = context length in tokens, B = sequences in the batch; 1 GiB = 2^30 bytes.",
              "The formula counts every layer at full length; for models with sliding windows it is an upper bound:",
              *notes]
    return "\n".join(lines) + "\n"


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
def attention_with_cache(attn: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         past: LayerKV | None) -> tuple[torch.Tensor, LayerKV]:
    """One attention sub-layer that appends this step's keys and values to the layer's cache.

        Q = x W_q,  K_new = x W_k,  V_new = x W_v           (RoPE applied to Q and K_new)
        K = concat(K_past, K_new),  V = concat(V_past, V_new)
        out = softmax(Q K^T / sqrt(D) + causal mask) V W_o

    x: (B, T, hidden) holds only the *new* tokens (T = prompt length at prefill, 1 when decoding).
    past: the (K, V) of every earlier position, or None. Returns the output and the grown cache.
    """
    B, T, _ = x.shape
    D = attn.head_dim
    q = attn.q_proj(x).view(B, T, -1, D).transpose(1, 2)  # (B, H, T, D)
    k = attn.k_proj(x).view(B, T, -1, D).transpose(1, 2)  # (B, Hkv, T, D)
    v = attn.v_proj(x).view(B, T, -1, D).transpose(1, 2)  # (B, Hkv, T, D)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D): same rotation for every head
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    if past is not None:  # the cache: keys and values of earlier positions are never recomputed
        k = torch.cat([past[0], k], dim=2)  # (B, Hkv, T_past + T, D)
        v = torch.cat([past[1], v], dim=2)  # (B, Hkv, T_past + T, D)
    T_all = k.shape[2]
    mask = None
    if T > 1 and T_all > T:  # several new tokens after a cached prefix: causal with an offset
        mask = torch.ones(T, T_all, dtype=torch.bool, device=x.device).tril(diagonal=T_all - T)
    # enable_gqa: the H query heads share the Hkv K/V heads in groups of H / Hkv (no copies made).
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=(T > 1 and mask is None),
                                         enable_gqa=True)  # (B, H, T, D)
    out = out.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*D)
    return attn.o_proj(out), (k, v)
# --8<-- [end:attention_step]


def check_llama_style(model: torch.nn.Module) -> None:
    """The hand-written forward reads Llama-style module names; say so instead of failing later."""
    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or not all(hasattr(inner, name) for name in needed):
        raise ValueError("the hand-written decode loop supports Llama-style models (Llama, Qwen2, Mistral, SmolLM2)")


# --8<-- [start:forward]
@torch.no_grad()
def forward(model: torch.nn.Module, input_ids: torch.Tensor, start: int,
            cache: KVCache | None) -> tuple[torch.Tensor, KVCache]:
    """Run the new tokens `input_ids` (B, T) at positions start..start+T-1 through every layer.

    With `cache` (one (K, V) per layer, or [] before the prompt) only the new tokens are
    computed and each layer's cache grows by T rows. With `cache=None` nothing is kept: the
    caller must pass the whole sequence every step. Returns the last position's logits (B, vocab)
    and the cache.
    """
    inner = model.model
    x = inner.embed_tokens(input_ids)  # (B, T, hidden)
    positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    cos, sin = inner.rotary_emb(x, positions)  # (1, T, D) each
    new_cache: KVCache = []
    for i, layer in enumerate(inner.layers):
        past = cache[i] if cache else None
        h, kv = attention_with_cache(layer.self_attn, layer.input_layernorm(x), cos, sin, past)
        x = x + h
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        new_cache.append(kv)
    logits = model.lm_head(inner.norm(x[:, -1:]))  # (B, 1, vocab): only the next token is needed
    return logits[:, -1].float(), new_cache
# --8<-- [end:forward]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --8<-- [start:decode_loops]
def greedy_with_cache(model: torch.nn.Module, prompt: torch.Tensor, max_new_tokens: int,
                      stop_ids: set[int]) -> tuple[list[int], list[float]]:
    """Prefill once, then feed one token per step: each step's work is O(current length)."""
    times, tokens = [], []
    t0 = time.perf_counter()
    logits, cache = forward(model, prompt, start=0, cache=[])  # prefill: the whole prompt at once
    for step in range(max_new_tokens):
        token = logits.argmax(dim=-1, keepdim=True)  # (1, 1)
        synchronize(prompt.device)
        times.append(time.perf_counter() - t0)
        tokens.append(int(token))
        if tokens[-1] in stop_ids or step == max_new_tokens - 1:
            break
        t0 = time.perf_counter()
        logits, cache = forward(model, token, start=prompt.shape[1] + step, cache=cache)  # decode
    return tokens, times


def greedy_without_cache(model: torch.nn.Module, prompt: torch.Tensor, max_new_tokens: int,
                         stop_ids: set[int]) -> tuple[list[int], list[float]]:
    """Recompute the whole sequence for every new token: step n costs O(n) tokens of work."""
    times, tokens = [], []
    seq = prompt  # (1, T)
    for _ in range(max_new_tokens):
        t0 = time.perf_counter()
        logits, _ = forward(model, seq, start=0, cache=None)  # every position, every step
        token = logits.argmax(dim=-1, keepdim=True)  # (1, 1)
        synchronize(prompt.device)
        times.append(time.perf_counter() - t0)
        tokens.append(int(token))
        if tokens[-1] in stop_ids:
            break
        seq = torch.cat([seq, token], dim=1)  # (1, T + 1)
    return tokens, times
# --8<-- [end:decode_loops]


# ---------------------------------------------------------------------------------------------
# Part 3: the library path (transformers' generate) and the measurements
# ---------------------------------------------------------------------------------------------

# --8<-- [start:library]
@torch.no_grad()
def generate_tokens(model: torch.nn.Module, prompt: torch.Tensor, max_new_tokens: int,
                    use_cache: bool) -> tuple[list[int], float]:
    """transformers' own loop; `use_cache=False` recomputes the full sequence at each step."""
    synchronize(prompt.device)
    t0 = time.perf_counter()
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
                         do_sample=False, use_cache=use_cache)
    synchronize(prompt.device)
    return out[0, prompt.shape[1]:].tolist(), time.perf_counter() - t0
# --8<-- [end:library]


def median_ms(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of `fn` in ms, after warm-up, synchronizing the GPU around each call."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def decode_bytes(model: torch.nn.Module, n: int) -> int:
    """Fewest bytes one cached decode step must read at context n: every weight once (the input
    embedding table only if it doubles as the LM head) plus the KV cache of n positions."""
    embed = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is embed
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if tied or p is not embed)
    return weights + kv_bytes_per_token(model.config, embed.element_size()) * n


def copy_bandwidth_gbs(device: torch.device, gib: float = 1.0, repeats: int = 5) -> float:
    """Measured device-to-device copy rate (bytes read + written per second): decode's ceiling."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, warmup=2, repeats=repeats)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def sweep_lengths(model: torch.nn.Module, lengths: list[int], device: torch.device, warmup: int,
                  repeats: int, seed: int, quiet: bool) -> list[dict[str, Any]]:
    """Time one decode step at each context length n: cached (1 new token, n cached) and uncached
    (all n + 1 tokens recomputed). The cache is prefilled once per length and reused: `forward`
    returns a new cache and leaves the old one untouched, so each repeat starts from the same n."""
    from tqdm import tqdm

    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n in tqdm(lengths, desc="lengths", disable=quiet or not sys.stderr.isatty()):
        ids = torch.randint(0, vocab, (1, n + 1), generator=gen).to(device)  # (1, n + 1)
        _, cache = forward(model, ids[:, :n], start=0, cache=[])
        with_cache = median_ms(lambda: forward(model, ids[:, n:], start=n, cache=cache), device, warmup, repeats)
        del cache
        without = median_ms(lambda: forward(model, ids, start=0, cache=None), device, warmup, repeats)
        step_bytes = decode_bytes(model, n)
        rows.append({"context": n, "ms_per_token_cache": with_cache, "ms_per_token_no_cache": without,
                     "ratio": without / with_cache, "bytes_per_cached_step": step_bytes,
                     "gb_per_s_cached": step_bytes / (with_cache * 1e-3) / 1e9})
    return rows


def loop_rows(times_cache: list[float], times_no: list[float], prompt_len: int, buckets: int = 8) -> list[dict]:
    """Per-step times, averaged over equal slices of the generation (first cached step = prefill, left out)."""
    n = min(len(times_cache), len(times_no))
    edges = sorted({1 + round(i * (n - 1) / buckets) for i in range(buckets + 1)})
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        rows.append({"positions": f"{prompt_len + lo}-{prompt_len + hi - 1}",
                     "ms_per_token_cache": 1e3 * statistics.mean(times_cache[lo:hi]),
                     "ms_per_token_no_cache": 1e3 * statistics.mean(times_no[lo:hi])})
        rows[-1]["ratio"] = rows[-1]["ms_per_token_no_cache"] / rows[-1]["ms_per_token_cache"]
    return rows


# ---------------------------------------------------------------------------------------------
# Results: JSON, Markdown tables and a plot
# ---------------------------------------------------------------------------------------------

def hardware_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{cpu}, {threads} thread{'s' if threads != 1 else ''}"


def versions() -> dict[str, str]:
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def results_markdown(result: dict[str, Any]) -> str:
    lines = [f"Model: {result['model']} ({result['dtype']}), {result['hardware']}.", ""]
    loop = result.get("loop")
    if loop:
        lines += [f"Greedy decode written out, prompt of {loop['prompt_tokens']} tokens, "
                  f"{loop['new_tokens']} new tokens; tokens identical with and without cache: "
                  f"{loop['tokens_identical']}.", "",
                  "| positions | ms/token with cache | ms/token without cache | ratio |", "|---|---|---|---|"]
        lines += [f"| {r['positions']} | {r['ms_per_token_cache']:.1f} | {r['ms_per_token_no_cache']:.1f} | "
                  f"{r['ratio']:.1f}x |" for r in loop["rows"]]
        lines += ["", f"Whole generation: {loop['seconds_cache']:.2f} s with cache (prefill included), "
                  f"{loop['seconds_no_cache']:.2f} s without.", ""]
    gen = result.get("generate")
    if gen:
        lines += ["| transformers `generate` | new tokens | seconds | tokens/s | same tokens as our loop |",
                  "|---|---|---|---|---|"]
        for key in ("use_cache=True", "use_cache=False"):
            g = gen[key]
            lines.append(f"| `{key}` | {g['new_tokens']} | {g['seconds']:.2f} | {g['tokens_per_s']:.1f} | "
                         f"{g['same_as_loop']} |")
        lines.append("")
    sweep = result.get("sweep")
    if sweep:
        bw = result.get("copy_bandwidth_gbs")
        lines += ["One decode step at context length n (median of "
                  f"{result['repeats']} after {result['warmup']} warm-up). Bytes a cached step must read = "
                  "weights + KV cache of n tokens" + (f"; measured copy bandwidth {bw:,.0f} GB/s." if bw else "."),
                  "", "| context n | ms/token with cache | ms/token without cache | ratio | "
                  "GB read per cached step | achieved GB/s (cached)" + (" | fraction of copy bandwidth |" if bw else " |"),
                  "|---|---|---|---|---|---|" + ("---|" if bw else "")]
        for r in sweep:
            line = (f"| {r['context']} | {r['ms_per_token_cache']:.2f} | {r['ms_per_token_no_cache']:.2f} | "
                    f"{r['ratio']:.1f}x | {r['bytes_per_cached_step'] / 1e9:.3f} | {r['gb_per_s_cached']:,.0f} |")
            lines.append(line + (f" {r['gb_per_s_cached'] / bw:.2f} |" if bw else ""))
    return "\n".join(lines).rstrip() + "\n"


def write_plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [key for key in ("loop", "sweep") if result.get(key)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, key in zip(axes[0], panels):
        if key == "loop":
            loop = result["loop"]
            start = loop["prompt_tokens"]
            ax.plot([start + i for i in range(1, len(loop["step_ms_cache"]))], loop["step_ms_cache"][1:],
                    label="with KV cache")
            ax.plot([start + i for i in range(len(loop["step_ms_no_cache"]))], loop["step_ms_no_cache"],
                    label="without cache")
            ax.set_xlabel("position of the generated token")
            ax.set_title("decode loop, every step")
        else:
            xs = [r["context"] for r in result["sweep"]]
            ax.plot(xs, [r["ms_per_token_cache"] for r in result["sweep"]], "o-", label="with KV cache")
            ax.plot(xs, [r["ms_per_token_no_cache"] for r in result["sweep"]], "s-", label="without cache")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("context length n")
            ax.set_title("one decode step at length n (median)")
        ax.set_ylabel("ms per token")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{result['model']} ({result['dtype']}), {result['hardware']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(result: dict[str, Any], json_path: Path) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    json_path.with_suffix(".md").write_text(results_markdown(result))
    json_path.with_name(json_path.stem + "-kv-memory.md").write_text(
        memory_markdown(result["kv_memory"]["rows"], result["kv_memory"]["dtype"]))
    if result.get("loop") or result.get("sweep"):
        write_plot(result, json_path.with_suffix(".png"))


# ---------------------------------------------------------------------------------------------
# Model loading
# ---------------------------------------------------------------------------------------------

# Llama-3-8B's architecture (meta-llama/Meta-Llama-3-8B config.json), for random-weight speed runs.
RANDOM_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """Return (model, tokenizer or None, model label)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    if args.random_weights:
        config = LlamaConfig(**RANDOM_CONFIGS[args.random_weights])
        with torch.device(device):  # allocate and initialise on the device: 16 GB never touch the host
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        return model.eval(), None, f"{args.random_weights} shape, random weights"
    looks_local = args.model.startswith((".", "/", "~")) or os.sep in args.model.strip(os.sep).split(os.sep, 1)[-1]
    if looks_local and not Path(args.model).expanduser().is_dir():
        fail(f"no model folder at {args.model!r}; pass a local transformers folder or a hub id with --model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa")
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        fail(f"cannot load model {args.model!r} ({first[:200]}); pass a local folder or a hub id with --model")
    return model.to(device).eval(), tokenizer, Path(args.model).name or args.model


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(n < 1 for n in lengths):
        raise argparse.ArgumentTypeError("lengths must be positive")
    return lengths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("Model")
    model.add_argument("--model", default=DEFAULT_MODEL, help="hub id or local folder of a Llama-style model")
    model.add_argument("--random-weights", choices=sorted(RANDOM_CONFIGS), default=None,
                       help="build this architecture with random weights on the device instead of loading "
                            "--model (speed only: tokens are not compared)")
    model.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto = cuda if available")
    model.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                       help="weights and activations; auto = float32 on CPU, bfloat16 on CUDA")
    method = parser.add_argument_group("Decode loop")
    method.add_argument("--prompt", default="The capital of France is", help="prompt of the greedy decode loop")
    method.add_argument("--chat", action="store_true",
                        help="wrap the prompt in the tokenizer's chat template (instruct models answer at length)")
    method.add_argument("--max-new-tokens", type=int, default=64,
                        help="tokens generated by each loop (0 skips the loops and generate)")
    method.add_argument("--no-generate", action="store_true",
                        help="skip transformers' generate(use_cache=True/False)")
    bench = parser.add_argument_group("Benchmark")
    bench.add_argument("--lengths", type=parse_lengths, default=[],
                       help="comma-separated context lengths for the one-step sweep, e.g. 128,512,2048 "
                            "(empty: no sweep)")
    bench.add_argument("--warmup", type=int, default=1, help="untimed calls before each sweep measurement")
    bench.add_argument("--repeats", type=int, default=3, help="timed calls per sweep measurement (median)")
    bench.add_argument("--kv-dtype", choices=sorted(DTYPE_BYTES), default="bfloat16",
                       help="element type assumed by the KV memory table")
    out = parser.add_argument_group("Output")
    out.add_argument("--threads", type=int, default=0,
                     help="CPU threads for torch (0 = torch's default); 1 is steadier on a busy shared machine")
    out.add_argument("--seed", type=int, default=0, help="seed for the random weights and sweep tokens")
    out.add_argument("--json", type=Path, default=None, help="write results JSON here (+ .md, .png beside it)")
    out.add_argument("--quiet", action="store_true", help="no progress bars, shorter printout")
    return parser


def stop_token_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    """The tokens that end a generation: generate() reads them from the generation config."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    return set(ids) if isinstance(ids, (list, tuple)) else ({ids} if ids is not None else set())


def run_loops(args: argparse.Namespace, model, tokenizer, device: torch.device) -> tuple[dict, dict | None]:
    if args.chat:  # an instruct model answers at length only inside its chat template
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = args.prompt
    prompt = tokenizer(text, return_tensors="pt", add_special_tokens=not args.chat).input_ids.to(device)  # (1, T)
    eos = stop_token_ids(model, tokenizer)
    forward(model, prompt, start=0, cache=[])  # warm-up: first calls allocate and pick kernels
    tokens_c, times_c = greedy_with_cache(model, prompt, args.max_new_tokens, eos)
    tokens_n, times_n = greedy_without_cache(model, prompt, args.max_new_tokens, eos)
    loop = {"prompt_tokens": prompt.shape[1], "new_tokens": len(tokens_c), "tokens_cache": tokens_c,
            "tokens_no_cache": tokens_n, "tokens_identical": tokens_c == tokens_n,
            "text": tokenizer.decode(tokens_c), "step_ms_cache": [1e3 * t for t in times_c],
            "step_ms_no_cache": [1e3 * t for t in times_n], "seconds_cache": sum(times_c),
            "seconds_no_cache": sum(times_n), "rows": loop_rows(times_c, times_n, prompt.shape[1])}
    if args.no_generate:
        return loop, None
    gen = {}
    for use_cache in (True, False):
        tokens, seconds = generate_tokens(model, prompt, args.max_new_tokens, use_cache)
        gen[f"use_cache={use_cache}"] = {"new_tokens": len(tokens), "seconds": seconds,
                                         "tokens_per_s": len(tokens) / seconds, "tokens": tokens,
                                         "same_as_loop": tokens == tokens_c}
    return loop, gen


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but no CUDA GPU is visible; use --device cpu")
    if args.max_new_tokens < 0 or args.repeats < 1 or args.warmup < 0:
        fail("--max-new-tokens and --warmup must be >= 0, --repeats >= 1")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tokenizer, label = load_model(args, device, dtype)
    try:
        check_llama_style(model)
    except ValueError as error:
        fail(str(error))
    result: dict[str, Any] = {
        "hardware": hardware_name(device), "versions": versions(),
        "command": "python " + shlex.join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": label, "device": device.type, "dtype": str(dtype).removeprefix("torch."),
        "seed": args.seed, "warmup": args.warmup, "repeats": args.repeats,
        "kv_bytes_per_token_this_model": kv_bytes_per_token(model.config, torch.finfo(dtype).bits // 8),
    }
    if args.max_new_tokens and tokenizer is not None:
        result["loop"], result["generate"] = run_loops(args, model, tokenizer, device)
    if args.lengths:
        max_pos = getattr(model.config, "max_position_embeddings", None)
        if max_pos and max(args.lengths) >= max_pos:
            fail(f"--lengths must stay below the model's {max_pos} positions")
        if device.type == "cuda":
            result["copy_bandwidth_gbs"] = copy_bandwidth_gbs(device)
        result["sweep"] = sweep_lengths(model, args.lengths, device, args.warmup, args.repeats, args.seed, args.quiet)
    kv_bytes = DTYPE_BYTES[args.kv_dtype]
    result["kv_memory"] = {"dtype": args.kv_dtype, "bytes_per_value": kv_bytes,
                           "rows": memory_table(KNOWN_SHAPES, kv_bytes)}
    report(result, args.quiet)
    if args.json:
        write_results(result, args.json)
    return result


def report(result: dict[str, Any], quiet: bool) -> None:
    loop = result.get("loop")
    if loop:
        print(f"with cache   : {loop['tokens_cache']}")
        print(f"without cache: {loop['tokens_no_cache']}")
        print(f"identical: {loop['tokens_identical']}  text: {loop['text']!r}")
    print(results_markdown(result))
    if not quiet:
        print(memory_markdown(result["kv_memory"]["rows"], result["kv_memory"]["dtype"]))


if __name__ == "__main__":
    main(build_parser().parse_args())
