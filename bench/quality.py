"""Quality of weight-only quantization: RTN, GPTQ and AWQ on the same tokens, and a GPTQ sweep.

Quality is measured on real weights on the CPU (SmolLM2-135M): it does not depend on the
hardware, so this benchmark has a CPU preset only (no GPU preset). It loads the teaching scripts
gptq_example.py and awq_example.py and calls their functions; every row is evaluated on the same
evaluation tokens against the same unquantized (FP) model: perplexity with its standard error,
mean KL divergence of the next-token distributions, top-1 agreement, and the packed size
(b-bit codes + 16-bit scales, + b-bit zero points when asymmetric, + the 16-bit unquantized
tensors). Calibration and evaluation text never overlap.

Rows of `quality-<preset>` (group size 64: SmolLM2's hidden size 576 is not a multiple of 128):
FP; RTN at 8 bits, and at 4 and 3 bits symmetric and asymmetric; GPTQ (act-order, symmetric as
compressed-tensors' W4A16, and asymmetric as the GPTQ paper) and AWQ (asymmetric) at 4 and 3 bits
from scratch; llm-compressor's GPTQModifier and AWQModifier at 4 bits (compressed-tensors
checkpoints, reloaded by transformers). Compare each method with the RTN row of the same grid.

`gptq_sweep-<preset>`: 4-bit symmetric GPTQ from scratch over group sizes (per channel, 192, 64,
32) with act-order, and group 64 without act-order. Careful with group 32 on SmolLM2: the copy
used here came through GGUF Q4_1, which stores blocks of 32 weights on a 16-level grid, so a
4-bit grid aligned with those blocks gets part of its accuracy for free.

    python bench/quality.py --preset cpu     # about 40 minutes on one core (32 of CPU time)
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import common

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "about": "SmolLM2-135M on the CPU: RTN, GPTQ, AWQ (3/4/8 bits, group 64), llm-compressor "
                 "at 4 bits, and a 4-bit GPTQ group-size sweep",
        "model": "smollm2",
        "group_size": 64,
        "calib_samples": 8,
        "seqlen": 512,
        "eval_tokens": 4096,
        "n_grid": 20,
        "search_tokens": 2048,
        "sweep_groups": [-1, 192, 64, 32],
        "library": True,
        "quick": {"calib_samples": 2, "seqlen": 64, "eval_tokens": 256, "n_grid": 4,
                  "search_tokens": 128, "sweep_groups": [-1, 32]},
    },
}

GPTQ = common.QUANT / "examples" / "gptq_example.py"
AWQ = common.QUANT / "examples" / "awq_example.py"


def quality_specs(group_size: int, library: bool) -> list[dict[str, Any]]:
    """The rows of the quality table: method, implementation, bits, group size, grid."""
    def spec(method, impl, bits, sym, act_order=None, group=group_size):
        return {"method": method, "impl": impl, "bits": bits, "group_size": group, "sym": sym,
                "act_order": act_order}

    specs = [spec("fp", "reference", 16, True, group=-1), spec("rtn", "scratch", 8, True)]
    for bits in (4, 3):
        specs += [spec("rtn", "scratch", bits, True), spec("rtn", "scratch", bits, False),
                  spec("gptq", "scratch", bits, True, True), spec("gptq", "scratch", bits, False, True),
                  spec("awq", "scratch", bits, False)]
        if library and bits == 4:
            specs += [spec("gptq", "llmcompressor", bits, True, True),
                      spec("awq", "llmcompressor", bits, False)]
    return specs


def sweep_specs(groups: list[int], group_size: int) -> list[dict[str, Any]]:
    rows = [{"method": "gptq", "impl": "scratch", "bits": 4, "group_size": g, "sym": True,
             "act_order": True} for g in groups]
    return rows + [{**rows[0], "group_size": group_size, "act_order": False}]


def quantize(spec: dict[str, Any], gptq, awq, settings, model, fp_state, tokenizer, calib):
    """The quantized model of one row (fake-quantized in place, or the library's reloaded one)."""
    bits, g, sym = spec["bits"], spec["group_size"], spec["sym"]
    model.load_state_dict(fp_state)
    extra: dict[str, Any] = {}
    if spec["method"] == "rtn":
        gptq.rtn_model(model, bits, g, sym)
    elif spec["method"] == "gptq" and spec["impl"] == "scratch":
        stats = gptq.gptq_model(model, calib, bits, g, sym, act_order=spec["act_order"], log=None)
        extra["calib_output_error"] = {"rtn": sum(s["rtn_error"] for s in stats),
                                       "gptq": sum(s["gptq_error"] for s in stats)}
    elif spec["method"] == "awq" and spec["impl"] == "scratch":
        records = awq.awq_model(model, calib, bits, g, sym, settings["n_grid"],
                                settings["search_tokens"], log=None)
        alphas = [r["alpha"] for r in records if r["alpha"] is not None]
        extra["mean_alpha"] = sum(alphas) / len(alphas)
    else:  # llm-compressor quantizes a fresh FP copy in place and saves a checkpoint
        fresh, _ = gptq.load_model(settings["model"], "cpu")
        with tempfile.TemporaryDirectory() as tmp:
            if spec["method"] == "gptq":
                return gptq.llmcompressor_gptq(fresh, tokenizer, calib, bits, g, sym, True, Path(tmp)), extra
            return awq.llmcompressor_awq(fresh, tokenizer, calib, bits, g, sym, Path(tmp)), extra
    return model, extra


def measure(specs, gptq, awq, settings, model, fp_state, tokenizer, calib, evals, reference,
            done: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    in_features = model.model.layers[0].self_attn.q_proj.in_features
    for spec in specs:
        key = "-".join(str(v) for v in spec.values())
        if key not in done:  # the sweep shares a row with the quality table
            start = time.perf_counter()
            if spec["method"] == "fp":
                quantized, extra, logqs = model, {}, reference
            else:
                quantized, extra = quantize(spec, gptq, awq, settings, model, fp_state, tokenizer, calib)
                logqs = gptq.log_probs(quantized, evals)
            seconds = time.perf_counter() - start
            fp = spec["method"] == "fp"
            G = in_features if spec["group_size"] == -1 else spec["group_size"]
            done[key] = {**spec, **gptq.evaluate(evals, reference, logqs),
                         "size_mb": gptq.quantized_size_mb(model, None if fp else spec["bits"],
                                                           spec["group_size"], spec["sym"]),
                         "bits_per_weight": 16.0 if fp else spec["bits"] + (16 + (0 if spec["sym"] else spec["bits"])) / G,
                         "quantize_seconds": round(seconds, 1), **extra}
            r = done[key]
            print(f"{key:<40} ppl {r['perplexity']:9.3f} ± {r['ppl_stderr']:.3f}  KL {r['kl']:.4f}  "
                  f"top1 {r['top1']:.3f}  {r['size_mb']:.1f} MB  {seconds:.0f} s", flush=True)
        rows.append(done[key])
    return rows


# ---------------------------------------------------------------------------------------------
# Tables (Chinese and English) and the plot
# ---------------------------------------------------------------------------------------------
WORDS = {
    "en": {"method": "method", "impl": "implementation", "bits": "bits", "grid": "grid",
           "size": "size (MB)", "ppl": "perplexity ± s.e.", "kl": "KL vs FP", "top1": "top-1 vs FP",
           "group": "group size", "order": "act-order", "bpw": "bits per weight",
           "channel": "per channel", "on": "on", "off": "off",
           "caption": "{model} on {hardware}; {tokens} scored evaluation tokens (windows of {seqlen}), "
                      "calibration {calib} × {seqlen} tokens; group size {group}. KL and top-1 are "
                      "against the FP model on the same tokens.",
           "sweep": "4-bit symmetric GPTQ from scratch; {model} on {hardware}; {tokens} scored "
                    "evaluation tokens, calibration {calib} × {seqlen} tokens."},
    "zh": {"method": "方法", "impl": "实现", "bits": "位数", "grid": "网格", "size": "大小 (MB)",
           "ppl": "困惑度 ± 标准误", "kl": "相对 FP 的 KL", "top1": "与 FP 的 top-1 一致率",
           "group": "分组大小", "order": "act-order", "bpw": "每权重位数", "channel": "逐通道",
           "on": "开", "off": "关",
           "caption": "{model}，{hardware}；评测 {tokens} 个词元（窗口 {seqlen}），校准 {calib} × "
                      "{seqlen} 个词元；分组 {group}。KL 与 top-1 均相对同一批词元上的 FP 模型。",
           "sweep": "4 位对称 GPTQ（从零实现）；{model}，{hardware}；评测 {tokens} 个词元，校准 "
                    "{calib} × {seqlen} 个词元。"},
}


def caption(result: dict[str, Any], lang: str, which: str) -> str:
    s = result["settings"]
    return WORDS[lang][which].format(model=Path(s["model"]).name, hardware=result["hardware"],
                                     tokens=result["scored_tokens"], seqlen=s["seqlen"],
                                     calib=s["calib_samples"], group=s["group_size"])


def quality_table(result: dict[str, Any], lang: str) -> str:
    w = WORDS[lang]
    header = [w["method"], w["impl"], w["bits"], w["grid"], w["size"], w["ppl"], w["kl"], w["top1"]]
    rows = [[r["method"].upper(), r["impl"], r["bits"],
             "—" if r["method"] == "fp" else ("sym" if r["sym"] else "asym"), f"{r['size_mb']:.1f}",
             f"{r['perplexity']:.3f} ± {r['ppl_stderr']:.3f}", f"{r['kl']:.4f}",
             f"{100 * r['top1']:.1f}%"] for r in result["rows"]]
    return caption(result, lang, "caption") + "\n\n" + common.markdown_table(header, rows, "lllllrrr")


def sweep_table(result: dict[str, Any], lang: str) -> str:
    w = WORDS[lang]
    header = [w["group"], w["order"], w["bpw"], w["size"], w["ppl"], w["kl"], w["top1"]]
    rows = [[w["channel"] if r["group_size"] == -1 else r["group_size"], w["on" if r["act_order"] else "off"],
             f"{r['bits_per_weight']:.3f}", f"{r['size_mb']:.1f}",
             f"{r['perplexity']:.3f} ± {r['ppl_stderr']:.3f}", f"{r['kl']:.4f}", f"{100 * r['top1']:.1f}%"]
            for r in result["rows"]]
    return caption(result, lang, "sweep") + "\n\n" + common.markdown_table(header, rows, "llrrrrr")


def plot_quality(result: dict[str, Any], path: Path) -> None:
    """Perplexity against bits, one line per method and grid; FP as a dashed line."""
    fig, ax = common.new_figure()
    rows = result["rows"]
    ax.axhline(rows[0]["perplexity"], color="black", linestyle="--", label="FP")
    series: dict[str, list[tuple[int, float, float]]] = {}
    for r in rows[1:]:
        label = f"{r['method'].upper()} {'' if r['impl'] == 'scratch' else 'llm-compressor '}" \
                f"{'sym' if r['sym'] else 'asym'}"
        series.setdefault(label, []).append((r["bits"], r["perplexity"], r["ppl_stderr"]))
    for label, points in series.items():
        bits, ppl, se = zip(*sorted(points))
        ax.errorbar(bits, ppl, yerr=se, capsize=3, label=label, marker="s" if "llm" in label else "o",
                    linestyle="-" if len(points) > 1 else "none")
    ax.set_xlabel(f"weight bits (group size {result['settings']['group_size']})")
    ax.set_ylabel("perplexity (log scale, lower is better)")
    ax.set_yscale("log")
    ax.set_xticks([3, 4, 8])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9, ncol=2)
    common.save_figure(fig, path)


def main(args) -> None:
    os.environ.update(LLM_COMPRESSOR_LOG_LEVEL="WARNING", TRANSFORMERS_VERBOSITY="error",
                      TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false")
    settings = common.resolve_preset(PRESETS, args)
    out = common.results_dir(args, common.QUANT / "results")
    device = common.resolve_device("cpu")
    gptq, awq = common.load_script(GPTQ), common.load_script(AWQ)
    try:
        model, tokenizer = gptq.load_model(settings["model"], "cpu")
        gptq.check_group_size(model, settings["group_size"])
        for g in settings["sweep_groups"]:
            gptq.check_group_size(model, g)
    except gptq.Refusal as why:
        common.fail(str(why))
    calib_text, eval_text = gptq.split_text("pydoc")
    seqlen = settings["seqlen"]
    calib = gptq.token_windows(tokenizer, calib_text, settings["calib_samples"], seqlen, spread=True)
    evals = gptq.token_windows(tokenizer, eval_text, settings["eval_tokens"] // seqlen, seqlen)
    reference = list(gptq.log_probs(model, evals))
    fp_state = {k: v.clone() for k, v in model.state_dict().items()}

    done: dict[str, dict[str, Any]] = {}
    common_args = (gptq, awq, settings, model, fp_state, tokenizer, calib, evals, reference, done)
    quality_rows = measure(quality_specs(settings["group_size"], settings["library"]), *common_args)
    sweep_rows = measure(sweep_specs(settings["sweep_groups"], settings["group_size"]), *common_args)

    header = common.results_header(settings, args, device, ("llmcompressor", "compressed-tensors"))
    shared = {"calibration": list(calib.shape), "scored_tokens": quality_rows[0]["eval_tokens"],
              "size_note": "size_mb: b-bit codes + a 16-bit scale per group (+ b-bit zero point "
                           "if asymmetric) for decoder linears; every other tensor at 16 bits"}
    quality = {**header, **shared, "rows": quality_rows}
    common.write_results(out, f"quality-{args.preset}", quality,
                         {lang: quality_table(quality, lang) for lang in ("zh", "en")},
                         {"": lambda path: plot_quality(quality, path)})
    sweep = {**header, **shared, "fp_perplexity": quality_rows[0]["perplexity"], "rows": sweep_rows}
    common.write_results(out, f"gptq_sweep-{args.preset}", sweep,
                         {lang: sweep_table(sweep, lang) for lang in ("zh", "en")})
    print(f"wrote quality-{args.preset} and gptq_sweep-{args.preset} to {out}")


if __name__ == "__main__":
    common.run_main(main, common.bench_parser(__doc__.split("\n\n")[0], PRESETS))
