"""AWQ: activation-aware weight quantization, from scratch and with llm-compressor.

What it shows, in four parts:

1. AWQ written from scratch (`awq_model`): a few input channels carry much larger activations
   than the rest, and the weights that multiply them matter most. For every group of linears that
   share one input (q/k/v after the input norm, gate/up after the post-attention norm, down_proj
   after up_proj, o_proj after v_proj where the shapes allow), scale input channel j of the weights
   by s_j = s_X,j^α (s_X = mean |x| per channel) before rounding, and fold 1/s into whatever
   produces that input (the RMSNorm weight or the previous linear's rows), so the FP function is
   unchanged. α is found by a grid search that minimises the output error of the quantized group
   (`awq_search`), then each weight's clipping range is searched the same way (`awq_clip`).
2. The same job with llm-compressor (`AWQModifier` + `QuantizationModifier`, compressed-tensors
   W4A16 asymmetric, group 64, lm_head left in full precision), saved as a compressed checkpoint.
   On a CPU-only torch, llm-compressor 0.14 needs one patch (`allow_cpu_only_awq`).
3. Quality on the same evaluation tokens for FP, round-to-nearest (RTN) and AWQ: perplexity with
   its standard error, mean KL divergence against the FP model, and top-1 agreement.
4. The saved checkpoint reloaded in transformers, generating a few greedy tokens.

Run it:

    python inference/quantization/examples/awq_example.py --model .cache/models/SmolLM2-135M-Instruct \
        --bits 4 --group-size 64 --method both --json /tmp/awq.json

The data, RTN, evaluation and checkpoint helpers come from gptq_example.py in this folder (an
example's own folder is on `sys.path` when it runs). The measured table of all methods is
`inference/quantization/results/quality-cpu.md` (written by compare_methods.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from gptq_example import (LIBRARY_BITS, SCRATCH_BITS, UserError, calibration_batch, calibration_dataset,
                          capture_layer0_inputs, check_group_size, checkpoint_mb, dequantize, dequantize_rtn,
                          evaluation_windows, final_hidden, library_available, load_model, load_texts,
                          pick_device, print_rows, quant_params, quantize, quantize_rtn, quiet_libraries,
                          reload_and_generate, results_header, rtn_model, run_row, show_progress, weight_scheme,
                          write_json)


def fake_quantize(W: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """Round-to-nearest and back: the weight the quantized model computes with."""
    return dequantize_rtn(*quantize_rtn(W, bits, group_size, sym))


# ----------------------------------------------------------------------------------------------
# Part 1: AWQ from scratch
# ----------------------------------------------------------------------------------------------

@dataclass
class ScaleGroup:
    """Linears that read the same input, and the module `prev` that produces that input."""
    name: str
    prev: nn.Module | None  # RMSNorm or Linear whose output is divided by s; None: no scaling possible
    linears: dict[str, nn.Linear]


def scale_groups(layer: nn.Module) -> list[ScaleGroup]:
    """The four input-sharing groups of a Llama-style decoder layer.

    o_proj can be scaled only when its input channels are v_proj's output channels one to one;
    with grouped-query attention (fewer KV heads) they are not, so o_proj is only clipped.
    """
    attn, mlp = layer.self_attn, layer.mlp
    v_to_o = attn.v_proj if attn.v_proj.out_features == attn.o_proj.in_features else None
    up_to_down = mlp.up_proj if mlp.up_proj.out_features == mlp.down_proj.in_features else None
    return [
        ScaleGroup("qkv", layer.input_layernorm,
                   {"self_attn.q_proj": attn.q_proj, "self_attn.k_proj": attn.k_proj, "self_attn.v_proj": attn.v_proj}),
        ScaleGroup("o", v_to_o, {"self_attn.o_proj": attn.o_proj}),
        ScaleGroup("gate_up", layer.post_attention_layernorm, {"mlp.gate_proj": mlp.gate_proj, "mlp.up_proj": mlp.up_proj}),
        ScaleGroup("down", up_to_down, {"mlp.down_proj": mlp.down_proj}),
    ]


@torch.no_grad()
def capture_group_inputs(layer: nn.Module, groups: list[ScaleGroup], hidden: list[torch.Tensor],
                         kwargs: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Inputs X (N, I) of every group, recorded by a forward hook on its first linear."""
    seen: dict[str, list[torch.Tensor]] = {g.name: [] for g in groups}

    def make_hook(name: str):
        def hook(_module, args):
            seen[name].append(args[0].reshape(-1, args[0].shape[-1]).float().cpu())  # (B·T, I)
        return hook

    handles = [next(iter(g.linears.values())).register_forward_pre_hook(make_hook(g.name)) for g in groups]
    try:
        for h, kw in zip(hidden, kwargs):
            layer(h, **kw)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(xs) for name, xs in seen.items()}


