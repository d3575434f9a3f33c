"""One quality table for every weight quantization method of this module, on the same tokens.

Rows, all with group size 64 (SmolLM2's hidden size 576 is not a multiple of 128):
FP; round-to-nearest (RTN) at 8 bits, and at 4 and 3 bits both symmetric and asymmetric;
GPTQ (act-order; symmetric as compressed-tensors' W4A16, and asymmetric as the GPTQ paper) and AWQ
(asymmetric) at 4 and 3 bits from scratch, and at 4 bits with llm-compressor (its compressed-tensors
presets are W4A16 and W8A16). Compare each method with the RTN row of the same grid (sym or asym). Every row is evaluated on the
same evaluation tokens against the same FP model: perplexity with its standard error, mean KL
divergence of the next-token distributions, top-1 agreement, and the real storage size (packed
b-bit codes + 16-bit scales, + zero points when asymmetric, + the 16-bit unquantized tensors).

A second table sweeps 4-bit GPTQ over group sizes (per channel, 192, 64, 32) and act-order on/off.
Careful with group 32 on SmolLM2: its published weights came through GGUF Q4_1, which stores
blocks of 32 weights on a 16-level grid, so a 4-bit grid aligned with those blocks gets part of
its accuracy for free (a 4-bit grid with a float offset per block of 32, as Q4_1 stores it,
reproduces the weights exactly; the integer zero-point grid used here does not, since it always
contains 0: see quant_basics.py).

Run it (the committed results came from this command on 2 shared CPU cores, where it took about
an hour of wall time; each row is cached in --cache-dir, so an interrupted run resumes where it
stopped, and several processes with different --rows can share the work):

    python inference/quantization/examples/compare_methods.py --model .cache/models/SmolLM2-135M-Instruct \
        --calib-samples 8 --eval-tokens 4096 \
        --json inference/quantization/results/quality-cpu.json \
        --sweep-json inference/quantization/results/gptq_sweep-cpu.json

It writes the JSON, a Markdown table beside it (same name, .md) and a plot of perplexity against
bits (.png). The methods come from gptq_example.py and awq_example.py in this folder (an example's
own folder is on `sys.path` when it runs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import awq_example as awq
import gptq_example as gptq
from gptq_example import UserError


@dataclass(frozen=True)
class Spec:
    """One row of a table: which method, implementation and settings."""
    method: str  # fp | rtn | gptq | awq
    impl: str  # reference | scratch | llmcompressor
    bits: int
    group_size: int
    sym: bool
    act_order: bool | None = None

    @property
    def key(self) -> str:
        parts = [self.method, self.impl, f"w{self.bits}", f"g{self.group_size}", "sym" if self.sym else "asym"]
        if self.act_order is not None:
            parts.append("actorder" if self.act_order else "noactorder")
        return "-".join(parts)


def quality_specs(group_size: int, library: bool) -> list[Spec]:
    g = group_size
    specs = [Spec("fp", "reference", 16, -1, True), Spec("rtn", "scratch", 8, g, True)]
    for bits in (4, 3):
        specs += [Spec("rtn", "scratch", bits, g, True), Spec("rtn", "scratch", bits, g, False),
                  Spec("gptq", "scratch", bits, g, True, True), Spec("gptq", "scratch", bits, g, False, True),
                  Spec("awq", "scratch", bits, g, False)]
        if library and bits in gptq.LIBRARY_BITS:
            specs += [Spec("gptq", "llmcompressor", bits, g, True, True), Spec("awq", "llmcompressor", bits, g, False)]
    return specs


def sweep_specs(group_sizes: list[int], group_size: int) -> list[Spec]:
    groups = [Spec("gptq", "scratch", 4, g, True, True) for g in group_sizes]
    return groups + [Spec("gptq", "scratch", 4, group_size, True, False)]


# ----------------------------------------------------------------------------------------------
# One row: load the FP model, quantize it, evaluate it
# ----------------------------------------------------------------------------------------------

def quantize_row(spec: Spec, args: argparse.Namespace, calib: torch.Tensor) -> tuple[torch.nn.Module, float, dict]:
    """The quantized model of one row (fake-quantized, or reloaded from the library's checkpoint)."""
    model, tokenizer = gptq.load_model(args.model, args.device, args.dtype)
    progress = gptq.show_progress(args.quiet)
    extra: dict[str, Any] = {}
    start = time.perf_counter()
    if spec.method == "rtn":
        gptq.rtn_model(model, spec.bits, spec.group_size, spec.sym)
    elif spec.method == "gptq" and spec.impl == "scratch":
        gptq.gptq_model(model, calib, spec.bits, spec.group_size, spec.sym, args.block_size, args.damp,
                        bool(spec.act_order), progress=progress)
    elif spec.method == "awq" and spec.impl == "scratch":
        awq.awq_model(model, calib, spec.bits, spec.group_size, spec.sym, args.n_grid, args.search_tokens,
                      progress=progress)
    elif spec.impl == "llmcompressor":
        with tempfile.TemporaryDirectory() as tmp:
            if spec.method == "gptq":
                gptq.llmcompressor_gptq(model.cpu(), tokenizer, calib, spec.bits, spec.group_size, spec.sym,
                                        bool(spec.act_order), args.damp, args.block_size, Path(tmp))
            else:
                awq.llmcompressor_awq(model.cpu(), tokenizer, calib, spec.bits, spec.group_size, spec.sym,
                                      args.n_grid, Path(tmp))
            seconds = time.perf_counter() - start
            model, extra["reload_generation"] = gptq.reload_and_generate(Path(tmp), tokenizer, args.device)
            extra["checkpoint_mb"] = gptq.checkpoint_mb(Path(tmp))
            return model, seconds, extra
    return model, time.perf_counter() - start, extra


class Reference:
    """The FP model's final hidden states on the evaluation windows and its lm_head, computed on
    first use and kept in the cache folder (parallel runs with --rows share one copy)."""

    def __init__(self, args: argparse.Namespace, windows: torch.Tensor, path: Path, progress: bool):
        self.args, self.windows, self.path, self.progress = args, windows, path, progress
        self.value: tuple[torch.Tensor, torch.Tensor] | None = None

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.value is None:
            if self.path.exists():
                self.value = torch.load(self.path)
            else:
                model, _ = gptq.load_model(self.args.model, self.args.device, self.args.dtype)
                hidden = gptq.final_hidden(model, self.windows, self.progress)
                self.value = (hidden, model.lm_head.weight.detach().float().cpu().clone())
                partial = self.path.with_suffix(".partial")
                torch.save(self.value, partial)
                partial.rename(self.path)  # atomic: a parallel run never reads half a file
        return self.value


def measure_row(spec: Spec, args, calib, windows, reference: Reference) -> dict[str, Any]:
    model, seconds, extra = quantize_row(spec, args, calib)
    ref_hidden, ref_head = reference.get()
    row = asdict(spec)
    row.update(gptq.evaluate(model, windows, ref_hidden, ref_head, progress=gptq.show_progress(args.quiet)))
    row["size_mb"] = gptq.quantized_size_mb(model, None if spec.method == "fp" else spec.bits,
                                            spec.group_size, spec.sym)
    in_features = model.model.layers[0].self_attn.q_proj.in_features
    row["bits_per_weight"] = 16.0 if spec.method == "fp" else gptq.bits_per_weight(
        spec.bits, spec.group_size, in_features, spec.sym)
    row["quantize_seconds"] = round(seconds, 1)
    row.update(extra)
    return row


def cached_row(spec: Spec, cache: Path, compute) -> dict[str, Any]:
    """Read the row from the cache, or compute it and store it there (a crash loses one row at most)."""
    path = cache / f"{spec.key}.json"
    if path.exists():
        return json.loads(path.read_text())
    row = compute()
    path.with_suffix(".partial").write_text(json.dumps(row, indent=2))
    path.with_suffix(".partial").rename(path)
    return row


def settings_hash(args: argparse.Namespace) -> str:
    """Rows are reused only if model, data and every setting that changes them are the same."""
    keys = ("model", "data", "seed", "dtype", "calib_samples", "calib_seqlen", "eval_tokens", "ctx",
            "damp", "block_size", "n_grid", "search_tokens")
    text = json.dumps({k: getattr(args, k) for k in keys}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


# ----------------------------------------------------------------------------------------------
# Tables and plot
# ----------------------------------------------------------------------------------------------

def fmt_row(row: dict[str, Any], fp_ppl: float) -> list[str]:
    delta = 100 * (row["perplexity"] / fp_ppl - 1)
    return [row["method"].upper() if row["method"] != "fp" else "FP (fp32 eval, 16-bit size)",
            row["impl"], str(row["bits"]), "—" if row["group_size"] == -1 and row["method"] == "fp"
            else ("channel" if row["group_size"] == -1 else str(row["group_size"])),
            "—" if row["method"] == "fp" else ("sym" if row["sym"] else "asym"),
            {None: "—", True: "on", False: "off"}[row.get("act_order")],
            f"{row['size_mb']:.1f}", f"{row['perplexity']:.3f} ± {row['ppl_stderr']:.3f}",
            f"{delta:+.1f}%", f"{row['kl']:.4f}", f"{100 * row['top1']:.1f}%"]


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body]) + "\n"


