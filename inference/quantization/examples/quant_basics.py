"""Round-to-nearest (RTN) quantization written out, on real weights, plus a memory calculator.

What it shows
  1. Three ways to put a weight matrix W (N, K) on a b-bit grid, each a `quantize_*` /
     `dequantize_*` pair: absmax (symmetric, `W ≈ scale·q`), zero-point (asymmetric with an
     integer zero, as GPTQ, AWQ and compressed-tensors checkpoints store it,
     `W ≈ scale·(q − zero)`), and min-scale (asymmetric with a real-valued offset, as llama.cpp's
     Q4_1 stores it, `W ≈ scale·q + m`). Each works per output channel (`--group-size -1`, one
     scale per row) or per group of G consecutive input weights of a row.
  2. The reconstruction error of every decoder linear weight of the model, by bits and group size,
     with the storage cost in bits per weight (scales and zeros included).
  3. Why 4-bit min-scale with group 32 gives an error of exactly zero on SmolLM2: the only copy of
     SmolLM2 this tutorial uses offline came as a Q4_1 GGUF file (blocks of 32, `w = d·q + m`), so
     its weights already lie on such a grid. That setting measures the file's history, not a method.
  4. The memory calculator `bytes = N·b/8 + (N/G)·(scale bits + zero bits)/8` and its worked table
     for Llama-2-7B, Llama-3-8B and Llama-3-70B in FP16, INT8 and INT4.

Run it
  python inference/quantization/examples/quant_basics.py --model HuggingFaceTB/SmolLM2-135M-Instruct \\
      --max-layers 2 --bits 4 8 --group-size -1 64 32 --quiet

The full sweep (all 30 layers, bits 2 3 4 8, four group sizes: 48 settings, about a minute of
CPU time) is `python bench/quant_basics.py --preset cpu`, which writes the results files.

What it prints on SmolLM2-135M (the command above, 2 layers, a few seconds): one row per scheme
and bit width, the relative error `‖W − Ŵ‖ / ‖W‖` per group size with bits per weight in
brackets (4-bit absmax about 0.15 per channel and 0.10 with group 32; 4-bit min-scale with
group 32: 0.0000, the Q4_1 grid reproduced exactly), then the memory table (Llama-3-8B: 16.06 GB
in FP16, 4.17 GB in INT4 with group 128).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

import torch

SCHEMES = ("absmax", "zeropoint", "minscale")


class Refusal(Exception):
    """A run-time refusal: one line that names the problem and the fix (exit code 2)."""


# --8<-- [start:groups]
def group_view(W: torch.Tensor, group_size: int) -> torch.Tensor:
    """View a weight (N, K) as groups of G consecutive input weights: (N, K/G, G).

    `group_size` -1 means one group per output channel (G = K), the "per-channel" case.
    """
    N, K = W.shape
    G = K if group_size == -1 else group_size
    if K % G != 0:
        raise ValueError(
            f"group size {G} does not divide the {K} input features of a {N}x{K} weight")
    return W.reshape(N, K // G, G)  # (N, K/G, G)
# --8<-- [end:groups]


# --8<-- [start:absmax]
def quantize_absmax(W: torch.Tensor, bits: int, group_size: int):
    """Symmetric (absmax) round-to-nearest.

        qmax  = 2^(b-1) - 1                      (7 for 4 bits: levels -7..7)
        scale = max|w| / qmax                    one per group, stored in FP16
        q     = clamp(round(w / scale), -qmax, qmax)
        zero  = 0

    The grid is centred on 0, so a group whose weights are all positive wastes half of it.
    (llama.cpp's Q4_0 uses the 16th level too: its scale is the signed max divided by -8.)
    Returns q (N, K/G, G) int8, scale and zero (N, K/G, 1).
    """
    Wg = group_view(W, group_size)  # (N, K/G, G)
    qmax = 2 ** (bits - 1) - 1
    scale = Wg.abs().amax(dim=-1, keepdim=True) / qmax  # (N, K/G, 1)
    # stored in FP16; the clamp guards all-zero groups
    scale = scale.half().float().clamp(min=2**-24)
    q = torch.clamp(torch.round(Wg / scale), -qmax, qmax).to(torch.int8)
    return q, scale, torch.zeros_like(scale)


def dequantize_absmax(q: torch.Tensor, scale: torch.Tensor,
                      zero: torch.Tensor) -> torch.Tensor:
    """w_hat = scale · q, returned as (N, K)."""
    return (q.float() * scale).flatten(1)
# --8<-- [end:absmax]


# --8<-- [start:zeropoint]
def quantize_zeropoint(W: torch.Tensor, bits: int, group_size: int):
    """Asymmetric round-to-nearest with an integer zero-point.

    Used by GPTQ, AWQ and compressed-tensors.

        scale = (max(w) - min(w)) / (2^b - 1)    stored in FP16
        zero  = round(-min(w) / scale)           in [0, 2^b - 1], stored in b bits
        q     = clamp(round(w / scale + zero), 0, 2^b - 1)

    The grid covers [min, max] of each group, so all 2^b levels are used; because zero
    is an integer, the real value 0 is exactly on the grid (padding and ReLU zeros stay
    exact). The order of the steps is compressed-tensors' (the tests compare the codes
    bit for bit).
    """
    Wg = group_view(W, group_size)  # (N, K/G, G)
    qmax = 2**bits - 1
    w_min = Wg.amin(dim=-1, keepdim=True).clamp(max=0)  # the grid must contain 0
    w_max = Wg.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = ((w_max - w_min) / qmax).clamp(min=2**-24)  # (N, K/G, 1)
    zero = torch.round(-w_min / scale).clamp(0, qmax)
    scale = scale.half().float()  # checkpoints store scales in 16 bits
    q = torch.clamp(torch.round(Wg / scale + zero), 0, qmax).to(torch.uint8)
    return q, scale, zero


def dequantize_zeropoint(q: torch.Tensor, scale: torch.Tensor,
                         zero: torch.Tensor) -> torch.Tensor:
    """w_hat = scale · (q - zero), returned as (N, K)."""
    return ((q.float() - zero) * scale).flatten(1)
# --8<-- [end:zeropoint]


# --8<-- [start:minscale]
def quantize_minscale(W: torch.Tensor, bits: int, group_size: int):
    """Asymmetric round-to-nearest with a real-valued offset.

    This is llama.cpp's Q4_1 and its k-quants.

        scale = (max(w) - min(w)) / (2^b - 1)    stored in FP16
        m     = min(w)                           stored in FP16 in the zero slot
        q     = clamp(trunc((w - m) / scale + 1/2), 0, 2^b - 1)

    Unlike the integer zero-point, the offset m can be any number: the grid's lowest
    level is the group's minimum itself, and 0 is usually not on the grid. The
    arithmetic is ggml's (a multiply by 1/scale, rounding by truncation of x + 1/2):
    at b = 4, G = 32 this is Q4_1.
    """
    Wg = group_view(W, group_size)  # (N, K/G, G)
    qmax = 2**bits - 1
    m = Wg.amin(dim=-1, keepdim=True)  # (N, K/G, 1)
    scale = (Wg.amax(dim=-1, keepdim=True) - m) / qmax
    inv_scale = torch.where(scale == 0, 0.0, 1 / scale)
    q = torch.clamp(torch.trunc((Wg - m) * inv_scale + 0.5), 0, qmax).to(torch.uint8)
    return q, scale.half().float(), m.half().float()


def dequantize_minscale(q: torch.Tensor, scale: torch.Tensor,
                        m: torch.Tensor) -> torch.Tensor:
    """w_hat = scale · q + m, returned as (N, K)."""
    return (q.float() * scale + m).flatten(1)
# --8<-- [end:minscale]


PAIRS: dict[str, tuple[Callable, Callable]] = {
    "absmax": (quantize_absmax, dequantize_absmax),
    "zeropoint": (quantize_zeropoint, dequantize_zeropoint),
    "minscale": (quantize_minscale, dequantize_minscale),
}


# --8<-- [start:overhead]
def overhead_bits(scheme: str, bits: int) -> int:
    """Bits stored per group besides the weights.

    An FP16 scale, plus a b-bit zero or an FP16 offset.
    """
    return {"absmax": 16, "zeropoint": 16 + bits, "minscale": 32}[scheme]


def bits_per_weight(bits: int, group_size: int, scheme: str) -> float:
    """Storage per weight including the scales: b + overhead / G."""
    return bits + overhead_bits(scheme, bits) / group_size
# --8<-- [end:overhead]


# --8<-- [start:memory]
def weight_memory_bytes(n_params: float, bits: int, group_size: int | None = None,
                        overhead: int = 0) -> float:
    """Bytes to store the weights: N·b/8, plus (N/G)·overhead/8 for scales and zeros.

    `group_size` None means no per-group data (FP16, BF16). Not counted: the KV
    cache (grows with batch × context), activations and the runtime's workspace,
    which come on top.
    """
    total = n_params * bits / 8
    if group_size:
        total += n_params / group_size * overhead / 8
    return total


# Parameter counts from the models' papers and configs; embeddings = vocab × hidden,
# counted twice when the LM head is a separate matrix (all three models untie it).
MODELS = {
    "Llama-2-7B": {"params": 6.74e9, "embed_and_head": 2 * 32000 * 4096},
    "Llama-3-8B": {"params": 8.03e9, "embed_and_head": 2 * 128256 * 4096},
    "Llama-3-70B": {"params": 70.6e9, "embed_and_head": 2 * 128256 * 8192},
}
# (name, bits, group size, overhead bits per group):
# INT8 absmax and INT4 zero-point, group 128.
FORMATS = [("FP16", 16, None, 0),
           ("INT8 g128", 8, 128, 16),
           ("INT4 g128", 4, 128, 16 + 4)]
# --8<-- [end:memory]


def memory_table(models: dict[str, dict[str, float]]) -> list[dict[str, float | str]]:
    """One row per model: GB (10^9 bytes) per format, and INT4 with embeddings and head in FP16."""
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


def counted_model(model: torch.nn.Module, name: str) -> dict[str, dict[str, float]]:
    """The loaded model as one more MODELS entry, its parameters counted."""
    tied = model.config.tie_word_embeddings
    embed = model.get_input_embeddings().weight.numel() * (1 if tied else 2)
    return {f"{name} (counted)": {"params": float(model.num_parameters()), "embed_and_head": float(embed)}}


def linear_weights(model: torch.nn.Module, max_layers: int | None) -> dict[str, torch.Tensor]:
    """The decoder blocks' linear weights (q, k, v, o, gate, up, down); embeddings stay out."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            layer = int(name.split(".layers.")[1].split(".")[0])
            if max_layers is None or layer < max_layers:
                found[name] = module.weight.detach()
    return found