# --8<-- [start:awq_search]
@torch.no_grad()
def awq_search(X: torch.Tensor, weights: list[torch.Tensor], bits: int, group_size: int, sym: bool,
               n_grid: int = 20, n_tokens: int = 2048) -> tuple[torch.Tensor, float, float, float]:
    """Per-input-channel scales s (I,) for linears W_k (O_k, I) that share the input X (N, I).

    s_X = mean_t |X_tj| measures how much input channel j carries. For α on the grid
    0, 1/n, ..., (n−1)/n:
        s = s_X^α / sqrt(max(s_X^α) · min(s_X^α))       (centred so that scales stay near 1)
        loss(α) = Σ_k || X W_kᵀ − (X / s) Q(W_k · s)ᵀ ||²   (mean over tokens)
    Channels with large activations get s > 1: their weights are enlarged before rounding, so
    their relative rounding error shrinks, and the input is divided by s to compensate.
    α = 0 is plain round-to-nearest, so the best loss is never worse than RTN's.
    Returns (s, best α, best loss, RTN loss).
    """
    s_X = X.abs().mean(dim=0)  # (I,)
    step = max(1, X.shape[0] // n_tokens)
    Xs = X[::step][:n_tokens]  # (n, I): an even subsample of the calibration tokens
    Y = [Xs @ W.T for W in weights]  # FP outputs, (n, O_k) each
    best = (torch.ones_like(s_X), 0.0, float("inf"))
    rtn_loss = float("nan")
    for i in range(n_grid):
        alpha = i / n_grid
        s = s_X.pow(alpha).clamp(min=1e-4)
        s = s / torch.sqrt(s.max() * s.min())
        loss = sum(float(((Xs / s) @ fake_quantize(W * s, bits, group_size, sym).T - y).pow(2).sum(1).mean())
                   for W, y in zip(weights, Y))
        if i == 0:
            rtn_loss = loss
        if loss < best[2]:
            best = (s, alpha, loss)
    return best[0], best[1], best[2], rtn_loss
# --8<-- [end:awq_search]


# --8<-- [start:awq_apply]
@torch.no_grad()
def awq_apply(group: ScaleGroup, s: torch.Tensor) -> None:
    """W ← W · diag(s) for every linear of the group, and the producer of their input ← output / s.

    y = W x = (W diag(s)) (diag(1/s) x): the FP model computes exactly the same function, but the
    weights that quantization rounds now have the salient input channels enlarged.
    """
    for linear in group.linears.values():
        linear.weight.mul_(s.to(linear.weight))  # (O, I) · (I,): column j times s_j
    prev = group.prev
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s.to(prev.weight).unsqueeze(1))  # (I, I_prev): row j divided by s_j
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias))
    else:  # RMSNorm: y = weight ⊙ x / rms(x), so dividing its weight divides its output
        prev.weight.div_(s.to(prev.weight))
# --8<-- [end:awq_apply]