def provenance(result: dict[str, Any]) -> str:
    ev, cal = result["eval"], result["calibration"]
    return (f"Model `{result['model_name']}`, {result['hardware']}; "
            f"evaluation: {ev['scored_tokens']} scored tokens of `{result['data']}` evaluation text, "
            f"context {ev['ctx']}, stride {ev['stride']}; calibration: {cal[0]} × {cal[1]} tokens of the "
            f"calibration text (no overlap). KL and top-1 are against the FP model on the same tokens.\n")


def quality_markdown(result: dict[str, Any]) -> str:
    fp_ppl = result["rows"][0]["perplexity"]
    header = ["method", "implementation", "bits", "group", "grid", "act-order", "size (MB)",
              "perplexity ± s.e.", "Δ ppl", "KL vs FP", "top-1 agreement"]
    note = ("\nFP: the model as loaded, evaluated in float32 (its size is counted at 16 bits). SmolLM2's "
            "published weights came through GGUF Q4_1, so every loss here is relative to that baseline. "
            "Size: packed codes + 16-bit scales (+ zero points when asymmetric) + 16-bit unquantized tensors.\n")
    return provenance(result) + note + "\n" + markdown_table(header, [fmt_row(r, fp_ppl) for r in result["rows"]])


def sweep_markdown(result: dict[str, Any]) -> str:
    fp_ppl = result["fp_perplexity"]
    header = ["group size", "act-order", "bits per weight", "size (MB)", "perplexity ± s.e.", "Δ ppl vs FP",
              "KL vs FP", "top-1 agreement", "note"]
    body = []
    for r in result["rows"]:
        note = ("groups = the Q4_1 blocks of 32 this model's weights came through (caveat in the guide)"
                if r["group_size"] == 32 else "")
        body.append(["per channel" if r["group_size"] == -1 else str(r["group_size"]),
                     "on" if r["act_order"] else "off", f"{r['bits_per_weight']:.3f}", f"{r['size_mb']:.1f}",
                     f"{r['perplexity']:.3f} ± {r['ppl_stderr']:.3f}", f"{100 * (r['perplexity'] / fp_ppl - 1):+.1f}%",
                     f"{r['kl']:.4f}", f"{100 * r['top1']:.1f}%", note])
    intro = provenance(result) + f"\n4-bit GPTQ from scratch, symmetric; FP perplexity {fp_ppl:.3f}.\n\n"
    return intro + markdown_table(header, body)


