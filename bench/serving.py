"""Serving: throughput, TTFT and TPOT of the paged engine against transformers' batching.

Loads inference/inference-acceleration/examples/paged_attention.py and measures, in one run:

    offline     one workload of mixed lengths (prompt and output lengths uniform in the preset's
                ranges, random prompt tokens, every request makes exactly its output length),
                all requests at once, through the engine with chunked prefill (CUDA graphs for
                decode steps on a GPU), the engine with prefill first, transformers generate on
                padded batches, and transformers' own continuous batching (the manager behind
                `generate_batch`, its warm-up excluded): output tokens/s, TTFT and TPOT
    online      Poisson arrivals at a few request rates for a bounded time, chunked prefill
                against prefill first: TTFT and TPOT percentiles (p50, p90, p99)
    prefix      requests sharing a long system prompt, prefix caching on and off: mean TTFT
                and the hit rate (one earlier request has served the system prompt)
    profile     wall time of one decode step of max_num_seqs sequences, eager and (on a GPU)
                replayed from a CUDA graph, and the GPU time of the graph alone

TTFT: arrival to first output token; TPOT: (last token - first token) / (output tokens - 1).
Writes

    serving-<preset>.{json,md,en.md}          offline throughput, one row per method
    serving-<preset>.png                      tokens/s per method
    serving-<preset>-memory.png               KV slots over the engine's steps: paged vs reserved
    serving-<preset>-latency.{json,md,en.md}  online percentiles, shared prefix, decode profile
    serving-<preset>-latency.png              TTFT and TPOT against request rate

Run: python bench/serving.py --preset cpu
"""

from __future__ import annotations

import random
import statistics
import time
from collections import deque
from pathlib import Path
from typing import Any

import common  # bench/ is on sys.path: it is the folder of the script being run

SCRIPT = common.ACCEL / "examples" / "paged_attention.py"

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "about": "SmolLM2-135M float32, 16 requests (prompt 16-128, output 16-64 tokens), at most "
                 "16 running, 256 tokens a step, 0.25 GiB KV pool in blocks of 16; padded batches "
                 "of 16; online 0.1-0.4 requests/s for 20 s; 12 requests sharing a 256-token prompt",
        "model": "smollm2",
        "device": "cpu",
        "dtype": "float32",
        "num_requests": 16,
        "prompt_len": [16, 128],
        "output_len": [16, 64],
        "block_size": 16,
        "max_num_seqs": 16,
        "max_num_batched_tokens": 256,
        "kv_cache_gib": 0.25,
        "max_model_len": 1024,
        "hf_batch_size": 16,
        "rates": [0.1, 0.2, 0.4],
        "online_seconds": 20,
        "online_max_num_batched_tokens": 256,
        "shared": {"num_requests": 12, "system_len": 256, "suffix_len": [16, 48], "output_len": 8},
        "profile_steps": 5,
        "seed": 0,
        "quick": {"num_requests": 5, "prompt_len": [3, 12], "output_len": [2, 6], "max_num_seqs": 2,
                  "max_num_batched_tokens": 8, "kv_cache_gib": 0.001, "max_model_len": 64,
                  "hf_batch_size": 2, "rates": [4.0, 8.0], "online_seconds": 1,
                  "shared": {"num_requests": 3, "system_len": 16, "suffix_len": [2, 4], "output_len": 2},
                  "profile_steps": 2},
    },
    "h200": {
        "about": "Llama-3-8B shape with random bf16 weights on one GPU, 256 requests (prompt "
                 "32-512, output 32-256), at most 64 running, 8,192 tokens a step, 12 GiB KV pool "
                 "in blocks of 16; padded batches of 64; online 4-16 requests/s for 5 s (2,048 tokens a "
                 "step); 64 "
                 "requests sharing a 1,024-token prompt",
        "model": common.RANDOM_8B,
        "device": "cuda",
        "dtype": "bfloat16",
        "num_requests": 256,
        "prompt_len": [32, 512],
        "output_len": [32, 256],
        "block_size": 16,
        "max_num_seqs": 64,
        "max_num_batched_tokens": 8192,
        "kv_cache_gib": 12,
        "max_model_len": 2048,
        "hf_batch_size": 64,
        "rates": [4.0, 8.0, 16.0],
        "online_seconds": 5,
        "online_max_num_batched_tokens": 2048,
        "shared": {"num_requests": 64, "system_len": 1024, "suffix_len": [16, 64], "output_len": 32},
        "profile_steps": 20,
        "seed": 0,
        "quick": {"num_requests": 8, "prompt_len": [8, 32], "output_len": [4, 16], "max_num_seqs": 4,
                  "kv_cache_gib": 0.5, "hf_batch_size": 4, "rates": [8.0],
                  "online_seconds": 1, "profile_steps": 2,
                  "shared": {"num_requests": 4, "system_len": 32, "suffix_len": [4, 8], "output_len": 4}},
    },
}


