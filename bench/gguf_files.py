"""GGUF files of the small model: size, quality and llama.cpp speed, ours and llama.cpp's quantizer.

Loads inference/quantization/examples/gguf_example.py, writes one GGUF file per type (F16, Q8_0,
Q4_0) with it and reads each back; where llama-cpp-python is installed, llama.cpp's quantizer
turns the F16 file into k-quant and i-quant files three ways: without an importance matrix, with
a uniform one (its weighted search without activation statistics), and with one computed on
calibration text that the evaluation never sees. Every file is loaded through transformers and
compared with the FP32 model on the same evaluation tokens (perplexity with its
standard error, mean KL divergence, top-1 agreement; windows of `context` tokens), and llama.cpp
times its greedy generation on every file, the files taking turns (one warm-up round, then repeats).

    gguf-<preset>.{json,md,en.md,png}

Run: python bench/gguf_files.py --preset cpu
"""

from __future__ import annotations

import importlib.util
import math
import tempfile
from pathlib import Path

import numpy as np

import common  # bench/ is on sys.path: it is the folder of the script being run

PRESETS = {
    "cpu": {
        "about": "SmolLM2-135M as GGUF: F16, Q8_0, Q4_0 (ours), Q4_K_M, Q5_K_M, IQ4_XS (llama.cpp, "
                 "no, uniform and calibrated imatrix); 4096 evaluation tokens; llama.cpp on 1 thread",
        "model": "smollm2",
        "device": "cpu",
        "types": ["F16", "Q8_0", "Q4_0"],
        "llama_cpp_types": ["Q4_K_M", "Q5_K_M", "IQ4_XS"],
        "imatrix_tokens": 4096,
        "tokenizer_pre": "smollm",
        "eval_tokens": 4096,
        "context": 512,
        "threads": 1,
        "prompt": "The capital of France is",
        "max_new_tokens": 64,
        "repeats": 5,
        "quick": {"types": ["F16", "Q4_0"], "llama_cpp_types": ["Q4_K_M"], "imatrix_tokens": 128,
                  "tokenizer_pre": "gpt-2", "eval_tokens": 128, "context": 64, "max_new_tokens": 8,
                  "repeats": 1},
    },
}

SCRIPT = common.QUANT / "examples" / "gguf_example.py"
NOT_INSTALLED = "not run: llama-cpp-python not installed"
# llama.cpp's quantizer three ways: no importance matrix (its plain encoders), a matrix of ones (the
# weighted search with no activation statistics), and the matrix from calibration text.
VARIANTS = {"llama.cpp": "plain", "llama.cpp + uniform imatrix": "uniform", "llama.cpp + imatrix": "imatrix"}


def quality(ge, reference, candidate, ids, context: int) -> dict:
    """Perplexity ± standard error (delta method), mean KL and top-1 over windows of `context`."""
    import torch

    parts: dict[str, list] = {"nll_ref": [], "nll": [], "kl": [], "top1": []}
    for start in range(0, ids.shape[1] - 1, context):
        window = ids[:, start:start + context + 1]  # (1, T+1)
        if window.shape[1] < 2:
            break
        for key, value in ge.next_token_agreement(reference, candidate, window).items():
            parts[key].append(value)
    cat = {key: torch.cat(values) for key, values in parts.items()}

    def ppl(nll):
        value = math.exp(nll.mean().item())
        return value, value * nll.std().item() / math.sqrt(len(nll))

    (p, se), (p_ref, se_ref) = ppl(cat["nll"]), ppl(cat["nll_ref"])
    return {"perplexity": p, "ppl_stderr": se, "kl": cat["kl"].mean().item(),
            "top1": cat["top1"].mean().item(), "eval_tokens": len(cat["nll"]),
            "fp32": {"perplexity": p_ref, "ppl_stderr": se_ref}}


def llama_cpp_speeds(ge, paths: list[Path], settings: dict) -> list[dict]:
    """Greedy text of each file (the example's call), then tokens/s over exactly
    `max_new_tokens` new tokens (end-of-sequence banned, so every file generates as many).
    The files take turns, one generation each per round, after one warm-up round: a slow
    stretch of a shared machine then lands on every file alike, not on whichever ran then."""
    import time

    runs = []
    for path in paths:
        llm = ge.load_llama_cpp(path, settings["threads"])
        text, _ = ge.generate_llama_cpp(llm, settings["prompt"], settings["max_new_tokens"])
        runs.append({"llm": llm, "text": text, "no_eos": {llm.token_eos(): -1e9}, "ms": []})

    def generate(run: dict) -> int:
        out = run["llm"](settings["prompt"], max_tokens=settings["max_new_tokens"], temperature=0.0,
                         logit_bias=run["no_eos"])
        return out["usage"]["completion_tokens"]

    n_new = [generate(run) for run in runs]  # warm-up round
    for _ in range(settings["repeats"]):
        for run in runs:
            start = time.perf_counter()
            generate(run)
            run["ms"].append((time.perf_counter() - start) * 1e3)
    speeds = []
    for run, n in zip(runs, n_new):
        ms = common.spread(run["ms"])
        speeds.append({"text": run["text"], "new_tokens": n, "ms": ms, "threads": settings["threads"],
                       "tokens_per_s": n / (ms["median"] / 1e3)})
    return speeds


