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
    cpu_path, gpu_path = ACCEL / "kv_cache_optimization-cpu.json", ACCEL / "kv_cache_optimization-h200.json"
    cpu, gpu = load(cpu_path), load(gpu_path)
    gen = cpu["generate"]
    speedup = gen["use_cache=False"]["seconds"] / gen["use_cache=True"]["seconds"]
    new, prompt = cpu["loop"]["new_tokens"], cpu["loop"]["prompt_tokens"]
    short, long = gpu["sweep"][0], gpu["sweep"][-1]
    zh = [
        ("KV Cache", f"`generate` 快 {speedup:.1f} 倍", f"CPU，SmolLM2-135M fp32，提示 {prompt} 词元 + 生成 {new} 词元，批大小 1", source(cpu_path)),
        ("KV Cache", f"上下文 {long['context']} 时每步快 {long['ratio']:.1f} 倍，{short['context']} 时 {short['ratio']:.1f} 倍；"
                     f"带缓存的一步只到带宽上限的 {long['roofline_fraction']:.2f}（即时执行受主机开销限制）",
         "H200，Llama-3-8B 形状随机 bf16 权重，即时执行 (eager)，批大小 1，中位数", source(gpu_path)),
    ]
    en = [
        ("KV cache", f"`generate` {speedup:.1f}× faster", f"CPU, SmolLM2-135M fp32, {prompt}-token prompt + {new} new tokens, batch 1", source(cpu_path)),
        ("KV cache", f"a step {long['ratio']:.1f}× faster at context {long['context']}, {short['ratio']:.1f}× at {short['context']}; "
                     f"the cached step reaches {long['roofline_fraction']:.2f} of the bandwidth limit (eager code is host-bound)",
         "H200, Llama-3-8B shape with random bf16 weights, eager, batch 1, medians", source(gpu_path)),
    ]
    return zh, en


def flash_rows() -> tuple[list[Row], list[Row]]:
    path = ACCEL / "flash_attention-h200.json"
    data = load(path)
    setup = data["setup"]
    T = 4096
    by_impl = {row["impl"]: row for row in data["benchmark"] if row["T"] == T}
    math, flash = by_impl["sdpa-math"], by_impl["sdpa-flash"]
    best = min((row for row in by_impl.values() if row.get("status") == "ok"), key=lambda row: row["ms"])
    cond_zh = f"H200，注意力算子单独计时，B={setup['batch']}、H={setup['heads']}、D={setup['head_dim']}、T={T}、因果、bf16"
    cond_en = f"H200, the attention op alone, B={setup['batch']}, H={setup['heads']}, D={setup['head_dim']}, T={T}, causal, bf16"
    ratio_flash, ratio_best = math["ms"] / flash["ms"], math["ms"] / best["ms"]
    memory = math["peak_extra_gib"] / flash["peak_extra_gib"]
    zh = [("FlashAttention", f"SDPA flash 比 math 快 {ratio_flash:.0f} 倍（{best['impl']} {ratio_best:.0f} 倍），额外显存少 {memory:.0f} 倍", cond_zh, source(path))]
    en = [("FlashAttention", f"SDPA flash {ratio_flash:.0f}× faster than math ({best['impl']} {ratio_best:.0f}×), {memory:.0f}× less extra memory", cond_en, source(path))]
    return zh, en


def rows_by_method(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["method"]: row for row in rows}


def batching_rows() -> tuple[list[Row], list[Row]]:
    path = ACCEL / "serving-h200.json"
    data = load(path)
    rows = rows_by_method(data["rows"])
    engine = rows["paged engine, chunked prefill"]["tokens_per_s"]
    padded = rows["transformers generate, padded batches"]["tokens_per_s"]
    n = data["workload"]["requests"]
    zh_extra = en_extra = ""
    if "transformers continuous batching" in rows:
        ratio = engine / rows["transformers continuous batching"]["tokens_per_s"]
        zh_extra, en_extra = f"；对 transformers 自带的连续批处理 {ratio:.2f} 倍", f"; {ratio:.2f}× transformers' own continuous batching"
    zh = [("分页 KV + 连续批处理（我们的引擎）", f"对 transformers 填充批处理 {engine / padded:.2f} 倍{zh_extra}",
           f"H200，Llama-3-8B 形状随机 bf16 权重，{n} 个长度混合的请求", source(path))]
    en = [("Paged KV + continuous batching (our engine)", f"{engine / padded:.2f}× transformers' padded batches{en_extra}",
           f"H200, Llama-3-8B shape with random bf16 weights, {n} requests of mixed lengths", source(path))]
    return zh, en


