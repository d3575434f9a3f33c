"""Serving throughput and KV memory: the paged engine against static and padded batching.

Loads inference/inference-acceleration/examples/paged_attention.py and serves one workload of
mixed lengths (prompt and output lengths uniform in the preset's ranges, prompt tokens random,
every request makes exactly its output length) through

    the paged engine, continuous batching      (LLMEngine, all requests at once)
    the paged engine, static batches           (the same engine, B requests at a time)
    transformers generate, padded batches      (a contiguous cache per left-padded batch)
    transformers generate, one request at a time (the first few requests only)
    transformers continuous batching           (`generate_manager` of transformers itself)

Each method gets a warm-up on a tiny workload first (excluded, recorded), then `repeats` timed
runs (median and interquartile range). KV memory is counted in token slots: blocks in use x BS
for the paged engine, B x (longest prompt + longest output) for a padded batch, the reserved
pool for transformers' continuous batching, and on a GPU also the peak allocated bytes. Writes

    serving-<preset>.{json,md,en.md}     one row per method
    serving-<preset>.png                 tokens/s per method
    serving-<preset>-memory.png          KV slots over the engine's steps: paged vs pre-allocated

Run: python bench/serving.py --preset cpu
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import common  # bench/ is on sys.path: it is the folder of the script being run

SCRIPT = common.ACCEL / "examples" / "paged_attention.py"

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "about": "SmolLM2-135M float32, 32 requests (prompt 16-128, output 16-128 tokens), at most "
                 "16 running, 0.25 GiB KV pool in blocks of 16; padded batches of 16; 8 requests alone",
        "model": "smollm2",
        "device": "cpu",
        "dtype": "float32",
        "num_requests": 32,
        "prompt_len": [16, 128],
        "output_len": [16, 128],
        "block_size": 16,
        "max_num_seqs": 16,
        "max_num_batched_tokens": 2048,
        "kv_cache_gib": 0.25,
        "max_model_len": 1024,
        "hf_batch_size": 16,
        "hf_single": 8,
        "hf_continuous": True,
        "repeats": 1,
        "seed": 0,
        "quick": {"num_requests": 5, "prompt_len": [3, 12], "output_len": [2, 6], "max_num_seqs": 2,
                  "kv_cache_gib": 0.001, "max_model_len": 64, "hf_batch_size": 2, "hf_single": 1},
    },
    "h200": {
        "about": "Llama-3-8B shape with random bf16 weights on one GPU, 256 requests (prompt "
                 "32-512, output 32-256), at most 64 running, 8 GiB KV pool in blocks of 16; "
                 "padded batches of 64; 4 requests alone",
        "model": common.RANDOM_8B,
        "device": "cuda",
        "dtype": "bfloat16",
        "num_requests": 256,
        "prompt_len": [32, 512],
        "output_len": [32, 256],
        "block_size": 16,
        "max_num_seqs": 64,
        "max_num_batched_tokens": 8192,
        "kv_cache_gib": 8,
        "max_model_len": 2048,
        "hf_batch_size": 64,
        "hf_single": 4,
        "hf_continuous": True,
        "repeats": 1,
        "seed": 0,
        "quick": {"num_requests": 8, "prompt_len": [8, 32], "output_len": [4, 16], "max_num_seqs": 4,
                  "kv_cache_gib": 0.5, "hf_batch_size": 4, "hf_single": 1},
    },
}


# --8<-- [start:static_batches]
def hf_padded_batches(model, prompts: list[list[int]], max_new_tokens: list[int],
                      batch_size: int, pad_token_id: int) -> list[list[int]]:
    """Static batching with transformers generate: requests in arrival order, each batch
    left-padded to its longest prompt and run to its longest output; tokens past a request's
    own length are wasted work. Every request makes exactly its max_new_tokens."""
    import torch

    outputs = []
    for i in range(0, len(prompts), batch_size):
        batch, n = prompts[i:i + batch_size], max_new_tokens[i:i + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in batch])   # (B, T)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])  # (B, T)
        out = model.generate(input_ids=ids.to(model.device),
                             attention_mask=mask.to(model.device), do_sample=False,
                             max_new_tokens=max(n), min_new_tokens=max(n),
                             pad_token_id=pad_token_id)
        outputs += [row[:k] for row, k in zip(out[:, width:].tolist(), n)]
    return outputs
# --8<-- [end:static_batches]


def hf_continuous(model, prompts: list[list[int]], max_new_tokens: list[int], settings: dict,
                  num_blocks: int) -> list[list[int]]:
    """transformers' own continuous batching (paged cache, its scheduler), same KV budget."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    config = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0,
                              max_new_tokens=max(max_new_tokens))
    cb = ContinuousBatchingConfig(block_size=settings["block_size"], num_blocks=num_blocks,
                                  max_batch_tokens=settings["max_num_batched_tokens"],
                                  max_requests_per_batch=settings["max_num_seqs"])
    with model.continuous_batching_context_manager(generation_config=config, warmup=False,
                                                   continuous_batching_config=cb) as manager:
        ids = [manager.add_request(p, max_new_tokens=n) for p, n in zip(prompts, max_new_tokens)]
        done: dict[str, list[int]] = {}
        while len(done) < len(ids):
            out = manager.get_result(timeout=1)
            if out is not None and out.is_finished():
                if out.error:
                    raise RuntimeError(out.error)
                done[out.request_id] = list(out.generated_tokens)
    return [done[i] for i in ids]