# --8<-- [start:static_batches]
def hf_padded_batches(model, prompts: list[list[int]], max_new_tokens: list[int],
                      batch_size: int, pad_token_id: int) -> list[list[int]]:
    """Static batching with transformers generate: requests in arrival order, each batch
    left-padded to its longest prompt and run to its longest output; tokens past a
    request's own length are wasted work. Every request makes exactly its
    max_new_tokens."""
    import torch

    outputs = []
    for i in range(0, len(prompts), batch_size):
        batch, n = prompts[i:i + batch_size], max_new_tokens[i:i + batch_size]
        width = max(map(len, batch))
        # (B, T) each, padding on the left
        ids = torch.tensor([[pad_token_id] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        out = model.generate(input_ids=ids.to(model.device),
                             attention_mask=mask.to(model.device), do_sample=False,
                             max_new_tokens=max(n), min_new_tokens=max(n),
                             pad_token_id=pad_token_id)
        outputs += [row[:k] for row, k in zip(out[:, width:].tolist(), n)]
    return outputs
# --8<-- [end:static_batches]


def hf_continuous(model, prompts: list[list[int]], max_new_tokens: list[int], settings: dict,
                  num_blocks: int) -> float:
    """transformers' own continuous batching (paged cache, its scheduler, its CUDA graphs on a
    GPU), same KV budget; returns the seconds after its warm-up."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    config = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0,
                              max_new_tokens=max(max_new_tokens))
    cb = ContinuousBatchingConfig(block_size=settings["block_size"], num_blocks=num_blocks,
                                  max_batch_tokens=settings["max_num_batched_tokens"],
                                  max_requests_per_batch=settings["max_num_seqs"])
    with model.continuous_batching_context_manager(generation_config=config, warmup=True,
                                                   continuous_batching_config=cb) as manager:
        start = time.perf_counter()
        ids = [manager.add_request(p, max_new_tokens=n) for p, n in zip(prompts, max_new_tokens)]
        done: set[str] = set()
        while len(done) < len(ids):
            out = manager.get_result(timeout=1)
            if out is not None and out.is_finished():
                if out.error:
                    raise RuntimeError(out.error)
                done.add(out.request_id)
        return time.perf_counter() - start


def random_requests(rng: random.Random, n: int, prompt_len: list[int], output_len: list[int],
                    vocab_size: int) -> tuple[list[list[int]], list[int]]:
    lens = [rng.randint(*prompt_len) for _ in range(n)]
    outs = [rng.randint(*output_len) for _ in range(n)]
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


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]   # noqa: E731
    return {"mean": statistics.fmean(ordered), "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99)}


# --8<-- [start:serve]
def serve(engine, prompts: list[list[int]], new_tokens: list[int],
          arrivals: list[float], memory: list | None = None) -> dict[str, Any]:
    """Feed requests to the engine at their arrival times (seconds from now) and time each
    output token as it appears: TTFT = first token - arrival, TPOT = the mean gap after
    it."""
    pending = deque(sorted(zip(arrivals, prompts, new_tokens), key=lambda r: r[0]))
    first: dict[int, float] = {}
    timed: list[tuple[float, float, float, int]] = []  # (arrival, first, last, tokens)
    arrival_of: dict[int, float] = {}
    start = time.perf_counter()
    while pending or engine.scheduler.waiting or engine.scheduler.running:
        now = time.perf_counter() - start
        while pending and pending[0][0] <= now:
            t, prompt, n = pending.popleft()
            arrival_of[id(engine.add_request(prompt, n))] = t
        if not (engine.scheduler.waiting or engine.scheduler.running):
            time.sleep(max(0.0, pending[0][0] - now))  # idle until the next arrival
            continue
        finished = engine.step()
        now = time.perf_counter() - start
        for seq in [*engine.scheduler.running, *finished]:
            if seq.output_ids and id(seq) not in first:
                first[id(seq)] = now
        for seq in finished:
            timed.append((arrival_of[id(seq)], first[id(seq)], now, len(seq.output_ids)))
        if memory is not None:
            running = engine.scheduler.running
            bm = engine.block_manager
            used = len(bm.ref_counts) - len(bm.free_block_ids)
            memory.append((len(running), sum(s.num_tokens - 1 for s in running),
                           used * engine.block_size))
    seconds = time.perf_counter() - start
    ttft = [f - a for a, f, _, _ in timed]
    tpot = [(last - f) / (n - 1) for _, f, last, n in timed if n > 1]
    return {"seconds": seconds, "output_tokens": sum(n for *_, n in timed),
            "requests": len(timed), "ttft_s": percentiles(ttft),
            "tpot_s": percentiles(tpot),
            "steps": engine.num_steps, "preemptions": engine.scheduler.num_preemptions,
            "prefix_hit_tokens": engine.block_manager.num_prefix_hit_tokens}
# --8<-- [end:serve]


class Bench:
    """The model, the engine's settings and the device, shared by every measurement."""

    def __init__(self, pa, model, settings: dict, device, num_blocks: int) -> None:
        self.pa, self.model, self.settings, self.device = pa, model, settings, device
        self.num_blocks = num_blocks

    def engine(self, max_model_len: int | None = None, budget: int | None = None, **options):
        """A fresh engine; CUDA graphs read block tables as wide as max_model_len (by default
        the longest request of the main workload), so it is kept to what the workload needs."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.empty_cache()         # the previous engine's pool and graphs are gone
        s = self.settings
        longest = s["prompt_len"][1] + s["output_len"][1]
        return self.pa.LLMEngine(self.model, self.num_blocks, s["block_size"], s["max_num_seqs"],
                                 budget or s["max_num_batched_tokens"], max_model_len=max_model_len or longest,
                                 **options)

    def offline(self, prompts, new_tokens) -> tuple[list[dict], dict]:
        """Every method on the same workload, all requests at once."""
        s, rows, series = self.settings, [], []
        for name, options in (("paged engine, chunked prefill", {}),
                              ("paged engine, prefill first", {"chunked_prefill": False})):
            run = serve(self.engine(**options), prompts, new_tokens, [0.0] * len(prompts),
                        series if not rows else None)
            rows.append({"method": name, **run})
        start = time.perf_counter()
        hf_padded_batches(self.model, prompts, new_tokens, s["hf_batch_size"], 0)
        rows.append({"method": "transformers generate, padded batches",
                     "seconds": time.perf_counter() - start, "output_tokens": sum(new_tokens)})
        rows.append({"method": "transformers continuous batching",
                     "seconds": hf_continuous(self.model, prompts, new_tokens, s, self.num_blocks),
                     "output_tokens": sum(new_tokens)})
        for row in rows:
            row["tokens_per_s"] = row["output_tokens"] / row["seconds"]
            row["vs_paged_engine"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
            print(f"{row['method']}: {row['tokens_per_s']:.1f} tokens/s", flush=True)
        memory = {"running": [r for r, _, _ in series], "tokens_stored": [t for _, t, _ in series],
                  "slots_reserved": [u for _, _, u in series]}
        return rows, memory

    def online(self, vocab_size: int) -> list[dict]:
        """Poisson arrivals at each rate for online_seconds, both scheduling policies."""
        s, rows = self.settings, []
        for rate in s["rates"]:
            rng = random.Random(s["seed"] + 1)
            arrivals, t = [], rng.expovariate(rate)
            while t < s["online_seconds"]:
                arrivals.append(t)
                t += rng.expovariate(rate)
            prompts, new_tokens = random_requests(rng, len(arrivals), s["prompt_len"],
                                                  s["output_len"], vocab_size)
            for policy, options in (("chunked prefill", {}), ("prefill first", {"chunked_prefill": False})):
                engine = self.engine(budget=s["online_max_num_batched_tokens"], **options)
                run = serve(engine, prompts, new_tokens, arrivals)
                rows.append({"rate": rate, "policy": policy, **run})
                print(f"online {rate}/s {policy}: TTFT p99 {run['ttft_s']['p99']:.3f} s, "
                      f"TPOT p99 {run['tpot_s']['p99'] * 1e3:.1f} ms", flush=True)
        return rows

    def shared_prefix(self, vocab_size: int) -> list[dict]:
        """Requests sharing a system prompt, all at once, after one request has served it."""
        s, sh, rows = self.settings, self.settings["shared"], []
        rng = random.Random(s["seed"] + 2)
        system = [rng.randrange(3, vocab_size) for _ in range(sh["system_len"])]
        suffixes, _ = random_requests(rng, sh["num_requests"], sh["suffix_len"], [1, 1], vocab_size)
        prompts = [system + suffix for suffix in suffixes]
        longest = sh["system_len"] + sh["suffix_len"][1] + sh["output_len"]
        for caching in (True, False):
            engine = self.engine(longest, prefix_caching=caching)
            engine.generate([system + [3]], [1])                 # an earlier user of the prompt
            engine.block_manager.num_prefix_hit_tokens = 0
            run = serve(engine, prompts, [sh["output_len"]] * len(prompts), [0.0] * len(prompts))
            run["hit_rate"] = run["prefix_hit_tokens"] / sum(map(len, prompts))
            rows.append({"prefix_caching": caching, **run})
            print(f"shared prefix, caching {caching}: mean TTFT {run['ttft_s']['mean']:.3f} s, "
                  f"hit rate {run['hit_rate']:.2f}", flush=True)
        return rows

    def profile(self, vocab_size: int) -> list[dict]:
        """Milliseconds per decode step of max_num_seqs sequences, eager and with CUDA graphs."""
        import torch

        s, rows, B = self.settings, [], self.settings["max_num_seqs"]
        prompts, _ = random_requests(random.Random(3), B, [s["prompt_len"][1]] * 2, [1, 1], vocab_size)
        for graphs in ((False, True) if self.device.type == "cuda" else (False,)):
            engine = self.engine(cuda_graphs=graphs)
            for p in prompts:                  # long enough not to finish while measured
                engine.add_request(p, s["output_len"][1])
            while engine.scheduler.waiting or any(
                    q.num_computed_tokens < q.num_tokens - 1 for q in engine.scheduler.running):
                engine.step()                                      # every prompt is prefilled
            common.sync(self.device)
            start = time.perf_counter()
            for _ in range(s["profile_steps"]):
                engine.step()
            row = {"mode": "CUDA graphs" if graphs else "eager", "batch": B,
                   "step_ms": (time.perf_counter() - start) * 1e3 / s["profile_steps"]}
            if graphs:                  # the GPU's own time: one replay, no host work between
                longest = max(len(q.block_table) for q in engine.scheduler.running)
                width = next(w for w in engine.graphs.widths if w >= longest)
                replay = lambda: engine.graphs.graphs[B, width].replay()   # noqa: E731
                row["gpu_ms"] = statistics.median(common.time_ms(replay, self.device, 2, s["profile_steps"]))
            rows.append(row)
            print(f"decode step, {row['mode']}: {row['step_ms']:.1f} ms", flush=True)
        if len(rows) == 2:
            for row in rows:
                row["gpu_ms"] = rows[1]["gpu_ms"]
                row["host_ms"] = max(0.0, row["step_ms"] - row["gpu_ms"])
        return rows


def model_name(settings: dict, lang: str) -> str:
    if settings["model"] == common.RANDOM_8B:
        return "Llama-3-8B 形状随机权重" if lang == "zh" else "Llama-3-8B shape, random weights"
    return Path(settings["model"]).name


def throughput_tables(result: dict) -> dict[str, str]:
    s, w, m = result["settings"], result["workload"], result["memory"]
    caption = {
        "zh": f"{result['hardware']},{model_name(s, 'zh')}({s['dtype']});{w['requests']} 个请求"
              f"同时到达,提示 {s['prompt_len'][0]}–{s['prompt_len'][1]}、输出 {s['output_len'][0]}–"
              f"{s['output_len'][1]} 词元,最多 {s['max_num_seqs']} 个同时运行,每步最多 "
              f"{s['max_num_batched_tokens']:,} 个词元,KV 池 {m['pool_slots']:,} 个槽位(块大小 "
              f"{s['block_size']})。TTFT、TPOT 为中位数。",
        "en": f"{result['hardware']}, {model_name(s, 'en')} ({s['dtype']}); {w['requests']} requests "
              f"at once, prompt {s['prompt_len'][0]}–{s['prompt_len'][1]}, output {s['output_len'][0]}–"
              f"{s['output_len'][1]} tokens, at most {s['max_num_seqs']} running, at most "
              f"{s['max_num_batched_tokens']:,} tokens a step, KV pool of {m['pool_slots']:,} slots "
              f"(blocks of {s['block_size']}). TTFT and TPOT are medians.",
    }
    names = {"paged engine, chunked prefill": "分页引擎,分块预填充",
             "paged engine, prefill first": "分页引擎,预填充优先",
             "transformers generate, padded batches": "transformers generate,填充批",
             "transformers continuous batching": "transformers 自带连续批处理"}
    header = {"zh": ["方法", "tokens/s", "× 分页引擎", "TTFT (s)", "TPOT (ms)"],
              "en": ["method", "tokens/s", "× paged engine", "TTFT (s)", "TPOT (ms)"]}
    out = {}
    for lang in ("zh", "en"):
        rows = [[names[r["method"]] if lang == "zh" else r["method"], f"{r['tokens_per_s']:,.1f}",
                 f"{r['vs_paged_engine']:.2f}",
                 f"{r['ttft_s']['p50']:.2f}" if "ttft_s" in r else "–",
                 f"{r['tpot_s']['p50'] * 1e3:.1f}" if "tpot_s" in r else "–"] for r in result["rows"]]
        out[lang] = caption[lang] + "\n\n" + common.markdown_table(header[lang], rows)
    return out


def latency_tables(result: dict) -> dict[str, str]:
    s, sh = result["settings"], result["settings"]["shared"]
    policy = {"chunked prefill": "分块预填充", "prefill first": "预填充优先"}
    text = {
        "zh": [f"**在线**:{result['hardware']},{model_name(s, 'zh')};泊松到达,每个请求率持续 "
               f"{s['online_seconds']} s,工作负载同上,每步最多 {s['online_max_num_batched_tokens']:,} 个词元。"
               "TTFT 单位 s,TPOT 单位 ms。",
               ["请求率 (个/s)", "调度", "请求数", "TTFT p50", "TTFT p90", "TTFT p99",
                "TPOT p50", "TPOT p90", "TPOT p99"]],
        "en": [f"**Online**: {result['hardware']}, {model_name(s, 'en')}; Poisson arrivals, "
               f"{s['online_seconds']} s at each request rate, the same workload, at most "
               f"{s['online_max_num_batched_tokens']:,} tokens a step. TTFT in s, TPOT in ms.",
               ["rate (requests/s)", "scheduling", "requests", "TTFT p50", "TTFT p90", "TTFT p99",
                "TPOT p50", "TPOT p90", "TPOT p99"]],
    }
    out = {}
    for lang in ("zh", "en"):
        caption, header = text[lang]
        rows = [[f"{r['rate']:g}", policy[r["policy"]] if lang == "zh" else r["policy"], r["requests"],
                 *(f"{r['ttft_s'][q]:.3f}" for q in ("p50", "p90", "p99")),
                 *(f"{r['tpot_s'][q] * 1e3:.1f}" for q in ("p50", "p90", "p99"))] for r in result["online"]]
        parts = [caption, "", common.markdown_table(header, rows)]
        on, off = result["prefix"]
        ratio = off["ttft_s"]["mean"] / on["ttft_s"]["mean"]
        if lang == "zh":
            parts += [f"**共享前缀**:{sh['num_requests']} 个请求同时到达,共享 {sh['system_len']:,} 词元的"
                      f"系统提示(此前已有一个请求用过它),各自再加 {sh['suffix_len'][0]}–{sh['suffix_len'][1]} "
                      f"词元,输出 {sh['output_len']} 词元。开启前缀缓存,平均 TTFT 降为关闭时的 1/{ratio:.1f}。", "",
                      common.markdown_table(["前缀缓存", "平均 TTFT (s)", "TTFT p99 (s)", "命中率", "总时间 (s)"],
                                            [["开" if r["prefix_caching"] else "关", f"{r['ttft_s']['mean']:.3f}",
                                              f"{r['ttft_s']['p99']:.3f}", f"{r['hit_rate']:.0%}",
                                              f"{r['seconds']:.2f}"] for r in result["prefix"]])]
        else:
            parts += [f"**Shared prefix**: {sh['num_requests']} requests at once sharing a "
                      f"{sh['system_len']:,}-token system prompt (one earlier request has used it), each "
                      f"with {sh['suffix_len'][0]}–{sh['suffix_len'][1]} tokens of its own, {sh['output_len']} "
                      f"output tokens. With prefix caching, mean TTFT is {ratio:.1f}× lower.", "",
                      common.markdown_table(["prefix caching", "mean TTFT (s)", "TTFT p99 (s)", "hit rate",
                                             "total (s)"],
                                            [["on" if r["prefix_caching"] else "off", f"{r['ttft_s']['mean']:.3f}",
                                              f"{r['ttft_s']['p99']:.3f}", f"{r['hit_rate']:.0%}",
                                              f"{r['seconds']:.2f}"] for r in result["prefix"]])]
        if len(result["profile"]) == 2:
            eager, graphs = result["profile"]
            header = (["解码一步", "墙钟 (ms)", "GPU (ms)", "主机 (ms)"] if lang == "zh"
                      else ["decode step", "wall (ms)", "GPU (ms)", "host (ms)"])
            label = {"eager": "逐算子 (eager)", "CUDA graphs": "CUDA 图"} if lang == "zh" else {}
            parts += ["", (f"**解码一步的剖析**:{eager['batch']} 个序列;GPU 时间为单独重放 CUDA 图所测,"
                           "主机时间 = 墙钟 − GPU。" if lang == "zh" else
                           f"**One decode step**: {eager['batch']} sequences; GPU time is one CUDA-graph "
                           "replay alone, host time = wall − GPU."), "",
                      common.markdown_table(header, [[label.get(r["mode"], r["mode"]), f"{r['step_ms']:.1f}",
                                                      f"{r['gpu_ms']:.1f}", f"{r['host_ms']:.1f}"]
                                                     for r in result["profile"]])]
        out[lang] = "\n".join(parts)
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


def plot_latency(result: dict):
    def draw(path: Path) -> None:
        fig, ax = common.new_figure(width=9.0, height=3.8)
        fig.delaxes(ax)
        left, right = fig.subplots(1, 2)
        for policy, style in (("chunked prefill", "-o"), ("prefill first", "--s")):
            rows = [r for r in result["online"] if r["policy"] == policy]
            rates = [r["rate"] for r in rows]
            left.plot(rates, [r["ttft_s"]["p99"] for r in rows], style, label=policy)
            right.plot(rates, [r["tpot_s"]["p99"] * 1e3 for r in rows], style, label=policy)
        left.set(xlabel="request rate (requests/s)", ylabel="TTFT p99 (s)", title="Time to first token")
        right.set(xlabel="request rate (requests/s)", ylabel="TPOT p99 (ms)", title="Time per output token")
        left.legend(fontsize=10)
        common.save_figure(fig, path)
    return draw


def main(args) -> None:
    settings, folder, device, dtype = common.start(PRESETS, args, common.ACCEL / "results")
    pa = common.load_script(SCRIPT)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = load_model(settings, device, dtype)
    if model.config.model_type not in ("llama", "qwen2", "qwen3"):
        common.fail(f"{settings['model']} is a {model.config.model_type} model: use a Llama or Qwen model")
    model.generation_config.eos_token_id = None      # every request makes exactly its length
    per_token = kv_bytes_per_token(model)
    num_blocks = int(settings["kv_cache_gib"] * 2**30 // (per_token * settings["block_size"]))
    vocab = model.config.vocab_size
    prompts, new_tokens = random_requests(random.Random(settings["seed"]), settings["num_requests"],
                                          settings["prompt_len"], settings["output_len"], vocab)
    longest = max(max(len(p) + n for p, n in zip(prompts, new_tokens)),
                  settings["shared"]["system_len"] + settings["shared"]["suffix_len"][1]
                  + settings["shared"]["output_len"])
    if longest > min(num_blocks * settings["block_size"], settings["max_model_len"]):
        common.fail(f"a request of {longest} tokens does not fit the KV pool or max_model_len: "
                    "raise kv_cache_gib / max_model_len in the preset")
    bench = Bench(pa, model, settings, device, num_blocks)
    # Warm-up (first calls, allocator, kernel selection): excluded from the timings, recorded.
    warm = {"engine": lambda: bench.engine().generate(prompts[:2], [4, 4]),
            "transformers": lambda: hf_padded_batches(model, prompts[:2], [4, 4], 2, 0)}
    warmup_s = {name: common.time_ms(fn, device, warmup=0, repeats=1)[0] / 1e3 for name, fn in warm.items()}
    header = common.results_header(settings, args, device)
    rows, series = bench.offline(prompts, new_tokens)
    memory = {"kv_bytes_per_token": per_token, "num_blocks": num_blocks,
              "pool_slots": num_blocks * settings["block_size"], "max_model_len": settings["max_model_len"],
              "peak_running": max(series["running"]),
              "paged_peak_slots": max(series["slots_reserved"]),
              "mean_paged_utilization": sum(series["tokens_stored"]) / max(1, sum(series["slots_reserved"])),
              "series": series}
    result = {**header, "workload": {"requests": len(prompts), "prompt_tokens": sum(map(len, prompts)),
                                     "output_tokens": sum(new_tokens)},
              "warmup_seconds": warmup_s, "rows": rows, "memory": memory}
    latency = {**header, "online": bench.online(vocab), "prefix": bench.shared_prefix(vocab),
               "profile": bench.profile(vocab)}
    written = common.write_results(folder, f"serving-{args.preset}", result, throughput_tables(result),
                                   {"": plot_throughput(result), "-memory": plot_memory(result)})
    written += common.write_results(folder, f"serving-{args.preset}-latency", latency,
                                    latency_tables(latency), {"": plot_latency(latency)})
    print(throughput_tables(result)["en"])
    print(latency_tables(latency)["en"])
    print("wrote " + ", ".join(path.name for path in written))


if __name__ == "__main__":
    common.run_main(main, common.bench_parser(__doc__, PRESETS))