def reconstruction_error(weights: dict[str, torch.Tensor], scheme: str, bits: int,
                         group_size: int, device: torch.device) -> dict[str, float]:
    """Relative error sqrt(Σ‖W − Ŵ‖² / Σ‖W‖²) over all weights, exact fraction, bits per weight."""
    quantize, dequantize = PAIRS[scheme]
    err2 = norm2 = exact = count = stored_bits = 0.0
    for W in weights.values():
        W = W.to(device=device, dtype=torch.float32)  # (N, K)
        W_hat = dequantize(*quantize(W, bits, group_size))  # (N, K)
        err2 += (W - W_hat).pow(2).sum().item()
        norm2 += W.pow(2).sum().item()
        exact += (W == W_hat).sum().item()
        count += W.numel()
        G = W.shape[1] if group_size == -1 else group_size
        stored_bits += W.numel() * bits_per_weight(bits, G, scheme)
    return {"rel_error": (err2 / norm2) ** 0.5, "exact_fraction": exact / count,
            "bits_per_weight": stored_bits / count}


def sweep(weights: dict[str, torch.Tensor], schemes, bits_list, group_sizes, device: torch.device,
          quiet: bool = True) -> list[dict]:
    """One row per (scheme, bits, group size): the reconstruction error over all weights."""
    from tqdm import tqdm

    configs = [(s, b, g) for s in schemes for b in bits_list for g in group_sizes]
    return [{"scheme": s, "bits": b, "group_size": g, **reconstruction_error(weights, s, b, g, device)}
            for s, b, g in tqdm(configs, desc="RTN sweep", disable=quiet)]