# --8<-- [start:awq_clip]
@torch.no_grad()
def awq_clip(W: torch.Tensor, X: torch.Tensor, bits: int, group_size: int, sym: bool,
             n_grid: int = 20, max_shrink: float = 0.5, n_tokens: int = 512) -> torch.Tensor:
    """Shrink each group's range to r · [min, max] (r from 1 down to 1 − max_shrink) when that
    lowers the group's output error  Σ_t (x_t,g · (w_g − Q(clamp(w_g)))ᵀ)²  on calibration tokens.

    One r per output row and group: an outlier weight then stops stretching the grid of the 63
    other weights of its group. W (O, I), X (N, I); returns the clipped W.
    """
    O, I = W.shape
    g = I if group_size == -1 else group_size
    step = max(1, X.shape[0] // n_tokens)
    Xg = X[::step][:n_tokens].reshape(-1, I // g, g)  # (n, G, g)
    Wg = W.reshape(O, I // g, g)  # (O, G, g)
    ref = torch.einsum("ngk,ogk->nog", Xg, Wg)  # per-group partial outputs, (n, O, G)
    hi = Wg.abs().amax(-1, keepdim=True) if sym else Wg.amax(-1, keepdim=True)  # (O, G, 1)
    lo = -hi if sym else Wg.amin(-1, keepdim=True)
    best_err = torch.full((O, I // g, 1), float("inf"))
    best_hi, best_lo = hi.clone(), lo.clone()
    for i in range(int(max_shrink * n_grid)):
        r = 1 - i / n_grid
        Wc = torch.clamp(Wg, r * lo, r * hi)
        s, z = quant_params(Wc, bits, sym)
        Qc = dequantize(quantize(Wc, s, z, bits), s, z)
        err = (torch.einsum("ngk,ogk->nog", Xg, Qc) - ref).pow(2).mean(0).unsqueeze(-1)  # (O, G, 1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_hi = torch.where(better, r * hi, best_hi)
        best_lo = torch.where(better, r * lo, best_lo)
    return torch.clamp(Wg, best_lo, best_hi).reshape(O, I)
# --8<-- [end:awq_clip]


# Clipping q/k is skipped, as in the AWQ reference code: their errors meet in the attention
# scores q·k, which the per-linear objective above does not see.
NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")


@torch.no_grad()
def awq_model(model: nn.Module, calib: torch.Tensor, bits: int, group_size: int, sym: bool,
              n_grid: int = 20, search_tokens: int = 2048, clip: bool = True, batch_size: int = 8,
              progress: bool = True) -> list[dict[str, Any]]:
    """AWQ for a whole causal LM, layer after layer (each layer sees the outputs of the already
    quantized layers before it): search and apply the scales of each input-sharing group, clip,
    then round every linear of the layer to the nearest grid point. Returns one record per group.
    """
    from tqdm.auto import tqdm

    hidden, kwargs = capture_layer0_inputs(model, calib, batch_size)
    records = []
    for index, layer in enumerate(tqdm(list(model.model.layers), desc="AWQ layers", disable=not progress)):
        groups = scale_groups(layer)
        X = capture_group_inputs(layer, groups, hidden, kwargs)
        for group in groups:
            weights = [lin.weight.float().cpu() for lin in group.linears.values()]
            record = {"layer": index, "group": group.name, "alpha": None}
            if group.prev is not None:
                s, alpha, loss, rtn_loss = awq_search(X[group.name], weights, bits, group_size, sym,
                                                      n_grid, search_tokens)
                awq_apply(group, s)
                X[group.name] = X[group.name] / s  # what the scaled linears now receive
                record.update(alpha=alpha, loss=loss, rtn_loss=rtn_loss)
            for name, linear in group.linears.items():
                W = linear.weight.float().cpu()
                if clip and name not in NO_CLIP:
                    W = awq_clip(W, X[group.name], bits, group_size, sym, n_grid)
                linear.weight.copy_(fake_quantize(W, bits, group_size, sym).to(linear.weight))
            records.append(record)
        hidden = [layer(h, **kw) for h, kw in zip(hidden, kwargs)]
    return records


# ----------------------------------------------------------------------------------------------
# Part 2: the production path, llm-compressor
# ----------------------------------------------------------------------------------------------

# --8<-- [start:awq_cpu_patch]
def allow_cpu_only_awq() -> None:
    """Workaround for llm-compressor 0.14.0.1 on a CPU-only torch.

    AWQModifier's smoothing step pins its cached activations (`IntermediatesCache.pin_memory`) to
    speed up host-to-GPU copies; pinning needs an accelerator and fails with "Cannot access
    accelerator device when none is available". Without an accelerator there is no copy to speed
    up, so pinning is skipped. With a GPU nothing is changed.
    """
    if torch.accelerator.is_available():
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    def no_pinning(self, batch_index: int, input_names: list[str] | None = None) -> None:
        return None

    IntermediatesCache.pin_memory = no_pinning
# --8<-- [end:awq_cpu_patch]


# --8<-- [start:llmcompressor_awq]
def llmcompressor_awq(model: nn.Module, tokenizer, calib: torch.Tensor, bits: int, group_size: int,
                      sym: bool, n_grid: int, save_dir: Path) -> Path:
    """Scale with llm-compressor's AWQModifier, quantize with QuantizationModifier, save compressed."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier

    allow_cpu_only_awq()
    recipe = [
        AWQModifier(n_grid=n_grid),  # mappings (norm -> q/k/v, ...) inferred from the architecture
        QuantizationModifier(config_groups=weight_scheme(bits, group_size, sym), ignore=["lm_head"]),
    ]
    oneshot(model=model, dataset=calibration_dataset(calib), recipe=recipe,
            num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1],
            shuffle_calibration_samples=False)
    model.save_pretrained(save_dir, save_compressed=True)
    tokenizer.save_pretrained(save_dir)
    return save_dir
# --8<-- [end:llmcompressor_awq]


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
                       help="dtype of the model; AWQ's own arithmetic is always float32")
    model.add_argument("--seed", type=int, default=0, help="seed for the calibration windows")
    method = parser.add_argument_group("Method")
    method.add_argument("--method", choices=["scratch", "library", "both"], default="both",
                        help="AWQ from scratch, with llm-compressor, or both")
    method.add_argument("--bits", type=int, default=4,
                        help="weight bits: 2, 3, 4 or 8 from scratch; 4 or 8 with the library")
    method.add_argument("--group-size", type=int, default=64,
                        help="columns sharing one scale; -1 = per output channel; must divide in_features")
    method.add_argument("--sym", action=argparse.BooleanOptionalAction, default=False,
                        help="symmetric grid; the default is asymmetric (zero point), as AWQ checkpoints use")
    method.add_argument("--n-grid", type=int, default=20, help="grid points for α (and for clipping)")
    method.add_argument("--search-tokens", type=int, default=2048,
                        help="calibration tokens used to score each α (from scratch)")
    method.add_argument("--clip", action=argparse.BooleanOptionalAction, default=True,
                        help="search a clipping range per group after scaling (from scratch)")
    data = parser.add_argument_group("Data")
    data.add_argument("--data", choices=["pydoc", "wikitext2"], default="pydoc",
                      help="pydoc: offline text from Python's docs; wikitext2: via `datasets` (online)")
    data.add_argument("--calib-samples", type=int, default=32, help="number of calibration windows")
    data.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration window")
    data.add_argument("--eval-tokens", type=int, default=16384, help="evaluation tokens (cut into windows)")
    data.add_argument("--ctx", type=int, default=512, help="evaluation window length; stride = ctx")
    out = parser.add_argument_group("Output")
    out.add_argument("--save", default=None, help="folder for the library's compressed checkpoint "
                     "(default: a temporary folder, deleted at the end)")
    out.add_argument("--json", default=None, help="write the results to this JSON file")
    out.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def validate(args: argparse.Namespace) -> None:
    allowed = SCRATCH_BITS if args.method == "scratch" else tuple(b for b in SCRATCH_BITS if b in LIBRARY_BITS)
    if args.bits not in allowed:
        where = "from scratch" if args.method == "scratch" else f"with --method {args.method}"
        raise UserError(f"--bits {args.bits} is not supported {where}: choose from {', '.join(map(str, allowed))}")
    for flag in ("calib_samples", "calib_seqlen", "eval_tokens", "ctx", "n_grid", "search_tokens"):
        if getattr(args, flag) <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be positive")


def main(args: argparse.Namespace) -> dict[str, Any]:
    validate(args)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    progress = show_progress(args.quiet)
    quiet_libraries(progress)
    model, tokenizer = load_model(args.model, device, args.dtype)
    check_group_size(model, args.group_size)
    if args.method != "scratch" and (reason := library_available()):
        raise UserError(reason)

    calib_text, eval_text = load_texts(args.data)
    calib = calibration_batch(tokenizer, calib_text, args.calib_samples, args.calib_seqlen, args.seed)
    windows = evaluation_windows(tokenizer, eval_text, args.eval_tokens, args.ctx)
    ref_hidden = final_hidden(model, windows, progress)
    ref_head = model.lm_head.weight.detach().float().cpu().clone()
    fp_state = {k: v.clone() for k, v in model.state_dict().items()}

    result = results_header(device, "llmcompressor", "compressed-tensors")
    result.update({"model": args.model, "data": args.data, "calibration": list(calib.shape),
                   "eval": {"tokens": windows.numel(), "ctx": args.ctx, "stride": args.ctx,
                            "scored_tokens": windows.shape[0] * (args.ctx - 1)},
                   "settings": {k: getattr(args, k) for k in ("bits", "group_size", "sym", "n_grid",
                                                               "search_tokens", "clip", "method")}})
    rows = [run_row("fp", "reference", model, windows, ref_hidden, ref_head, args, bits=16, group_size=-1)]
    rows.append(run_row("rtn", "scratch", rtn_model(model, args.bits, args.group_size, args.sym),
                        windows, ref_hidden, ref_head, args))

    if args.method in ("scratch", "both"):
        model.load_state_dict(fp_state)
        start = time.perf_counter()
        records = awq_model(model, calib, args.bits, args.group_size, args.sym, args.n_grid,
                            args.search_tokens, args.clip, progress=progress)
        rows.append(run_row("awq", "scratch", model, windows, ref_hidden, ref_head, args,
                            time.perf_counter() - start, clip=args.clip))
        result["scale_search"] = records

    if args.method in ("library", "both"):
        model.load_state_dict(fp_state)
        with tempfile.TemporaryDirectory() as tmp:
            save_dir = Path(args.save) if args.save else Path(tmp)
            start = time.perf_counter()
            llmcompressor_awq(model.cpu(), tokenizer, calib, args.bits, args.group_size, args.sym,
                              args.n_grid, save_dir)
            seconds = time.perf_counter() - start
            reloaded, generation = reload_and_generate(save_dir, tokenizer, device)
            rows.append(run_row("awq", "llmcompressor", reloaded, windows, ref_hidden, ref_head, args, seconds))
            result["checkpoint"] = {"path": str(save_dir) if args.save else None,
                                    "format": "compressed-tensors", "safetensors_mb": checkpoint_mb(save_dir),
                                    "reload_generation": generation}
    result["rows"] = rows
    write_json(args.json, result)
    if not args.quiet:
        print_rows(rows, result["eval"]["scored_tokens"])
    return result


if __name__ == "__main__":
    try:
        main(build_parser().parse_args())
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