def vllm_rows() -> tuple[list[Row], list[Row]]:
    path = ACCEL / "vllm-cpu.json"
    compare = load(path)["compare"]
    rows = rows_by_method(compare["rows"])

    def tokens_per_s(prefix: str) -> float:
        return next(row["tokens_per_s"] for name, row in rows.items() if name.startswith(prefix))

    vllm = tokens_per_s("vLLM")
    padded, single = tokens_per_s("transformers generate, padded"), tokens_per_s("transformers generate, one request")
    n = compare["requests"]
    zh = [("vLLM", f"对 transformers 填充批处理 {vllm / padded:.1f} 倍；对逐条请求 {vllm / single:.1f} 倍",
           f"CPU（社区版 vllm-cpu），SmolLM2-135M fp32，{n} 个长度混合的请求", source(path))]
    en = [("vLLM", f"{vllm / padded:.1f}× transformers' padded batches; {vllm / single:.1f}× one request at a time",
           f"CPU (the community build vllm-cpu), SmolLM2-135M fp32, {n} requests of mixed lengths", source(path))]
    return zh, en


def fast_decode_rows() -> tuple[list[Row], list[Row]]:
    path = ACCEL / "fast_decode-h200.json"
    runs = {(run["variant"], run["batch_size"]): run for run in load(path)["runs"]}
    hf, bf16, int8 = (runs[(v, 1)] for v in ("hf_generate", "fused_bf16", "fused_int8"))
    int4 = max((runs[(v, 1)] for v in ("fused_int4", "int4_tinygemm")), key=lambda run: run["tokens_per_s"])
    cond_zh = "H200，Llama-3-8B 形状随机 bf16 权重，批大小 1，提示 128 词元"
    cond_en = "H200, Llama-3-8B shape with random bf16 weights, batch 1, 128-token prompt"
    zh = [
        ("CUDA Graph + 融合 GEMV（单条解码）", f"{bf16['tokens_per_s']:.0f} tokens/s，是 transformers `generate` 的 {bf16['tokens_per_s'] / hf['tokens_per_s']:.0f} 倍，达到带宽上限的 {bf16['roofline_fraction']:.0%}", cond_zh, source(path)),
        ("INT8 / INT4 仅权重量化（单条解码）", f"INT8 是 bf16 的 {int8['tokens_per_s'] / bf16['tokens_per_s']:.2f} 倍，INT4（{int4['variant']}）是 {int4['tokens_per_s'] / bf16['tokens_per_s']:.2f} 倍", cond_zh, source(path)),
    ]
    en = [
        ("CUDA graph + fused GEMV (single-sequence decode)", f"{bf16['tokens_per_s']:.0f} tokens/s, {bf16['tokens_per_s'] / hf['tokens_per_s']:.0f}× transformers `generate`, {bf16['roofline_fraction']:.0%} of the bandwidth limit", cond_en, source(path)),
        ("INT8 / INT4 weight-only (single-sequence decode)", f"INT8 {int8['tokens_per_s'] / bf16['tokens_per_s']:.2f}× bf16, INT4 ({int4['variant']}) {int4['tokens_per_s'] / bf16['tokens_per_s']:.2f}×", cond_en, source(path)),
    ]
    return zh, en


def quality_rows() -> tuple[list[Row], list[Row]]:
    path = QUANT / "quality-cpu.json"
    rows = load(path)["rows"]

    def ppl(method: str, impl: str, bits: int, sym: bool) -> float:
        return next(r["perplexity"] for r in rows
                    if (r["method"], r["impl"], r["bits"], r["sym"]) == (method, impl, bits, sym))

    fp = next(r["perplexity"] for r in rows if r["method"] == "fp")
    rtn, gptq, awq = (ppl(m, "scratch", 4, False) for m in ("rtn", "gptq", "awq"))
    zh = [("GPTQ / AWQ（4 位，非对称，组 64）", f"困惑度 {fp:.2f} → RTN {rtn:.2f}、GPTQ {gptq:.2f}、AWQ {awq:.2f}",
           "CPU，SmolLM2-135M，同一批评测词元", source(path))]
    en = [("GPTQ / AWQ (4-bit, asymmetric, group 64)", f"perplexity {fp:.2f} → RTN {rtn:.2f}, GPTQ {gptq:.2f}, AWQ {awq:.2f}",
           "CPU, SmolLM2-135M, the same evaluation tokens", source(path))]
    return zh, en


def table(rows: list[Row], header: tuple[str, str, str, str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for technique, figure, conditions, file in rows:
        lines.append(f"| {technique} | {figure} | {conditions} | `{file}` |")
    return "\n".join(lines) + "\n"


def render() -> dict[Path, str]:
    zh_rows: list[Row] = []
    en_rows: list[Row] = []
    for section in (quality_rows, kv_cache_rows, flash_rows, batching_rows, vllm_rows, fast_decode_rows):
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