def group_label(group_size: int) -> str:
    return "per-channel" if group_size == -1 else str(group_size)


def print_tables(rows: list[dict], memory: list[dict]) -> None:
    """The error table (scheme × bits by group size) and the memory table."""
    groups = list(dict.fromkeys(r["group_size"] for r in rows))
    print(f"{'scheme':<10} {'bits':>4} " + " ".join(f"{'G=' + group_label(g):>18}" for g in groups))
    for scheme, bits in dict.fromkeys((r["scheme"], r["bits"]) for r in rows):
        cells = [next(r for r in rows if (r["scheme"], r["bits"], r["group_size"]) == (scheme, bits, g))
                 for g in groups]
        print(f"{scheme:<10} {bits:>4} "
              + " ".join(f"{c['rel_error']:>10.4f} ({c['bits_per_weight']:5.2f})" for c in cells))
    cols = [fmt for fmt, *_ in FORMATS] + ["INT4 g128 + FP16 embeddings"]
    print("\nweight memory, GB:")
    print(f"{'model':<34} " + " ".join(f"{c:>14}" for c in cols))
    for row in memory:
        print(f"{row['model']:<34} " + " ".join(f"{row[c]:>14.2f}" for c in cols))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("Model")
    model.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                       help="hub id or local transformers folder")
    model.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                       help="where the quantization math runs")
    model.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="dtype the weights are loaded in (the math itself runs in float32)")
    model.add_argument("--max-layers", type=int, default=None,
                       help="only the first N decoder layers (default: all)")
    method = parser.add_argument_group("Method")
    method.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8],
                        help="bit widths to sweep (2..8)")
    method.add_argument("--group-size", type=int, nargs="+", default=[-1, 64, 32],
                        help="group sizes to sweep; -1 = per output channel "
                             "(each must divide every input width)")
    method.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES,
                        help="RTN variants to compare")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if any(not 2 <= b <= 8 for b in args.bits):
        parser.error(f"--bits must lie in 2..8 for this RTN sweep, got {args.bits}")
    if any(g == 0 or g < -1 for g in args.group_size):
        parser.error("--group-size takes -1 (per channel) or a positive group size")
    if args.max_layers is not None and args.max_layers < 1:
        parser.error("--max-layers must be at least 1")