def write_files(ge, model, tokenizer, tensors, settings: dict, device, have_llama_cpp: bool,
                folder: Path) -> list[tuple[str, str, Path, dict | None]]:
    """Our files (gguf-py), then llama.cpp's quantizer on our F16 file, without and with an
    importance matrix from calibration text: (type, made by, path, what ours decode to)."""
    stem = folder / Path(settings["model"]).name

    def ours(qtype: str) -> tuple[str, str, Path, dict]:
        path = Path(f"{stem}-{qtype}.gguf")
        header = lambda w: ge.add_metadata(w, model.config, tokenizer, qtype, settings["tokenizer_pre"])
        return qtype, "gguf-py", path, ge.write_gguf(path, tensors, qtype, header, quiet=True)

    files = [ours(qtype) for qtype in settings["types"]]
    if not (have_llama_cpp and settings["llama_cpp_types"]):
        return files
    source = Path(f"{stem}-F16.gguf")
    if not source.exists():
        ours("F16")
    calibration = tokenizer(common.pydoc_corpus()[0], return_tensors="pt")["input_ids"]
    imatrix = ge.importance_matrix(model, calibration[:, : settings["imatrix_tokens"]].to(device),
                                   settings["context"])
    matrices = {"plain": None, "uniform": {name: np.ones_like(v) for name, v in imatrix.items()},
                "imatrix": imatrix}
    for qtype in settings["llama_cpp_types"]:
        for made_by, kind in VARIANTS.items():
            path = Path(f"{stem}-{qtype}-{kind}.gguf")
            ge.llama_cpp_quantize(source, path, qtype, matrices[kind], threads=settings["threads"])
            files.append((qtype, made_by, path, None))
    return files


def tables(result: dict) -> dict[str, str]:
    s, fp, v = result["settings"], result["fp32"], result["versions"]
    ran = result["llama_cpp"] == "ran"
    speed_zh = (f"llama.cpp 每秒词元数:{s['repeats']} 轮贪心生成({s['max_new_tokens']} 个词元,"
                f"各文件轮流)的中位数,{s['threads']} 个线程" if ran else "llama.cpp:未运行(未安装 llama-cpp-python)")
    speed_en = (f"llama.cpp tokens/s: median of {s['repeats']} rounds of greedy generations of "
                f"{s['max_new_tokens']} tokens, the files taking turns, {s['threads']} thread(s)"
                if ran else f"llama.cpp: {NOT_INSTALLED}")
    made_zh = (f"其余文件由 llama.cpp 的量化器(llama-cpp-python {v.get('llama_cpp_python', '?')})从 F16 文件生成,"
               f"imatrix 是 {s['imatrix_tokens']} 个校准词元上算出的重要性矩阵,"
               f"uniform imatrix 是全 1 的矩阵;" if ran else "")
    made_en = (f"the other files made from the F16 file by llama.cpp's quantizer (llama-cpp-python "
               f"{v.get('llama_cpp_python', '?')}); imatrix: the importance matrix of {s['imatrix_tokens']} "
               f"calibration tokens, uniform imatrix: all ones; " if ran else "")
    caption = {
        "zh": f"`{Path(s['model']).name}`:{', '.join(s['types'])} 用 gguf {v.get('gguf', '?')} 写成;{made_zh}"
              f"质量:{fp['eval_tokens']} 个评测词元(上下文 {s['context']}),与 FP32 模型对比,"
              f"GGUF 经 transformers 读回(加载后反量化为 FP32,每个模型 {fp['param_mb']:.0f} MB);"
              f"{speed_zh}。{result['hardware']}。",
        "en": f"`{Path(s['model']).name}`: {', '.join(s['types'])} written with gguf {v.get('gguf', '?')}; "
              f"{made_en}quality on {fp['eval_tokens']} evaluation tokens (context {s['context']}) against "
              f"the FP32 model, GGUF loaded back through transformers (dequantized to FP32 on load, "
              f"{fp['param_mb']:.0f} MB each); {speed_en}. {result['hardware']}.",
    }
    header = {"zh": ["文件", "由谁量化", "大小 (MB)", "比特/权重", "线性层权重误差", "困惑度", "KL", "top-1 一致率",
                     "llama.cpp 词元/秒"],
              "en": ["file", "made by", "size (MB)", "bits/weight", "linear-weight error", "perplexity", "KL",
                     "top-1", "llama.cpp tokens/s"]}
    rows = [["FP32", "transformers", "-", "32", "0", f"{fp['perplexity']:.3f} ± {fp['ppl_stderr']:.3f}",
             "0", "1", "-"]]
    types = []
    for r in result["rows"]:
        speed = f"{r['llama_cpp']['tokens_per_s']:.0f}" if "llama_cpp" in r else "-"
        rows.append([r["qtype"], r["made_by"], f"{r['file_mb']:.1f}", f"{r['bits_per_weight']:.2f}",
                     f"{r['linear_rel_error']:.4f}", f"{r['perplexity']:.3f} ± {r['ppl_stderr']:.3f}",
                     f"{r['kl']:.4f}", f"{r['top1']:.3f}", speed])
        counts = sorted(r["tensor_types"].items(), key=lambda kv: -kv[1])
        types.append([r["qtype"], r["made_by"], ", ".join(f"{t} × {n}" for t, n in counts)])
    types_header = {"zh": ["文件", "由谁量化", "各 GGML 类型的张量数"],
                    "en": ["file", "made by", "tensors per GGML type"]}
    return {lang: caption[lang] + "\n\n" + common.markdown_table(header[lang], rows) + "\n\n"
            + common.markdown_table(types_header[lang], types) for lang in ("zh", "en")}


