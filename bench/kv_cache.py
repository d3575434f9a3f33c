"""The KV cache measured: a decode step with and without the cache against context length.

Loads inference/inference-acceleration/examples/kv_cache_optimization.py (the hand-written Llama
forward with an explicit per-layer cache, both greedy loops, transformers' generate, the KV bytes
formula) and adds the workloads, the timing and the results files:

    loop      (cpu) both greedy loops and generate(use_cache=True / False) on a chat prompt, each
              run once, with the seconds of every step of the two loops
    sweep     one decode step at each context length n: cached (1 new token, n cached) and
              uncached (all n + 1 tokens recomputed), median and interquartile range of repeats;
              the KV cache's tensor bytes beside the formula; bytes a cached step must read
              (weights + KV of n tokens) over the measured copy bandwidth: achieved GB/s and the
              fraction of that roofline
    kv memory (cpu) the formula for published model shapes, right (Hkv) and wrong (H)

Writes
    kv_cache_optimization-<preset>.{json,md,en.md}            loop, generate, sweep
    kv_cache_optimization-<preset>.png                        ms per step against context length
    kv_cache_optimization-<preset>-memory.png                 KV cache bytes against context length
    kv_cache_optimization-<preset>-kv-memory.{json,md,en.md}  the memory table (cpu preset)

Run: python bench/kv_cache.py --preset cpu      (the GPU run: --preset h200)
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

import common  # bench/ is on sys.path: it is the folder of the script being run

STEM = "kv_cache_optimization"
QUICK_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "about": "SmolLM2-135M-Instruct float32 on one CPU thread: both greedy loops and generate "
                 "with and without cache, chat prompt, 128 new tokens; one step at context "
                 "64..1024, median of 3 after 1 warm-up; the KV memory table",
        "model": "smollm2",
        "device": "cpu",
        "dtype": "float32",
        "threads": 1,
        "prompt": "Write a short story about a robot who learns to paint.",
        "chat": True,
        "max_new_tokens": 128,
        "lengths": [64, 128, 256, 512, 1024],
        "warmup": 1,
        "repeats": 3,
        "copy_gib": 0.25,
        "memory_table": True,
        "quick": {"chat": False, "max_new_tokens": 4, "lengths": [8, 16], "warmup": 0,
                  "repeats": 2, "copy_gib": 0.01},
    },
    "h200": {
        "about": "Llama-3-8B shape with random bf16 weights, eager, batch 1, one GPU: one step at "
                 "context 128..4096 with and without cache, median of 5 after 2 warm-ups; copy "
                 "bandwidth and the fraction of the roofline",
        "model": common.RANDOM_8B,
        "device": "cuda",
        "dtype": "bfloat16",
        "threads": 0,
        "max_new_tokens": 0,
        "lengths": [128, 256, 512, 1024, 2048, 4096],
        "warmup": 2,
        "repeats": 5,
        "copy_gib": 2.0,
        "memory_table": False,
        "quick": {"shape": QUICK_SHAPE, "lengths": [8, 16], "warmup": 0, "repeats": 2,
                  "copy_gib": 0.01},
    },
}

# Published configurations (config.json of each model on the Hugging Face hub):
# (name, layers, H, Hkv, D, note).
KNOWN_SHAPES = [
    ("SmolLM2-135M", 30, 9, 3, 64, "GQA 3:1"),
    ("Llama-2-7B", 32, 32, 32, 128, "MHA"),
    ("Llama-3-8B", 32, 32, 8, 128, "GQA 4:1"),
    ("Llama-3-70B", 80, 64, 8, 128, "GQA 8:1"),
    ("Qwen2.5-7B", 28, 28, 4, 128, "GQA 7:1"),
    ("Qwen2.5-72B", 80, 64, 8, 128, "GQA 8:1"),
    ("Mistral-7B-v0.1", 32, 32, 8, 128, "sliding window 4096"),
    ("Gemma-2-9B", 42, 16, 8, 256, "every other layer: sliding window 4096"),
]
# (batch B, context T): one long chat, a long document, a full 128k window, two serving loads.
MEMORY_SETTINGS = [(1, 4096), (1, 32768), (1, 131072), (32, 2048), (64, 8192)]

ks = common.load_script(common.ACCEL / "examples" / "kv_cache_optimization.py")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------
def load_model(settings: dict, device, dtype):
    """(model, tokenizer or None, label)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if settings["model"] == common.RANDOM_8B:
        config = common.llama3_8b_config(**settings.get("shape", {}))
        return common.random_model(config, device, dtype), None, "Llama-3-8B shape, random weights"
    try:
        model = AutoModelForCausalLM.from_pretrained(settings["model"], dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(settings["model"])
    except (OSError, ValueError) as error:
        common.fail(f"cannot load {settings['model']} ({str(error).strip().splitlines()[0][:160]}): "
                    "pass --model with a local Llama-style folder")
    try:
        ks.check_llama_style(model)
    except ks.Refusal as why:
        common.fail(str(why))
    return model.to(device).eval(), tokenizer, Path(settings["model"]).name


def weight_bytes(model) -> int:
    """Bytes of weights a decode step reads: every parameter once, the input embedding table
    only where it doubles as the LM head (a step reads one row of it otherwise)."""
    embed = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is embed
    return sum(p.numel() * p.element_size() for p in model.parameters() if tied or p is not embed)


def loop_rows(step_cache: list[float], step_plain: list[float], prompt_len: int,
              buckets: int = 8) -> list[dict]:
    """Per-step times averaged over equal slices of the generation (step 0 = prefill, left out)."""
    n = min(len(step_cache), len(step_plain))
    edges = sorted({1 + round(i * (n - 1) / buckets) for i in range(buckets + 1)})
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        cached = 1e3 * statistics.mean(step_cache[lo:hi])
        plain = 1e3 * statistics.mean(step_plain[lo:hi])
        rows.append({"positions": f"{prompt_len + lo}-{prompt_len + hi - 1}",
                     "ms_per_token_cache": cached, "ms_per_token_no_cache": plain,
                     "ratio": plain / cached})
    return rows


def run_loop(model, tokenizer, settings: dict, device) -> tuple[dict, dict]:
    """Both greedy loops and both generate calls, each once (the teaching script's comparison)."""
    prompt = ks.encode_prompt(tokenizer, settings["prompt"], settings["chat"], device)  # (1, T)
    res = ks.comparison(model, tokenizer, prompt, settings["max_new_tokens"])
    cached, _ = res["runs"]["our loop, with cache"]
    plain, _ = res["runs"]["our loop, without cache"]
    agree = next((i for i, (a, b) in enumerate(zip(cached, plain)) if a != b), min(len(cached), len(plain)))
    T = prompt.shape[1]
    loop = {"prompt_tokens": T, "new_tokens": len(cached), "tokens_cache": cached,
            "tokens_no_cache": plain, "same_tokens_in_a_row": agree,
            "text": tokenizer.decode(cached),
            "step_ms_cache": [1e3 * s for s in res["step_seconds_cache"]],
            "step_ms_no_cache": [1e3 * s for s in res["step_seconds_no_cache"]],
            "seconds_cache": sum(res["step_seconds_cache"]),
            "seconds_no_cache": sum(res["step_seconds_no_cache"]),
            "kv_cache_bytes": ks.cache_bytes(res["cache"]),
            "rows": loop_rows(res["step_seconds_cache"], res["step_seconds_no_cache"], T)}
    generate = {}
    for use_cache in (True, False):
        tokens, seconds = res["runs"][f"generate(use_cache={use_cache})"]
        generate[f"use_cache={use_cache}"] = {"new_tokens": len(tokens), "seconds": seconds,
                                              "tokens_per_s": len(tokens) / seconds,
                                              "tokens": tokens, "same_as_loop": tokens == cached}
    return loop, generate


def sweep(model, settings: dict, device, elem: int, weights: int, bandwidth: float) -> list[dict]:
    """One decode step at each context n, with the cache (prefilled once and reused: `forward`
    returns a new cache and leaves the old one untouched) and without (n + 1 tokens)."""
    import torch

    config = model.config
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in settings["lengths"]:
        ids = torch.randint(0, config.vocab_size, (1, n + 1), generator=gen).to(device)  # (1, n+1)
        _, cache = ks.forward(model, ids[:, :n], start=0, cache=[])
        kv_measured = ks.cache_bytes(cache)
        cached = common.time_ms(lambda: ks.forward(model, ids[:, n:], start=n, cache=cache), device,
                                settings["warmup"], settings["repeats"])
        del cache
        plain = common.time_ms(lambda: ks.forward(model, ids, start=0, cache=None), device,
                               settings["warmup"], settings["repeats"])
        c, p = common.spread(cached), common.spread(plain)
        step_bytes = weights + ks.kv_cache_bytes(config, n, 1, elem)
        gbps = step_bytes / (c["median"] * 1e-3) / 1e9
        rows.append({"context": n, "ms_per_token_cache": c["median"], "ms_cache": c,
                     "ms_per_token_no_cache": p["median"], "ms_no_cache": p,
                     "ratio": p["median"] / c["median"],
                     "kv_cache_bytes": kv_measured,
                     "kv_cache_bytes_formula": ks.kv_cache_bytes(config, n, 1, elem),
                     "bytes_per_cached_step": step_bytes, "gb_per_s_cached": gbps,
                     "roofline_fraction": gbps / bandwidth})
        log(f"n={n:5d}: cached {c['median']:8.2f} ms, uncached {p['median']:8.2f} ms, "
            f"{gbps:7.1f} GB/s ({gbps / bandwidth:.2f} of copy bandwidth)")
    return rows


def memory_rows(bytes_per_value: float = 2) -> list[dict]:
    rows = []
    for name, layers, H, Hkv, D, note in KNOWN_SHAPES:
        right = ks.kv_bytes_per_token((layers, Hkv, D), bytes_per_value)
        wrong = ks.kv_bytes_per_token((layers, H, D), bytes_per_value)
        gib = {f"B={b}, T={t}": ks.kv_cache_bytes((layers, Hkv, D), t, b, bytes_per_value) / 2**30
               for b, t in MEMORY_SETTINGS}
        rows.append({"model": name, "layers": layers, "heads": H, "kv_heads": Hkv, "head_dim": D,
                     "bytes_per_token": right, "bytes_per_token_with_attention_heads": wrong,
                     "overstatement": wrong / right, "gib": gib, "note": note})
    return rows


# ---------------------------------------------------------------------------------------------
# Tables and plots
# ---------------------------------------------------------------------------------------------
def caption(result: dict, lang: str) -> str:
    s = result["settings"]
    model = result["model"]
    if lang == "zh":
        model = "Llama-3-8B 形状，随机权重" if s["model"] == common.RANDOM_8B else model
        return (f"{model}（{s['dtype']}，批大小 1），{result['hardware']}；复制带宽 "
                f"{result['copy_bandwidth_gbs']:,.0f} GB/s（读 + 写）。命令：`{result['command']}`")
    return (f"{model} ({s['dtype']}, batch 1) on {result['hardware']}; copy bandwidth "
            f"{result['copy_bandwidth_gbs']:,.0f} GB/s (read + write). Command: `{result['command']}`")


def tables(result: dict) -> dict[str, str]:
    heads = {
        "zh": {"run": "运行", "tokens": "新词元", "s": "秒", "tps": "词元/秒", "same": "与缓存循环词元相同",
               "n": "上下文 n", "c": "有缓存 ms/步（四分位）", "p": "无缓存 ms/步（四分位）", "x": "加速",
               "kv": "KV 缓存 MiB", "gbps": "有缓存 GB/s", "frac": "占复制带宽",
               "loop": {"our loop, with cache": "手写循环，有缓存", "our loop, without cache": "手写循环，无缓存"},
               "sweep": "上下文长度为 n 时的一个解码步（{w} 次预热后 {r} 次的中位数）；有缓存的一步至少读"
                        "权重 + n 个词元的 KV。", "yes": "是", "no": "否"},
        "en": {"run": "run", "tokens": "new tokens", "s": "seconds", "tps": "tokens/s",
               "same": "same tokens as the cached loop", "n": "context n",
               "c": "ms/step with cache (IQR)", "p": "ms/step without cache (IQR)", "x": "speedup",
               "kv": "KV cache MiB", "gbps": "GB/s (cached)", "frac": "of copy bandwidth",
               "loop": {}, "sweep": "One decode step at context length n (median of {r} after {w} "
                                    "warm-up); a cached step reads at least the weights + the KV of n tokens.",
               "yes": "yes", "no": "no"},
    }
    s, out = result["settings"], {}
    for lang, t in heads.items():
        text = caption(result, lang) + "\n\n"
        loop = result.get("loop")
        if loop:
            same = lambda ok: t["yes"] if ok else t["no"]  # noqa: E731
            rows = [[t["loop"].get("our loop, with cache", "our loop, with cache"), loop["new_tokens"],
                     f"{loop['seconds_cache']:.2f}", f"{loop['new_tokens'] / loop['seconds_cache']:.1f}", "–"],
                    [t["loop"].get("our loop, without cache", "our loop, without cache"),
                     len(loop["tokens_no_cache"]), f"{loop['seconds_no_cache']:.2f}",
                     f"{len(loop['tokens_no_cache']) / loop['seconds_no_cache']:.1f}",
                     same(loop["tokens_no_cache"] == loop["tokens_cache"])]]
            for key, g in result["generate"].items():
                rows.append([f"`generate({key})`", g["new_tokens"], f"{g['seconds']:.2f}",
                             f"{g['tokens_per_s']:.1f}", same(g["same_as_loop"])])
            text += common.markdown_table([t["run"], t["tokens"], t["s"], t["tps"], t["same"]], rows,
                                          "lrrrl") + "\n"
        text += t["sweep"].format(r=s["repeats"], w=s["warmup"]) + "\n\n"
        rows = [[r["context"],
                 f"{r['ms_per_token_cache']:.2f} ({r['ms_cache']['q1']:.2f}–{r['ms_cache']['q3']:.2f})",
                 f"{r['ms_per_token_no_cache']:.2f} ({r['ms_no_cache']['q1']:.2f}–{r['ms_no_cache']['q3']:.2f})",
                 f"{r['ratio']:.1f}×", f"{r['kv_cache_bytes'] / 2**20:.1f}",
                 f"{r['gb_per_s_cached']:,.1f}", f"{r['roofline_fraction']:.2f}"] for r in result["sweep"]]
        text += common.markdown_table([t["n"], t["c"], t["p"], t["x"], t["kv"], t["gbps"], t["frac"]], rows)
        out[lang] = text
    return out


def memory_tables(result: dict) -> dict[str, str]:
    rows = result["rows"]
    settings = list(rows[0]["gib"])
    heads = {"zh": ["模型", "层数", "H / Hkv", "D", "每词元 KV（bf16）", "用 H 代替 Hkv（错误）",
                    *[f"GiB，{s}" for s in settings]],
             "en": ["model", "layers", "H / Hkv", "D", "KV per token (bf16)", "with H instead of Hkv (wrong)",
                    *[f"GiB, {s}" for s in settings]]}
    notes = {"zh": "T = 上下文长度（词元），B = 批中序列数；1 GiB = 2^30 字节。公式按每层全长计算；"
                   "带滑动窗口的模型（{m}）实际更少，公式是上界。",
             "en": "T = context length in tokens, B = sequences in the batch; 1 GiB = 2^30 bytes. The "
                   "formula counts every layer at full length; for models with sliding windows ({m}) it "
                   "is an upper bound."}
    windowed = ", ".join(r["model"] for r in rows if "window" in r["note"])
    body = [[r["model"], r["layers"], f"{r['heads']} / {r['kv_heads']}", r["head_dim"],
             f"{r['bytes_per_token']:,} B ({r['bytes_per_token'] / 1024:g} KiB)",
             f"{r['bytes_per_token_with_attention_heads']:,} B ({r['overstatement']:g}×)",
             *[f"{r['gib'][s]:,.2f}" for s in settings]] for r in rows]
    return {lang: common.markdown_table(head, body, "lrlrrr" + "r" * len(settings)) + "\n"
            + notes[lang].format(m=windowed) + "\n" for lang, head in heads.items()}


def plot_latency(result: dict):
    def draw(path: Path) -> None:
        fig, ax = common.new_figure()
        xs = [r["context"] for r in result["sweep"]]
        for key, label, marker in (("ms_cache", "with KV cache", "o"), ("ms_no_cache", "without cache", "s")):
            med = [r[key]["median"] for r in result["sweep"]]
            err = [[m - r[key]["q1"] for m, r in zip(med, result["sweep"])],
                   [r[key]["q3"] - m for m, r in zip(med, result["sweep"])]]
            ax.errorbar(xs, med, yerr=err, marker=marker, capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length n (tokens)")
        ax.set_ylabel("ms per decode step (median, IQR)")
        ax.set_title(f"One decode step, {result['model']}", fontsize=11)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=10)
        common.save_figure(fig, path)
    return draw


def plot_memory(result: dict):
    def draw(path: Path) -> None:
        fig, ax = common.new_figure()
        xs = [r["context"] for r in result["sweep"]]
        ax.plot(xs, [r["kv_cache_bytes_formula"] / 2**20 for r in result["sweep"]], "--", color="gray",
                label=f"2 × layers × Hkv × D × bytes = {result['kv_bytes_per_token']:,} B/token")
        ax.plot(xs, [r["kv_cache_bytes"] / 2**20 for r in result["sweep"]], "o", label="cache tensors, measured")
        ax.set_xlabel("context length n (tokens)")
        ax.set_ylabel("KV cache, MiB")
        ax.set_title(f"KV cache size, {result['model']} ({result['settings']['dtype']})", fontsize=11)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=10)
        common.save_figure(fig, path)
    return draw


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def main(args) -> None:
    import torch

    settings, folder, device, dtype = common.start(PRESETS, args, common.ACCEL / "results")
    start = time.perf_counter()
    torch.manual_seed(0)
    model, tokenizer, label = load_model(settings, device, dtype)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and max(settings["lengths"]) >= max_pos:
        common.fail(f"context lengths must stay below the model's {max_pos} positions")
    elem = torch.finfo(dtype).bits // 8
    bandwidth = common.copy_bandwidth_gbs(device, settings["copy_gib"], 10 if device.type == "cuda" else 3)
    weights = weight_bytes(model)
    log(f"{label} on {common.hardware(device)}: weights {weights / 1e9:.3f} GB read per step, "
        f"copy bandwidth {bandwidth:.1f} GB/s")
    result: dict[str, Any] = {
        **common.results_header(settings, args, device),
        "model": label, "dtype": settings["dtype"],
        "kv_bytes_per_token": ks.kv_bytes_per_token(model.config, elem),
        "weight_bytes_per_step": weights, "copy_bandwidth_gbs": bandwidth,
    }
    if settings["max_new_tokens"]:
        if tokenizer is None:
            common.fail("the greedy loops need a tokenizer: set max_new_tokens to 0 for random weights")
        try:
            result["loop"], result["generate"] = run_loop(model, tokenizer, settings, device)
        except ks.Refusal as why:
            common.fail(str(why))
        log(f"loop: {result['loop']['seconds_cache']:.1f} s with cache, "
            f"{result['loop']['seconds_no_cache']:.1f} s without")
    result["sweep"] = sweep(model, settings, device, elem, weights, bandwidth)
    result["run_seconds"] = time.perf_counter() - start
    if settings["memory_table"]:
        memory = {**common.results_header(settings, args, device), "dtype": "bfloat16",
                  "bytes_per_value": 2, "rows": memory_rows(2)}
        common.write_results(folder, f"{STEM}-{args.preset}-kv-memory", memory, memory_tables(memory))
    written = common.write_results(folder, f"{STEM}-{args.preset}", result, tables(result),
                                   {"": plot_latency(result), "-memory": plot_memory(result)})
    log(f"wrote {', '.join(p.name for p in written)} in {result['run_seconds']:.0f} s")


if __name__ == "__main__":
    common.run_main(main, common.bench_parser(__doc__.splitlines()[0], PRESETS))