def load_model(name: str, dtype: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(name, dtype=getattr(torch, dtype)).eval()
    except (OSError, ValueError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise Refusal(f"cannot load model {name!r} ({first}): "
                      "pass a hub id or a local transformers folder") from None


def main(args: argparse.Namespace) -> dict:
    check_args(build_parser(), args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise Refusal("--device cuda was asked for but no CUDA GPU is visible: use --device cpu")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # transformers' own loading bar
    model = load_model(args.model, args.dtype)
    weights = linear_weights(model, args.max_layers)
    if not weights:
        raise Refusal(f"no linear layers inside decoder blocks in {args.model!r}: use a decoder LM")
    widths = sorted({W.shape[1] for W in weights.values()})
    bad = [g for g in args.group_size if g != -1 and any(K % g for K in widths)]
    if bad:
        raise Refusal(f"group size {bad[0]} does not divide the input widths {widths}: "
                      "try 32, 64 or -1 (per channel)")
    quiet = args.quiet or not sys.stderr.isatty()
    rows = sweep(weights, args.schemes, args.bits, args.group_size, device, quiet)
    memory = memory_table({**MODELS, **counted_model(model, args.model.rstrip("/").split("/")[-1])})
    print_tables(rows, memory)
    return {"rows": rows, "memory": memory, "n_weights": len(weights),
            "n_params": sum(W.numel() for W in weights.values())}


if __name__ == "__main__":
    try:
        main(build_parser().parse_args())
    except Refusal as why:
        print(f"error: {why}", file=sys.stderr)
        sys.exit(2)