def workload(settings: dict, vocab_size: int) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(settings["seed"])
    n = settings["num_requests"]
    lens = [rng.randint(*settings["prompt_len"]) for _ in range(n)]
    outs = [rng.randint(*settings["output_len"]) for _ in range(n)]
    return [[rng.randrange(3, vocab_size) for _ in range(k)] for k in lens], outs


def load_model(settings: dict, device, dtype):
    if settings["model"] == common.RANDOM_8B:
        return common.random_model(common.llama3_8b_config(), device, dtype)
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(settings["model"], dtype=dtype)
    except (OSError, ValueError) as error:
        common.fail(f"cannot load {settings['model']!r} ({type(error).__name__}): pass --model "
                    "with a local Llama folder")
    return model.to(device).eval()


def kv_bytes_per_token(model) -> int:
    c = model.config
    D = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * D * next(model.parameters()).element_size()


def run_methods(pa, model, prompts, new_tokens, settings, device, num_blocks) -> tuple[list, dict]:
    """Every method on the same workload: rows, and the memory series of the continuous run."""
    import torch

    BS, B, repeats = settings["block_size"], settings["max_num_seqs"], settings["repeats"]
    engines: list = []

    def engine_run(static: bool):
        def run():
            engine = pa.LLMEngine(model, num_blocks, BS, B, settings["max_num_batched_tokens"])
            engines.append((engine, []))
            chunks = [range(i, min(i + B, len(prompts))) for i in range(0, len(prompts), B)]
            for chunk in (chunks if static else [range(len(prompts))]):
                for j in chunk:
                    engine.add_request(prompts[j], new_tokens[j])
                while not engine.scheduler.is_finished():
                    engine.step()
                    running = engine.scheduler.running
                    engines[-1][1].append((len(running), sum(s.num_tokens - 1 for s in running),
                                           (num_blocks - len(engine.block_manager.free_block_ids)) * BS))
        return run

    k = min(settings["hf_single"], len(prompts))
    chunks = [range(i, min(i + settings["hf_batch_size"], len(prompts)))
              for i in range(0, len(prompts), settings["hf_batch_size"])]
    padded_slots = max(len(c) * max(len(prompts[j]) + new_tokens[j] for j in c) for c in chunks)
    methods = [
        ("paged engine, continuous batching", engine_run(False), len(prompts), None),
        ("paged engine, static batches", engine_run(True), len(prompts), None),
        ("transformers generate, padded batches", lambda: hf_padded_batches(
            model, prompts, new_tokens, settings["hf_batch_size"], 0), len(prompts), padded_slots),
        ("transformers generate, one request at a time", lambda: hf_padded_batches(
            model, prompts[:k], new_tokens[:k], 1, 0), k, max(len(p) + n for p, n in zip(prompts[:k], new_tokens[:k]))),
    ]
    if settings["hf_continuous"]:
        methods.append(("transformers continuous batching", lambda: hf_continuous(
            model, prompts, new_tokens, settings, num_blocks), len(prompts), num_blocks * BS))
    rows, series = [], {}
    for name, run, count, slots in methods:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        with torch.inference_mode():
            samples = common.time_ms(run, device, warmup=0, repeats=repeats)
        wall = time.perf_counter() - start
        if name.startswith("paged engine"):
            engine, steps = engines[-1]
            slots = max(s for _, _, s in steps)
            if name.endswith("continuous batching"):
                series = {"running": [r for r, _, _ in steps], "tokens_stored": [t for _, t, _ in steps],
                          "slots_reserved": [s for _, _, s in steps]}
            extra = {"steps": engine.num_steps, "preemptions": engine.scheduler.num_preemptions}
            engines.clear()
        else:
            extra = {}
        spread = common.spread([s / 1e3 for s in samples])
        tokens = sum(new_tokens[:count])
        row = {"method": name, "requests_measured": count, "output_tokens": tokens, "seconds": spread,
               "tokens_per_s": tokens / spread["median"], "kv_slots_peak": slots,
               "wall_seconds": wall, **extra}
        if device.type == "cuda":
            row["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        rows.append(row)
        print(f"{name}: {row['tokens_per_s']:.1f} tokens/s ({spread['median']:.1f} s)", flush=True)
    for row in rows:
        row["vs_paged_engine"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    return rows, series


def tables(result: dict) -> dict[str, str]:
    s, w, m = result["settings"], result["workload"], result["memory"]
    model = "Llama-3-8B 形状随机权重" if s["model"] == common.RANDOM_8B else Path(s["model"]).name
    model_en = "Llama-3-8B shape, random weights" if s["model"] == common.RANDOM_8B else Path(s["model"]).name
    caption = {
        "zh": f"{result['hardware']},{model}({s['dtype']});{w['requests']} 个请求,提示 "
              f"{s['prompt_len'][0]}–{s['prompt_len'][1]}、输出 {s['output_len'][0]}–{s['output_len'][1]} "
              f"词元,最多 {s['max_num_seqs']} 个同时运行,KV 池 {m['pool_slots']} 个槽位(块大小 "
              f"{s['block_size']})。KV 槽位:峰值时占用(分页)或预留(填充批、transformers 连续批处理)。",
        "en": f"{result['hardware']}, {model_en} ({s['dtype']}); {w['requests']} requests, prompt "
              f"{s['prompt_len'][0]}–{s['prompt_len'][1]}, output {s['output_len'][0]}–{s['output_len'][1]} "
              f"tokens, at most {s['max_num_seqs']} running, KV pool of {m['pool_slots']} slots (blocks "
              f"of {s['block_size']}). KV slots: in use at the peak (paged) or reserved (padded "
              "batches, transformers' continuous batching).",
    }
    names = {"paged engine, continuous batching": "分页引擎,连续批处理",
             "paged engine, static batches": "分页引擎,静态批",
             "transformers generate, padded batches": "transformers generate,填充批",
             "transformers generate, one request at a time": "transformers generate,逐条请求",
             "transformers continuous batching": "transformers 自带连续批处理"}
    header = {"zh": ["方法", "请求数", "tokens/s", "× 分页引擎", "KV 槽位峰值"],
              "en": ["method", "requests", "tokens/s", "× paged engine", "peak KV slots"]}
    out = {}
    for lang in ("zh", "en"):
        rows = [[names[r["method"]] if lang == "zh" else r["method"], r["requests_measured"],
                 f"{r['tokens_per_s']:.1f}", f"{r['vs_paged_engine']:.2f}", f"{r['kv_slots_peak']:,}"]
                for r in result["rows"]]
        out[lang] = caption[lang] + "\n\n" + common.markdown_table(header[lang], rows)
    return out


def plot_throughput(result: dict):
    def draw(path: Path) -> None:
        fig, ax = common.new_figure()
        rows = result["rows"]
        ax.barh([r["method"].replace("transformers ", "transformers\n") for r in rows],
                [r["tokens_per_s"] for r in rows], color="tab:blue")
        ax.invert_yaxis()
        ax.set_xlabel("output tokens/s (higher is better)")
        ax.set_title(f"Serving a mixed workload, {result['hardware'].split(' (')[0]}", fontsize=11)
        common.save_figure(fig, path)
    return draw


def plot_memory(result: dict):
    def draw(path: Path) -> None:
        fig, ax = common.new_figure()
        m, series = result["memory"], result["memory"]["series"]
        steps = range(len(series["running"]))
        ax.plot(steps, [r * m["max_model_len"] for r in series["running"]],
                label=f"pre-allocated to {m['max_model_len']} tokens")
        ax.plot(steps, series["slots_reserved"], label="paged: slots in blocks in use")
        ax.plot(steps, series["tokens_stored"], "--", label="tokens stored")
        ax.axhline(m["pool_slots"], color="grey", lw=0.8, label="pool size")
        ax.set_xlabel("engine step")
        ax.set_ylabel("KV-cache slots (tokens)")
        ax.set_title("KV memory: paged blocks vs pre-allocation", fontsize=11)
        ax.legend(fontsize=10)
        common.save_figure(fig, path)
    return draw


def main(args) -> None:
    settings = common.resolve_preset(PRESETS, args)
    folder = common.results_dir(args, common.ACCEL / "results")
    device = common.resolve_device(settings["device"])
    dtype = common.dtype_of(settings["dtype"])
    pa = common.load_script(SCRIPT)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = load_model(settings, device, dtype)
    if model.config.model_type != "llama":
        common.fail(f"{settings['model']} is a {model.config.model_type} model: use a Llama model")
    model.generation_config.eos_token_id = None      # every request makes exactly its length
    per_token = kv_bytes_per_token(model)
    num_blocks = int(settings["kv_cache_gib"] * 2**30 // (per_token * settings["block_size"]))
    prompts, new_tokens = workload(settings, model.config.vocab_size)
    longest = max(len(p) + n for p, n in zip(prompts, new_tokens))
    if longest > min(num_blocks * settings["block_size"], settings["max_model_len"]):
        common.fail(f"a request of {longest} tokens does not fit the KV pool or max_model_len: "
                    "raise kv_cache_gib / max_model_len in the preset")
    # Warm-up (first calls, allocator, kernel selection): excluded from the timings, recorded.
    warm = {"engine": lambda: pa.LLMEngine(model, 64, settings["block_size"]).generate(prompts[:2], [4, 4]),
            "transformers": lambda: hf_padded_batches(model, prompts[:2], [4, 4], 2, 0)}
    warmup_s = {name: common.time_ms(fn, device, warmup=0, repeats=1)[0] / 1e3 for name, fn in warm.items()}
    rows, series = run_methods(pa, model, prompts, new_tokens, settings, device, num_blocks)
    continuous = rows[0]
    peak_running = max(series["running"])
    memory = {"kv_bytes_per_token": per_token, "num_blocks": num_blocks,
              "pool_slots": num_blocks * settings["block_size"], "max_model_len": settings["max_model_len"],
              "paged_peak_slots": continuous["kv_slots_peak"],
              "padded_peak_slots": rows[2]["kv_slots_peak"],
              "peak_running": peak_running, "prealloc_peak_slots": peak_running * settings["max_model_len"],
              "mean_paged_utilization": sum(series["tokens_stored"]) / max(1, sum(series["slots_reserved"])),
              "series": series}
    result = {**common.results_header(settings, args, device),
              "workload": {"requests": len(prompts), "prompt_tokens": sum(map(len, prompts)),
                           "output_tokens": sum(new_tokens)},
              "warmup_seconds": warmup_s, "rows": rows, "memory": memory}
    written = common.write_results(folder, f"serving-{args.preset}", result, tables(result),
                                   {"": plot_throughput(result), "-memory": plot_memory(result)})
    print(tables(result)["en"])
    print("wrote " + ", ".join(path.name for path in written))


if __name__ == "__main__":
    common.run_main(main, common.bench_parser(__doc__, PRESETS))
