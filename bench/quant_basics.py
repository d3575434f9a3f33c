"""Round-to-nearest error sweep over every decoder weight, and the weight-memory table.

Loads inference/quantization/examples/quant_basics.py and runs its sweep (scheme × bits × group
size) over all linear weights of the decoder blocks; writes two results sets:

    quant_basics-<preset>.{json,md,en.md,png}       relative error and bits per weight per setting
    memory_estimates-<preset>.{json,md,en.md}       weight memory of Llama-2-7B / 3-8B / 3-70B and
                                                    the measured model, FP16 / INT8 / INT4

Run: python bench/quant_basics.py --preset cpu
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import common  # bench/ is on sys.path: it is the folder of the script being run

PRESETS = {
    "cpu": {
        "about": "SmolLM2-135M, all 210 linear weights, bits 2 3 4 8, per-channel and groups 192 64 32",
        "model": "smollm2",
        "device": "cpu",
        "max_layers": None,
        "bits": [2, 3, 4, 8],
        "group_sizes": [-1, 192, 64, 32],
        "schemes": ["absmax", "zeropoint", "minscale"],
        "quick": {"max_layers": 1, "bits": [4, 8], "group_sizes": [-1, 32]},
    },
}

SCRIPT = common.QUANT / "examples" / "quant_basics.py"


def error_tables(result: dict) -> dict[str, str]:
    """Scheme × bits rows, one column per group size: error (bits per weight)."""
    groups = result["settings"]["group_sizes"]
    name = Path(result["settings"]["model"]).name
    label = {"zh": lambda g: "逐通道" if g == -1 else f"G = {g}",
             "en": lambda g: "per-channel" if g == -1 else f"G = {g}"}
    caption = {
        "zh": f"相对重建误差 `‖W − Ŵ‖ / ‖W‖`,`{name}` 的 {result['n_weights']} 个线性层权重"
              f"({result['n_params'] / 1e6:.1f} M 参数);括号内为每权重比特数(含 FP16 缩放,及零点或偏移)。"
              f"{result['hardware']}。",
        "en": f"Relative reconstruction error `‖W − Ŵ‖ / ‖W‖` over {result['n_weights']} linear weights "
              f"({result['n_params'] / 1e6:.1f} M parameters) of `{name}`; in brackets: bits per weight "
              f"with FP16 scales (and zeros or offsets). {result['hardware']}.",
    }
    head = {"zh": ["方案", "比特"], "en": ["scheme", "bits"]}
    tables = {}
    for lang in ("zh", "en"):
        rows = []
        for scheme in result["settings"]["schemes"]:
            for bits in result["settings"]["bits"]:
                cells = [next(r for r in result["rows"]
                              if (r["scheme"], r["bits"], r["group_size"]) == (scheme, bits, g))
                         for g in groups]
                rows.append([scheme, bits, *[f"{c['rel_error']:.4f} ({c['bits_per_weight']:.2f})" for c in cells]])
        header = head[lang] + [label[lang](g) for g in groups]
        tables[lang] = caption[lang] + "\n\n" + common.markdown_table(header, rows, "ll" + "r" * len(groups))
    return tables


def memory_tables(result: dict) -> dict[str, str]:
    cols = ["FP16", "INT8 g128", "INT4 g128", "INT4 g128 + FP16 embeddings"]
    caption = {
        "zh": "权重显存(GB,10^9 字节)= `N·b/8 + (N/G)·开销/8`;INT8:每 128 个权重一个 FP16 缩放;"
              "INT4:每 128 个权重一个 FP16 缩放 + 4 比特零点。KV 缓存和激活另计。",
        "en": "Weight memory in GB (10^9 bytes) = `N·b/8 + (N/G)·overhead/8`; INT8: FP16 scale per group "
              "of 128; INT4: FP16 scale + 4-bit zero per group of 128. KV cache and activations come on top.",
    }
    header = {"zh": ["模型", "参数量", "FP16", "INT8 g128", "INT4 g128", "INT4 g128 + FP16 嵌入"],
              "en": ["model", "parameters", *cols]}
    rows = [[r["model"], f"{r['params'] / 1e9:.3g} B", *[f"{r[c]:.2f}" for c in cols]] for r in result["memory"]]
    return {lang: caption[lang] + "\n\n" + common.markdown_table(header[lang], rows, "lr" + "r" * len(cols))
            for lang in ("zh", "en")}


def plot_errors(result: dict):
    def draw(path: Path) -> None:
        fig, ax = common.new_figure()
        groups = result["settings"]["group_sizes"]
        for scheme in result["settings"]["schemes"]:
            for g, style in ((-1, "--"), (64, "-")):
                if g not in groups:
                    continue
                pts = [r for r in result["rows"] if r["scheme"] == scheme and r["group_size"] == g]
                ax.plot([r["bits"] for r in pts], [r["rel_error"] for r in pts], style, marker="o",
                        label=f"{scheme}, {'per-channel' if g == -1 else f'G={g}'}")
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight (before scales)")
        ax.set_ylabel("relative error ‖W − Ŵ‖ / ‖W‖")
        ax.set_title(f"RTN reconstruction error, {Path(result['settings']['model']).name}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=10)
        common.save_figure(fig, path)
    return draw


def main(args) -> None:
    settings = common.resolve_preset(PRESETS, args)
    folder = common.results_dir(args, common.QUANT / "results")
    device = common.resolve_device(settings["device"])
    qb = common.load_script(SCRIPT)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model = qb.load_model(settings["model"], "float32")
    except qb.Refusal as why:
        common.fail(str(why))
    weights = qb.linear_weights(model, settings["max_layers"])
    start = time.perf_counter()
    rows = qb.sweep(weights, settings["schemes"], settings["bits"], settings["group_sizes"], device,
                    quiet=not sys.stderr.isatty())
    seconds = time.perf_counter() - start
    header = common.results_header(settings, args, device)
    result = {**header, "n_weights": len(weights), "n_params": sum(W.numel() for W in weights.values()),
              "sweep_seconds": seconds, "rows": rows}
    name = Path(settings["model"]).name
    memory = {**header, "memory": qb.memory_table({**qb.MODELS, **qb.counted_model(model, name)})}
    common.write_results(folder, f"quant_basics-{args.preset}", result, error_tables(result),
                         {"": plot_errors(result)})
    common.write_results(folder, f"memory_estimates-{args.preset}", memory, memory_tables(memory))
    print(error_tables(result)["en"])
    print(memory_tables(memory)["en"])
    print(f"wrote quant_basics-{args.preset} and memory_estimates-{args.preset} in {folder} "
          f"(sweep {seconds:.0f} s)")


if __name__ == "__main__":
    common.run_main(main, common.bench_parser(__doc__, PRESETS))
