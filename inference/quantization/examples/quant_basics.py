"""Round-to-nearest (RTN) quantization written out, on real weights, plus a memory calculator.

What it shows
  1. Three ways to put a weight matrix W on a b-bit grid, each a `quantize_*` / `dequantize_*` pair:
     absmax (symmetric, `W ≈ scale·q`), zero-point (asymmetric with an integer zero, as GPTQ,
     AWQ and compressed-tensors checkpoints store it, `W ≈ scale·(q − zero)`), and min-scale
     (asymmetric with a real-valued offset, as llama.cpp's Q4_1 stores it, `W ≈ scale·q + m`).
     Each works per output channel (one scale per row) or per group of g consecutive input weights.
  2. The reconstruction error of every decoder linear weight of the model, by bits and group size,
     with the storage cost in bits per weight (scales and zeros included).
  3. Why 4-bit min-scale with group 32 gives an error of exactly zero on SmolLM2: the only copy of
     SmolLM2 this tutorial uses offline came as a Q4_1 GGUF file (blocks of 32, `w = d·q + m`), so
     its weights already lie on such a grid. That setting measures the file's history, not a method.
  4. The memory calculator `bytes = N·b/8 + (N/g)·(scale bits + zero bits)/8` and its worked table
     for Llama-2-7B, Llama-3-8B and Llama-3-70B in FP16, INT8 and INT4.

Run
  python inference/quantization/examples/quant_basics.py                 # downloads the hub model
  python inference/quantization/examples/quant_basics.py --model .cache/models/SmolLM2-135M-Instruct \\
      --json inference/quantization/results/quant_basics-cpu.json

With `--json PATH` it also writes, beside PATH, a Markdown table of the errors (PATH with `.md`),
a plot (`.png`) and the memory table (`memory-estimates.md`).

On SmolLM2-135M (210 linear weights, 106 M parameters; the full sweep of 48 settings takes about
9 minutes of CPU time, `--max-layers 1` a few seconds) it prints, among others: 4-bit absmax
relative error 0.154 per channel and 0.113 with group 64; 4-bit zero-point group 64: 0.094;
4-bit min-scale group 32: 0.0000 (the Q4_1 grid, reproduced exactly).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
from pathlib import Path
from typing import Callable, NoReturn

import torch

SCHEMES = ("absmax", "zeropoint", "minscale")


def fail(message: str) -> NoReturn:
    """Bad input the reader can fix: one line on stderr, exit code 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


