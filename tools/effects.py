"""Write the index page's effect tables from the results files, in Chinese and English.

The module index (`inference/README.md` and its twin) summarizes what each optimization bought, one
line per technique. Those lines must come from measurements, so this script reads the results JSON
files and writes `inference/results/effects.md` and `effects.en.md`, which the index includes.
`tests/test_effects.py` re-runs it and fails when a results file changed and the tables did not.

Run: python tools/effects.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
ACCEL = REPO_ROOT / "inference" / "inference-acceleration" / "results"
QUANT = REPO_ROOT / "inference" / "quantization" / "results"
OUT_DIR = REPO_ROOT / "inference" / "results"

Row = tuple[str, str, str, str]  # technique, figure, conditions, source file


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def source(path: Path) -> str:
    return path.relative_to(REPO_ROOT / "inference").as_posix()


def kv_cache_rows() -> tuple[list[Row], list[Row]]:
    cpu_path, gpu_path = ACCEL / "kv_cache_optimization-cpu.json", ACCEL / "kv_cache_optimization-h100.json"
    cpu, gpu = load(cpu_path), load(gpu_path)
    gen = cpu["generate"]
    speedup = gen["use_cache=False"]["seconds"] / gen["use_cache=True"]["seconds"]
    new, prompt = cpu["loop"]["new_tokens"], cpu["loop"]["prompt_tokens"]
    short, long = gpu["sweep"][0], gpu["sweep"][-1]
    zh = [
        ("KV Cache", f"`generate` 快 {speedup:.1f} 倍", f"CPU，SmolLM2-135M fp32，提示 {prompt} 词元 + 生成 {new} 词元，批大小 1", source(cpu_path)),
        ("KV Cache", f"上下文 {long['context']} 时每步快 {long['ratio']:.1f} 倍；{short['context']} 时 {short['ratio']:.1f} 倍（逐个启动内核的开销占主导）",
         "H100，Llama-3-8B 形状随机 bf16 权重，即时执行 (eager)，批大小 1", source(gpu_path)),
    ]
    en = [
        ("KV cache", f"`generate` {speedup:.1f}× faster", f"CPU, SmolLM2-135M fp32, {prompt}-token prompt + {new} new tokens, batch 1", source(cpu_path)),
        ("KV cache", f"a step {long['ratio']:.1f}× faster at context {long['context']}; {short['ratio']:.1f}× at {short['context']} (kernel-launch overhead dominates)",
         "H100, Llama-3-8B shape with random bf16 weights, eager, batch 1", source(gpu_path)),
    ]
    return zh, en


def flash_rows() -> tuple[list[Row], list[Row]]:
    path = ACCEL / "flash_attention-h100.json"
    data = load(path)
    setup = data["setup"]
    T = 4096
    by_impl = {row["impl"]: row for row in data["benchmark"] if row["T"] == T}
    math, flash = by_impl["sdpa-math"], by_impl["sdpa-flash"]
    best = min((row for row in by_impl.values() if row.get("status") == "ok"), key=lambda row: row["ms"])
    cond_zh = f"H100，注意力算子单独计时，B={setup['batch']}、H={setup['heads']}、D={setup['head_dim']}、T={T}、因果、bf16"
    cond_en = f"H100, the attention op alone, B={setup['batch']}, H={setup['heads']}, D={setup['head_dim']}, T={T}, causal, bf16"
    ratio_flash, ratio_best = math["ms"] / flash["ms"], math["ms"] / best["ms"]
    memory = math["peak_extra_gib"] / flash["peak_extra_gib"]
    zh = [("FlashAttention", f"SDPA flash 比 math 快 {ratio_flash:.0f} 倍（{best['impl']} {ratio_best:.0f} 倍），额外显存少 {memory:.0f} 倍", cond_zh, source(path))]
    en = [("FlashAttention", f"SDPA flash {ratio_flash:.0f}× faster than math ({best['impl']} {ratio_best:.0f}×), {memory:.0f}× less extra memory", cond_en, source(path))]
    return zh, en


def batching_rows() -> tuple[list[Row], list[Row]]:
    path = ACCEL / "paged_attention-h100.json"
    bench = load(path)["bench"]
    throughput = bench["throughput"]
    engine = throughput["paged engine, continuous batching"]["tokens_per_s"]
    padded = next(v for k, v in throughput.items() if k.startswith("transformers generate, padded"))
    single = next(v for k, v in throughput.items() if k.startswith("transformers generate, one request"))
    n = bench["workload"].split(" requests")[0]
    zh = [("分页 KV + 连续批处理（我们的引擎）",
           f"对 transformers 填充批处理 {engine / padded['tokens_per_s']:.2f} 倍；对逐条请求 {engine / single['tokens_per_s']:.0f} 倍（逐条只测了前 {single['requests_measured']} 个请求）",
           f"H100，Llama-3-8B 形状随机 bf16 权重，{n} 个请求，长度混合", source(path))]
    en = [("Paged KV + continuous batching (our engine)",
           f"{engine / padded['tokens_per_s']:.2f}× transformers' padded batches; {engine / single['tokens_per_s']:.0f}× one request at a time (measured on the first {single['requests_measured']} requests)",
           f"H100, Llama-3-8B shape with random bf16 weights, {n} requests of mixed lengths", source(path))]
    return zh, en


def vllm_rows() -> tuple[list[Row], list[Row]]:
    path = ACCEL / "vllm_example-cpu.json"
    compare = load(path)["compare"]
    rows = compare["rows"]

    def tokens_per_s(prefix: str) -> float:
        return next(row["tokens_per_s"] for name, row in rows.items() if name.startswith(prefix))

    vllm = tokens_per_s("vLLM")
    padded, single = tokens_per_s("transformers generate, padded"), tokens_per_s("transformers generate, one request")
    n = compare["workload"].split(" requests")[0]
    zh = [("vLLM", f"对 transformers 填充批处理 {vllm / padded:.1f} 倍；对逐条请求 {vllm / single:.1f} 倍",
           f"CPU（vLLM CPU 版），SmolLM2-135M fp32，{n} 个长度混合的请求", source(path))]
    en = [("vLLM", f"{vllm / padded:.1f}× transformers' padded batches; {vllm / single:.1f}× one request at a time",
           f"CPU (vLLM's CPU build), SmolLM2-135M fp32, {n} requests of mixed lengths", source(path))]
    return zh, en


def fast_decode_rows() -> tuple[list[Row], list[Row]]:
    path = ACCEL / "fast_decode-h100.json"
    runs = {(run["variant"], run["batch_size"]): run for run in load(path)["runs"]}
    hf, bf16, int8, int4 = (runs[(v, 1)] for v in ("hf_generate", "bf16", "int8", "int4"))
    cond_zh = "H100，Llama-3-8B 形状随机 bf16 权重，批大小 1，提示 128 词元"
    cond_en = "H100, Llama-3-8B shape with random bf16 weights, batch 1, 128-token prompt"
    zh = [
        ("CUDA Graph + 融合 GEMV（单条解码）", f"{bf16['tokens_per_s']:.0f} tokens/s，是 transformers `generate` 的 {bf16['tokens_per_s'] / hf['tokens_per_s']:.0f} 倍，达到带宽上限的 {bf16['roofline_fraction']:.0%}", cond_zh, source(path)),
        ("INT8 / INT4 仅权重量化（单条解码）", f"INT8 是 bf16 的 {int8['tokens_per_s'] / bf16['tokens_per_s']:.2f} 倍，INT4 是 {int4['tokens_per_s'] / bf16['tokens_per_s']:.2f} 倍", cond_zh, source(path)),
    ]
    en = [
        ("CUDA graph + fused GEMV (single-sequence decode)", f"{bf16['tokens_per_s']:.0f} tokens/s, {bf16['tokens_per_s'] / hf['tokens_per_s']:.0f}× transformers `generate`, {bf16['roofline_fraction']:.0%} of the bandwidth limit", cond_en, source(path)),
        ("INT8 / INT4 weight-only (single-sequence decode)", f"INT8 {int8['tokens_per_s'] / bf16['tokens_per_s']:.2f}× bf16, INT4 {int4['tokens_per_s'] / bf16['tokens_per_s']:.2f}×", cond_en, source(path)),
    ]
    return zh, en


def table(rows: list[Row], header: tuple[str, str, str, str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for technique, figure, conditions, file in rows:
        lines.append(f"| {technique} | {figure} | {conditions} | `{file}` |")
    return "\n".join(lines) + "\n"


def render() -> dict[Path, str]:
    zh_rows: list[Row] = []
    en_rows: list[Row] = []
    for section in (kv_cache_rows, flash_rows, batching_rows, vllm_rows, fast_decode_rows):
        zh, en = section()
        zh_rows += zh
        en_rows += en
    return {
        OUT_DIR / "effects.md": table(zh_rows, ("优化", "我们测得", "条件", "结果文件")),
        OUT_DIR / "effects.en.md": table(en_rows, ("Optimization", "Measured here", "Conditions", "Results file")),
    }


def main() -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for path, text in render().items():
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