def plot_perplexity(result: dict):
    def draw(path: Path) -> None:
        fig, ax = common.new_figure()
        rows = result["rows"]
        ax.errorbar([r["bits_per_weight"] for r in rows], [r["perplexity"] for r in rows],
                    yerr=[r["ppl_stderr"] for r in rows], fmt="o", capsize=4)
        for r in rows:
            label = r["qtype"] + r["made_by"].removeprefix("llama.cpp").replace(" imatrix", "")
            ax.annotate(label, (r["bits_per_weight"], r["perplexity"]), textcoords="offset points",
                        xytext=(6, 4))
        ax.axhline(result["fp32"]["perplexity"], linestyle="--", color="gray", label="FP32")
        ax.set_xlabel("bits per weight (file size × 8 / parameters)")
        ax.set_ylabel("perplexity (± standard error)")
        ax.set_title(f"GGUF perplexity by size, {Path(result['settings']['model']).name}")
        ax.grid(True, alpha=0.3)
        ax.legend()
        common.save_figure(fig, path)
    return draw


def main(args) -> None:
    settings = common.resolve_preset(PRESETS, args)
    folder = common.results_dir(args, common.QUANT / "results")
    device = common.resolve_device(settings["device"])
    ge = common.load_script(SCRIPT)
    ge.hf_logging.disable_progress_bar()
    try:
        model, tokenizer = ge.load_model(settings["model"], device)
    except ge.Refusal as why:
        common.fail(str(why))
    tensors = ge.gguf_tensors(model)
    n_params = sum(W.size for _, W in tensors)
    ids = tokenizer(common.pydoc_corpus()[1], return_tensors="pt")["input_ids"][:, : settings["eval_tokens"]]
    have_llama_cpp = importlib.util.find_spec("llama_cpp") is not None
    if not have_llama_cpp:
        print(f"llama.cpp: {NOT_INSTALLED}")
    with tempfile.TemporaryDirectory(prefix="gguf-bench-") as tmp:
        files = write_files(ge, model, tokenizer, tensors, settings, device, have_llama_cpp, Path(tmp))
        rows, fp32 = [], None
        for qtype, made_by, path, expected in files:
            size = path.stat().st_size
            row = {"qtype": qtype, "made_by": made_by, "file_mb": size / 1e6,
                   "bits_per_weight": 8 * size / n_params, **ge.check_file(path, tensors, expected)}
            loaded = ge.load_gguf_in_transformers(path, device)
            row["transformers_param_mb"] = sum(p.numel() * p.element_size() for p in loaded.parameters()) / 1e6
            q = quality(ge, model, loaded, ids.to(device), settings["context"])
            fp32 = q.pop("fp32")
            row.update(q)
            del loaded
            rows.append(row)
            print(f"{qtype} ({made_by}): {row['file_mb']:.1f} MB, ppl {row['perplexity']:.3f}, KL {row['kl']:.4f}",
                  flush=True)
        if have_llama_cpp:
            for row, speed in zip(rows, llama_cpp_speeds(ge, [f[2] for f in files], settings)):
                row["llama_cpp"] = speed
    fp32.update(eval_tokens=rows[0]["eval_tokens"],
                param_mb=sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6)
    result = {**common.results_header(settings, args, device, ("gguf", "llama_cpp_python")),
              "n_params": n_params, "llama_cpp": "ran" if have_llama_cpp else NOT_INSTALLED,
              "fp32": fp32, "rows": rows}
    written = common.write_results(folder, f"gguf-{args.preset}", result, tables(result),
                                   {"": plot_perplexity(result)})
    print(tables(result)["en"])
    print("wrote " + ", ".join(p.name for p in written))


if __name__ == "__main__":
    common.run_main(main, common.bench_parser(__doc__, PRESETS))