# --8<-- [start:groups]
def group_view(W: torch.Tensor, group_size: int) -> torch.Tensor:
    """View a weight (R, C) as groups of `group_size` consecutive input weights: (R, C/g, g).

    `group_size` 0 means one group per output channel (g = C), the "per-channel" case.
    """
    R, C = W.shape
    g = C if group_size == 0 else group_size
    if C % g != 0:
        raise ValueError(f"group size {g} does not divide the {C} input features of a {R}x{C} weight")
    return W.reshape(R, C // g, g)  # (R, C/g, g)
# --8<-- [end:groups]


# --8<-- [start:absmax]
def quantize_absmax(W: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric (absmax) round-to-nearest.

        qmax  = 2^(b-1) - 1                      (7 for 4 bits: levels -7..7)
        scale = max|w| / qmax                    one per group, stored in FP16
        q     = clamp(round(w / scale), -qmax, qmax)
        zero  = 0

    The grid is centred on 0, so a group whose weights are all positive wastes half of it.
    (llama.cpp's Q4_0 uses the 16th level too: its scale is the signed max divided by -8.)
    """
    Wg = group_view(W, group_size)  # (R, C/g, g)
    qmax = 2 ** (bits - 1) - 1
    scale = Wg.abs().amax(dim=-1, keepdim=True) / qmax  # (R, C/g, 1)
    scale = scale.half().float().clamp(min=1e-8)  # checkpoints store scales in 16 bits
    q = torch.clamp(torch.round(Wg / scale), -qmax, qmax).to(torch.int8)
    return q, scale, torch.zeros_like(scale)


def dequantize_absmax(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """w_hat = scale · q, returned as (R, C)."""
    return (q.float() * scale).flatten(1)
# --8<-- [end:absmax]


# --8<-- [start:zeropoint]
def quantize_zeropoint(W: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest with an integer zero-point (GPTQ, AWQ, compressed-tensors).

        scale = (max(w) - min(w)) / (2^b - 1)
        zero  = round(-min(w) / scale)           an integer in [0, 2^b - 1], stored in b bits
        q     = clamp(round(w / scale) + zero, 0, 2^b - 1)

    The grid covers [min, max] of each group, so all 2^b levels are used; because zero is an
    integer, the real value 0 is exactly on the grid (padding and ReLU zeros stay exact).
    """
    Wg = group_view(W, group_size)  # (R, C/g, g)
    qmax = 2**bits - 1
    w_min = Wg.amin(dim=-1, keepdim=True).clamp(max=0)  # the grid must contain 0
    w_max = Wg.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = ((w_max - w_min) / qmax).half().float().clamp(min=1e-8)  # (R, C/g, 1)
    zero = torch.round(-w_min / scale)
    q = torch.clamp(torch.round(Wg / scale) + zero, 0, qmax).to(torch.uint8)
    return q, scale, zero


def dequantize_zeropoint(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """w_hat = scale · (q - zero), returned as (R, C)."""
    return ((q.float() - zero) * scale).flatten(1)
# --8<-- [end:zeropoint]


# --8<-- [start:minscale]
def quantize_minscale(W: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric round-to-nearest with a real-valued offset (llama.cpp's Q4_1 and k-quants).

        scale = (max(w) - min(w)) / (2^b - 1)
        m     = min(w)                           stored in FP16 in the zero slot
        q     = clamp(round((w - m) / scale), 0, 2^b - 1)

    Unlike the integer zero-point, the offset m can be any number: the grid's lowest level is
    the group's minimum itself, and 0 is usually not on the grid.
    """
    Wg = group_view(W, group_size)  # (R, C/g, g)
    qmax = 2**bits - 1
    m = Wg.amin(dim=-1, keepdim=True).half().float()  # (R, C/g, 1)
    scale = ((Wg.amax(dim=-1, keepdim=True) - m) / qmax).half().float().clamp(min=1e-8)
    q = torch.clamp(torch.round((Wg - m) / scale), 0, qmax).to(torch.uint8)
    return q, scale, m


def dequantize_minscale(q: torch.Tensor, scale: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """w_hat = scale · q + m, returned as (R, C)."""
    return (q.float() * scale + m).flatten(1)
# --8<-- [end:minscale]


PAIRS: dict[str, tuple[Callable, Callable]] = {
    "absmax": (quantize_absmax, dequantize_absmax),
    "zeropoint": (quantize_zeropoint, dequantize_zeropoint),
    "minscale": (quantize_minscale, dequantize_minscale),
}


# --8<-- [start:overhead]
def overhead_bits(scheme: str, bits: int) -> int:
    """Bits stored per group besides the weights: an FP16 scale, plus a zero (b bits) or an offset (16)."""
    return {"absmax": 16, "zeropoint": 16 + bits, "minscale": 32}[scheme]


def bits_per_weight(bits: int, group_size: int, scheme: str) -> float:
    """Storage per weight including the scales: b + overhead / g."""
    return bits + overhead_bits(scheme, bits) / group_size
# --8<-- [end:overhead]


# --8<-- [start:memory]
def weight_memory_bytes(n_params: float, bits: int, group_size: int | None = None, overhead: int = 0) -> float:
    """Bytes to store the weights: N·b/8, plus (N/g)·overhead/8 for per-group scales and zeros.

    `group_size` None means no per-group data (FP16, BF16). Not counted: the KV cache (grows with
    batch × context), activations and the runtime's workspace, which come on top at inference.
    """
    total = n_params * bits / 8
    if group_size:
        total += n_params / group_size * overhead / 8
    return total


# Parameter counts from the models' papers and configs; embeddings = vocab × hidden, counted
# twice when the LM head is a separate matrix (all three models below untie it).
MODELS = {
    "Llama-2-7B": {"params": 6.74e9, "embed_and_head": 2 * 32000 * 4096},
    "Llama-3-8B": {"params": 8.03e9, "embed_and_head": 2 * 128256 * 4096},
    "Llama-3-70B": {"params": 70.6e9, "embed_and_head": 2 * 128256 * 8192},
}
# (name, bits, group size, overhead bits per group): INT8 absmax and INT4 zero-point, group 128.
FORMATS = [("FP16", 16, None, 0), ("INT8 g128", 8, 128, 16), ("INT4 g128", 4, 128, 16 + 4)]
# --8<-- [end:memory]


def memory_table(models: dict[str, dict[str, float]]) -> list[dict[str, float | str]]:
    """One row per model: GB (10^9 bytes) per format, and INT4 with embeddings and head kept in FP16."""
    rows = []
    for name, spec in models.items():
        row: dict[str, float | str] = {"model": name, "params": spec["params"]}
        for fmt, bits, group, overhead in FORMATS:
            row[fmt] = weight_memory_bytes(spec["params"], bits, group, overhead) / 1e9
        body = spec["params"] - spec["embed_and_head"]
        row["INT4 g128 + FP16 embeddings"] = (
            weight_memory_bytes(body, 4, 128, 20) + weight_memory_bytes(spec["embed_and_head"], 16)
        ) / 1e9
        rows.append(row)
    return rows


def linear_weights(model: torch.nn.Module, max_layers: int | None) -> dict[str, torch.Tensor]:
    """The decoder blocks' linear weights (q, k, v, o, gate, up, down); embeddings stay out."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            layer = int(name.split(".layers.")[1].split(".")[0])
            if max_layers is None or layer < max_layers:
                found[name] = module.weight.detach()
    return found


def reconstruction_error(weights: dict[str, torch.Tensor], scheme: str, bits: int, group_size: int,
                         device: torch.device) -> dict[str, float]:
    """Relative error sqrt(Σ‖W − Ŵ‖² / Σ‖W‖²) over all weights, exact fraction, bits per weight."""
    quantize, dequantize = PAIRS[scheme]
    err2 = norm2 = exact = count = stored_bits = 0.0
    for W in weights.values():
        W = W.to(device=device, dtype=torch.float32)
        W_hat = dequantize(*quantize(W, bits, group_size))
        err2 += (W - W_hat).pow(2).sum().item()
        norm2 += W.pow(2).sum().item()
        exact += (W == W_hat).sum().item()
        count += W.numel()
        g = W.shape[1] if group_size == 0 else group_size
        stored_bits += W.numel() * bits_per_weight(bits, g, scheme)
    return {"rel_error": (err2 / norm2) ** 0.5, "exact_fraction": exact / count, "bits_per_weight": stored_bits / count}


def group_label(group_size: int) -> str:
    return "per-channel" if group_size == 0 else str(group_size)


def error_markdown(result: dict) -> str:
    groups = result["group_sizes"]
    lines = [
        f"Relative reconstruction error `‖W − Ŵ‖ / ‖W‖` over {result['n_weights']} linear weights "
        f"({result['n_params'] / 1e6:.1f} M parameters) of `{Path(result['model']).name}`; "
        "in brackets: bits per weight with FP16 scales (and zeros or offsets).",
        "",
        "| scheme | bits | " + " | ".join(f"g = {group_label(g)}" for g in groups) + " |",
        "|---|---|" + "---|" * len(groups),
    ]
    for scheme in result["schemes"]:
        for bits in result["bits"]:
            cells = []
            for g in groups:
                row = next(r for r in result["rows"] if (r["scheme"], r["bits"], r["group_size"]) == (scheme, bits, g))
                cells.append(f"{row['rel_error']:.4f} ({row['bits_per_weight']:.2f})")
            lines.append(f"| {scheme} | {bits} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def memory_markdown(rows: list[dict]) -> str:
    cols = [fmt for fmt, *_ in FORMATS] + ["INT4 g128 + FP16 embeddings"]
    lines = [
        "Weight memory in GB (10^9 bytes) = `N·b/8 + (N/g)·overhead/8`; INT8: FP16 scale per group of 128; "
        "INT4: FP16 scale + 4-bit zero per group of 128. KV cache and activations come on top.",
        "",
        "| model | parameters | " + " | ".join(cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    for row in rows:
        lines.append(f"| {row['model']} | {row['params'] / 1e9:.3g} B | " + " | ".join(f"{row[c]:.2f}" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def plot_errors(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for scheme in result["schemes"]:
        for g, style in ((0, "--"), (64, "-")):
            if g not in result["group_sizes"]:
                continue
            pts = [r for r in result["rows"] if r["scheme"] == scheme and r["group_size"] == g]
            ax.plot([r["bits"] for r in pts], [r["rel_error"] for r in pts], style, marker="o",
                    label=f"{scheme}, g={group_label(g)}")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (before scales)")
    ax.set_ylabel("relative error ‖W − Ŵ‖ / ‖W‖")
    ax.set_title(f"RTN reconstruction error, {Path(result['model']).name}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where it exists (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(name: str, dtype: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(name, dtype=getattr(torch, dtype)).eval()
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        fail(f"cannot load model {name!r} ({first}); pass a hub id or a local transformers folder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("Model")
    model.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="hub id or local transformers folder")
    model.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the quantization math runs")
    model.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="dtype the weights are loaded in (the math itself runs in float32)")
    model.add_argument("--max-layers", type=int, default=None, help="only the first N decoder layers (default: all)")
    method = parser.add_argument_group("Method")
    method.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8], help="bit widths to sweep (2..8)")
    method.add_argument("--group-size", type=int, nargs="+", default=[0, 192, 64, 32],
                        help="group sizes to sweep; 0 = per output channel (must divide every input width)")
    method.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES, help="RTN variants to compare")
    out = parser.add_argument_group("Output")
    out.add_argument("--seed", type=int, default=0, help="random seed (RTN is deterministic; kept for a uniform interface)")
    out.add_argument("--json", type=Path, default=None,
                     help="write results here, plus a .md table, a .png plot and memory-estimates.md beside it")
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(args: argparse.Namespace) -> dict:
    parser = build_parser()
    if any(not 2 <= b <= 8 for b in args.bits):
        parser.error(f"--bits must lie in 2..8 for this RTN sweep, got {args.bits}")
    if any(g < 0 for g in args.group_size):
        parser.error("--group-size must be 0 (per channel) or a positive group size")
    torch.manual_seed(args.seed)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # transformers' own loading bar
    device = pick_device(args.device)
    model = load_model(args.model, args.dtype)
    weights = linear_weights(model, args.max_layers)
    if not weights:
        fail(f"no linear layers inside decoder blocks found in {args.model!r}")
    widths = sorted({W.shape[1] for W in weights.values()})
    bad = [g for g in args.group_size if g and any(c % g for c in widths)]
    if bad:
        fail(f"group size {bad[0]} does not divide the input widths {widths}; try 32, 64 or 0 (per channel)")

    from tqdm import tqdm

    configs = [(s, b, g) for s in args.schemes for b in args.bits for g in args.group_size]
    quiet = args.quiet or not sys.stderr.isatty()
    rows = []
    for scheme, bits, g in tqdm(configs, desc="RTN sweep", disable=quiet):
        rows.append({"scheme": scheme, "bits": bits, "group_size": g, **reconstruction_error(weights, scheme, bits, g, device)})

    n_params_model = model.num_parameters()
    models = {**MODELS, f"{Path(args.model).name} (counted)": {
        "params": float(n_params_model),
        "embed_and_head": float(model.get_input_embeddings().weight.numel()
                                * (1 if model.config.tie_word_embeddings else 2)),
    }}
    result = {
        "hardware": cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
        "command": "python " + " ".join(sys.argv),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "model": args.model, "device": str(device), "dtype": args.dtype,
        "n_weights": len(weights), "n_params": sum(W.numel() for W in weights.values()),
        "bits": args.bits, "group_sizes": args.group_size, "schemes": args.schemes,
        "rows": rows, "memory": memory_table(models),
    }
    print(error_markdown(result))
    print(memory_markdown(result["memory"]))
    if args.json:
        write_outputs(result, args.json)
    return result


def write_outputs(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    path.with_suffix(".md").write_text(error_markdown(result))
    (path.parent / "memory-estimates.md").write_text(memory_markdown(result["memory"]))
    plot_errors(result, path.with_suffix(".png"))
    print(f"wrote {path}, {path.with_suffix('.md').name}, {path.with_suffix('.png').name}, memory-estimates.md")


if __name__ == "__main__":
    main(build_parser().parse_args())