def plot_quality(result: dict[str, Any], path: Path) -> None:
    """Perplexity against bits, one line per method and implementation, FP as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = result["rows"]
    ax.axhline(rows[0]["perplexity"], color="black", linestyle="--", label="FP")
    series: dict[str, list[tuple[int, float, float]]] = {}
    for r in rows[1:]:
        label = f"{r['method'].upper()} {r['impl']} {'sym' if r['sym'] else 'asym'}"
        series.setdefault(label, []).append((r["bits"], r["perplexity"], r["ppl_stderr"]))
    for label, points in series.items():
        points.sort()
        bits, ppl, se = zip(*points)
        style = "s" if "llmcompressor" in label else "o"
        ax.errorbar(bits, ppl, yerr=se, marker=style, capsize=3, label=label,
                    linestyle="-" if len(points) > 1 else "none")
    ax.set_xlabel("weight bits (group size 64)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_yscale("log")
    ax.set_xticks([3, 4, 8])
    ax.set_title(f"SmolLM2-135M, {result['eval']['scored_tokens']} evaluation tokens")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("Model")
    model.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                       help="hub id or local folder of a Llama-style causal LM")
    model.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                       help="where to run (auto: cuda if available)")
    model.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                       help="dtype of the model during calibration and evaluation")
    model.add_argument("--seed", type=int, default=0, help="seed for the calibration windows")
    method = parser.add_argument_group("Methods")
    method.add_argument("--group-size", type=int, default=64, help="group size of the quality table")
    method.add_argument("--library", action=argparse.BooleanOptionalAction, default=True,
                        help="include llm-compressor's GPTQ and AWQ rows (4 bits)")
    method.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the 4-bit GPTQ group-size and act-order sweep")
    method.add_argument("--sweep-groups", type=lambda text: [int(g) for g in text.split(",")],
                        default=[-1, 192, 64, 32], help="group sizes of the sweep, comma-separated (-1: per channel)")
    method.add_argument("--rows", default=None,
                        help="comma-separated row keys to compute (default: all); see --list-rows")
    method.add_argument("--list-rows", action="store_true", help="print the row keys and exit")
    method.add_argument("--damp", type=float, default=0.01, help="GPTQ damping (fraction of mean diag H)")
    method.add_argument("--block-size", type=int, default=128, help="GPTQ lazy-update block size")
    method.add_argument("--n-grid", type=int, default=20, help="AWQ grid points (scales and clipping)")
    method.add_argument("--search-tokens", type=int, default=2048, help="tokens scoring each AWQ α (from scratch)")
    data = parser.add_argument_group("Data")
    data.add_argument("--data", choices=["pydoc", "wikitext2"], default="pydoc",
                      help="pydoc: offline text from Python's docs; wikitext2: via `datasets` (online)")
    data.add_argument("--calib-samples", type=int, default=16, help="number of calibration windows")
    data.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration window")
    data.add_argument("--eval-tokens", type=int, default=8192, help="evaluation tokens (cut into windows)")
    data.add_argument("--ctx", type=int, default=512, help="evaluation window length; stride = ctx")
    out = parser.add_argument_group("Output")
    out.add_argument("--json", default=None,
                     help="quality table JSON; the .md table and .png plot are written beside it")
    out.add_argument("--sweep-json", default=None, help="sweep JSON; its .md table is written beside it")
    out.add_argument("--cache-dir", default=".cache/compare_methods",
                     help="per-row results, reused when the settings match (delete it to recompute)")
    out.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    quality = quality_specs(args.group_size, args.library)
    sweep = sweep_specs(args.sweep_groups, args.group_size) if args.sweep else []
    everything = {s.key: s for s in quality + sweep}
    if args.list_rows:
        print("\n".join(everything))
        return {}
    wanted = set(args.rows.split(",")) if args.rows else set(everything)
    if unknown := wanted - set(everything):
        raise UserError(f"unknown row(s) {', '.join(sorted(unknown))}; see --list-rows")
    torch.manual_seed(args.seed)
    args.device = gptq.pick_device(args.device)
    progress = gptq.show_progress(args.quiet)
    gptq.quiet_libraries(progress)
    if args.library and (reason := gptq.library_available()):
        raise UserError(reason + " (or pass --no-library)")
    model, tokenizer = gptq.load_model(args.model, args.device, args.dtype)
    for spec in everything.values():
        gptq.check_group_size(model, spec.group_size)
    calib_text, eval_text = gptq.load_texts(args.data)
    calib = gptq.calibration_batch(tokenizer, calib_text, args.calib_samples, args.calib_seqlen, args.seed)
    windows = gptq.evaluation_windows(tokenizer, eval_text, args.eval_tokens, args.ctx)
    del model  # each row loads its own copy
    cache = Path(args.cache_dir) / settings_hash(args)
    cache.mkdir(parents=True, exist_ok=True)
    reference = Reference(args, windows, cache / "fp_final_hidden.pt", progress)

    rows: dict[str, dict[str, Any]] = {}
    for key in [k for k in everything if k in wanted]:
        spec = everything[key]
        rows[key] = cached_row(spec, cache, lambda: measure_row(spec, args, calib, windows, reference))
        if not args.quiet:
            r = rows[key]
            print(f"{key:<45} ppl {r['perplexity']:9.3f} ± {r['ppl_stderr']:.3f}  KL {r['kl']:.4f}  "
                  f"top1 {r['top1']:.3f}  {r['size_mb']:.1f} MB", flush=True)

    header = gptq.results_header(args.device, "llmcompressor", "compressed-tensors", "matplotlib")
    header.update({"model": args.model, "model_name": Path(args.model).name, "data": args.data,
                   "calibration": list(calib.shape),
                   "eval": {"tokens": windows.numel(), "ctx": args.ctx, "stride": args.ctx,
                            "scored_tokens": windows.shape[0] * (args.ctx - 1)},
                   "settings": {k: getattr(args, k) for k in ("group_size", "damp", "block_size", "n_grid",
                                                               "search_tokens", "seed", "dtype")},
                   "size_note": "size_mb: b-bit codes + 16-bit scale per group (+ b-bit zero point if asym) "
                                "for decoder linears; embeddings, norms and lm_head at 16 bits"})
    result = {**header, "rows": [rows[s.key] for s in quality if s.key in rows]}
    if args.json and all(s.key in rows for s in quality):
        json_path = Path(args.json)
        gptq.write_json(str(json_path), result)
        json_path.with_suffix(".md").write_text(quality_markdown(result))
        plot_quality(result, json_path.with_suffix(".png"))
    if args.sweep_json and sweep and all(s.key in rows for s in sweep) and quality[0].key in rows:
        sweep_result = {**header, "fp_perplexity": rows[quality[0].key]["perplexity"],
                        "rows": [rows[s.key] for s in sweep]}
        gptq.write_json(args.sweep_json, sweep_result)
        Path(args.sweep_json).with_suffix(".md").write_text(sweep_markdown(sweep_result))
        result["sweep"] = sweep_result
    return result


if __name__ == "__main__":
    try:
        main(build_parser().parse_args())
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
