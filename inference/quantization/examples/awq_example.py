"""AWQ: activation-aware weight quantization, from scratch and with llm-compressor.

What it shows: a few input channels carry much larger activations than the rest, and the
weights that multiply them matter most. AWQ multiplies input channel j of W (N, K) = (out, in)
by s_j = s_X,j^alpha (s_X = mean |x| per channel) before rounding and divides the producer of
that input (RMSNorm weight, or the previous linear's rows) by s: the FP model is unchanged
(`awq_apply`). alpha comes from a grid search on the quantized group's output error
(`awq_search`), then each group's clipping range is searched (`awq_clip`). alpha = 0 is
round-to-nearest (RTN), the baseline. llm-compressor's `AWQModifier` does the same and saves a
packed checkpoint; a CPU-only torch needs one patch (`allow_cpu_only_awq`). It prints each
layer's alpha and loss over RTN's, then one table against the unquantized (FP) model on the
same tokens: perplexity ± s.e., KL divergence, top-1, packed size.

Run it

    python inference/quantization/examples/awq_example.py \
        --model HuggingFaceTB/SmolLM2-135M-Instruct --group-size 64 --methods rtn awq \
        --calib-samples 1 --eval-tokens 512 --n-grid 10

AWQ's KL to the FP model is under half of RTN's there. Without `--methods`, llm-compressor's row
is added. The default group size 128 does not divide SmolLM2's 576: hence `--group-size 64`.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

SEQLEN = 512  # tokens per calibration window and per evaluation window (stride = SEQLEN)


class Refusal(Exception):
    """A run-time refusal: one line that names the problem and the fix (exit code 2)."""


# --- Text: calibration and evaluation never overlap ------------------------------------------
def token_windows(tokenizer, text: str, n: int, seqlen: int, spread: bool = False) -> torch.Tensor:
    """n windows of `seqlen` tokens (n, T): the first ones, or spread evenly over the text."""
    tokenizer.model_max_length = 10**9  # we cut windows ourselves
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])  # (all tokens,)
    if len(ids) < n * seqlen:
        raise Refusal(f"the text has {len(ids)} tokens, fewer than {n} x {seqlen}: ask for less")
    starts = torch.linspace(0, len(ids) - seqlen, n).long() if spread else torch.arange(n) * seqlen
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])  # (n, T)


# --- Round-to-nearest: the baseline, alpha = 0 ----------------------------------------------
def grid(W: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """scale, zero of each row of W (..., G): w ≈ scale · (q − zero), q ∈ [0, 2^b − 1]; symmetric
    (zero = 2^(b−1)) or asymmetric (zero = round(−min / scale), as gptq_example.py explains)."""
    maxq = 2**bits - 1
    if sym:
        scale = W.abs().amax(dim=-1, keepdim=True) / (maxq / 2)
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        lo = W.amin(dim=-1, keepdim=True).clamp(max=0)
        hi = W.amax(dim=-1, keepdim=True).clamp(min=0)
        scale = (hi - lo) / maxq
        zero = torch.round(-lo / scale.clamp(min=1e-12))
    return scale.clamp(min=1e-12), zero


def quantize_rtn(W: torch.Tensor, bits: int, group_size: int, sym: bool):
    """W (N, K) -> q (N, K) integer codes, scale and zero (N, K // G); G = K when group_size = -1."""
    N, K = W.shape
    G = K if group_size == -1 else group_size
    Wg = W.reshape(N, K // G, G)  # (N, K/G, G)
    scale, zero = grid(Wg, bits, sym)  # (N, K/G, 1) each
    q = torch.clamp(torch.round(Wg / scale) + zero, 0, 2**bits - 1)
    return q.reshape(N, K), scale[..., 0], zero[..., 0]


def dequantize_rtn(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The weight (N, K) = scale · (q − zero), each (scale, zero) repeated over its group."""
    G = q.shape[1] // scale.shape[1]
    return scale.repeat_interleave(G, dim=1) * (q - zero.repeat_interleave(G, dim=1))


def fake_quantize(W: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    return dequantize_rtn(*quantize_rtn(W, bits, group_size, sym))


def decoder_linears(model: nn.Module) -> list[nn.Linear]:
    """Every nn.Linear of the decoder layers (embeddings and lm_head stay in full precision)."""
    return [m for layer in model.model.layers for m in layer.modules() if isinstance(m, nn.Linear)]


@torch.no_grad()
def rtn_model(model: nn.Module, bits: int, group_size: int, sym: bool) -> nn.Module:
    """Replace every decoder weight by its round-to-nearest reconstruction (fake quantization)."""
    for linear in decoder_linears(model):
        linear.weight.copy_(fake_quantize(linear.weight.float(), bits, group_size, sym))
    return model


class _Stop(Exception):  # raised once layer 0's inputs are recorded
    pass


@torch.no_grad()
def capture_layer0_inputs(model: nn.Module, calib: torch.Tensor):
    """What decoder layer 0 receives: hidden states (B, T, D) and keyword arguments (rotary
    embeddings, mask...), so that the layers can then run one at a time."""
    seen = {}

    def hook(_module, args, layer_kwargs):
        seen["hidden"] = args[0] if args else layer_kwargs.pop("hidden_states")
        seen["kwargs"] = {k: v for k, v in layer_kwargs.items()
                          if k not in ("past_key_values", "use_cache")}
        raise _Stop

    handle = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model(calib.to(model.device), use_cache=False)
    except _Stop:
        return seen["hidden"], seen["kwargs"]
    finally:
        handle.remove()


# --- AWQ from scratch -------------------------------------------------------------------------
@dataclass
class ScaleGroup:  # linears that read the same input, and `prev`, the module producing it
    name: str
    prev: nn.Module | None
    linears: dict[str, nn.Linear]


def scale_groups(layer: nn.Module) -> list[ScaleGroup]:
    """Input-sharing groups of a Llama layer; o_proj is scaled only if its inputs are v_proj's
    outputs one to one (with grouped-query attention they are not)."""
    attn, mlp = layer.self_attn, layer.mlp
    v_to_o = attn.v_proj if attn.v_proj.out_features == attn.o_proj.in_features else None
    return [ScaleGroup("qkv", layer.input_layernorm, {f"self_attn.{n}_proj": getattr(attn, f"{n}_proj")
                                                      for n in "qkv"}),
            ScaleGroup("o", v_to_o, {"self_attn.o_proj": attn.o_proj}),
            ScaleGroup("gate_up", layer.post_attention_layernorm,
                       {"mlp.gate_proj": mlp.gate_proj, "mlp.up_proj": mlp.up_proj}),
            ScaleGroup("down", mlp.up_proj, {"mlp.down_proj": mlp.down_proj})]


@torch.no_grad()
def group_inputs(layer: nn.Module, groups: list[ScaleGroup], hidden, kwargs) -> dict:
    """Inputs X (n, K) of every group, recorded by a hook on its first linear."""
    seen = {g.name: [] for g in groups}
    handles = [next(iter(g.linears.values())).register_forward_pre_hook(
        lambda _m, args, name=g.name: seen[name].append(args[0].flatten(0, -2).float().cpu()))
        for g in groups]
    try:
        layer(hidden, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(xs) for name, xs in seen.items()}  # (n, K) each


# --8<-- [start:awq_search]
@torch.no_grad()
def awq_search(X: torch.Tensor, weights: list[torch.Tensor], bits: int, group_size: int,
               sym: bool, n_grid: int = 20, n_tokens: int = 2048):
    """Per-input-channel scales s (K,) for linears W_k (N_k, K) sharing an input X (n, K).

    s_X = mean_t |X_tj| is how much input channel j carries. For alpha = 0, 1/n_grid, ...:
        s = s_X^alpha / sqrt(max(s_X^alpha) · min(s_X^alpha))     (centred near 1)
        loss(alpha) = Σ_k mean_t || X W_kᵀ − (X / s) Q(W_k · s)ᵀ ||²
    Salient channels get s > 1: their relative rounding error shrinks. alpha = 0 is RTN,
    so the best loss never exceeds RTN's. Returns (s, best alpha, best loss, RTN loss).
    """
    s_X = X.abs().mean(dim=0)  # (K,)
    Xs = X[:: max(1, len(X) // n_tokens)][:n_tokens]  # (n, K): an even subsample
    Y = [Xs @ W.T for W in weights]  # FP outputs, (n, N_k) each
    losses = []
    for alpha in [i / n_grid for i in range(n_grid)]:
        s = s_X.pow(alpha).clamp(min=1e-4)
        s = s / torch.sqrt(s.max() * s.min())
        loss = sum(float(((Xs / s) @ fake_quantize(W * s, bits, group_size, sym).T - y)
                         .pow(2).sum(1).mean()) for W, y in zip(weights, Y))
        losses.append((loss, alpha, s))
    loss, alpha, s = min(losses, key=lambda t: t[0])
    return s, alpha, loss, losses[0][0]
# --8<-- [end:awq_search]


# --8<-- [start:awq_apply]
@torch.no_grad()
def awq_apply(group: ScaleGroup, s: torch.Tensor) -> None:
    """W ← W · diag(s) for the group's linears; the producer of their input ← output / s.

    y = W x = (W diag(s)) (diag(1/s) x): the FP model computes the same function, but the
    rounded weights now have the salient input channels enlarged."""
    for linear in group.linears.values():
        linear.weight.mul_(s.to(linear.weight))  # (N, K) · (K,): column j times s_j
    prev = group.prev
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s.to(prev.weight).unsqueeze(1))  # (K, K_prev): row j / s_j
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias))
    else:  # RMSNorm: y = weight ⊙ x / rms(x), so dividing its weight divides its output
        prev.weight.div_(s.to(prev.weight))
# --8<-- [end:awq_apply]


# --8<-- [start:awq_clip]
@torch.no_grad()
def awq_clip(W: torch.Tensor, X: torch.Tensor, bits: int, group_size: int,
             sym: bool, n_grid: int = 20, max_shrink: float = 0.5,
             n_tokens: int = 512) -> torch.Tensor:
    """Shrink each group's range to r · [min, max] (r from 1 to 1 − max_shrink) where it
    lowers the output error Σ_t (x_t,g · (w_g − Q(clamp(w_g)))ᵀ)² on calibration tokens:
    an outlier then stops stretching its group's grid. W (N, K), X (n, K) -> clipped W."""
    N, K = W.shape
    G = K if group_size == -1 else group_size
    Xg = X[:: max(1, len(X) // n_tokens)][:n_tokens].reshape(-1, K // G, G)  # (n, K/G, G)
    Wg = W.reshape(N, K // G, G)  # (N, K/G, G)
    ref = torch.einsum("ngk,ogk->nog", Xg, Wg)  # per-group partial outputs, (n, N, K/G)
    hi = (Wg.abs() if sym else Wg).amax(-1, keepdim=True)  # (N, K/G, 1)
    lo = -hi if sym else Wg.amin(-1, keepdim=True)
    best_err, best_r = torch.full_like(hi, float("inf")), torch.ones_like(hi)
    for r in [1 - i / n_grid for i in range(int(max_shrink * n_grid))]:
        Wc = torch.clamp(Wg, r * lo, r * hi)
        scale, zero = grid(Wc, bits, sym)
        Qc = scale * (torch.clamp(torch.round(Wc / scale) + zero, 0, 2**bits - 1) - zero)
        err = (torch.einsum("ngk,ogk->nog", Xg, Qc) - ref).pow(2).mean(0)[..., None]
        best_r = torch.where(err < best_err, r, best_r)
        best_err = torch.minimum(err, best_err)
    return torch.clamp(Wg, best_r * lo, best_r * hi).reshape(N, K)
# --8<-- [end:awq_clip]


@torch.no_grad()
def awq_model(model: nn.Module, calib: torch.Tensor, bits: int, group_size: int, sym: bool,
              n_grid: int = 20, search_tokens: int = 2048, clip: bool = True,
              log=print) -> list[dict]:
    """AWQ layer after layer, each on the outputs of the quantized layers before it: search and
    apply each group's scales, clip (not q/k, as in the AWQ reference: their errors meet in q·k),
    round. Returns one record per group."""
    hidden, kwargs = capture_layer0_inputs(model, calib)
    records = []
    for index, layer in enumerate(model.model.layers):
        X = group_inputs(layer, groups := scale_groups(layer), hidden, kwargs)
        for group in groups:
            record = {"layer": index, "group": group.name, "alpha": None}
            if group.prev is not None:
                weights = [lin.weight.float().cpu() for lin in group.linears.values()]
                s, alpha, loss, rtn_loss = awq_search(X[group.name], weights, bits, group_size,
                                                      sym, n_grid, search_tokens)
                awq_apply(group, s)
                X[group.name] = X[group.name] / s  # what the scaled linears now receive
                record.update(alpha=alpha, loss=loss, rtn_loss=rtn_loss)
            for name, linear in group.linears.items():
                W = linear.weight.float().cpu()
                if clip and name not in ("self_attn.q_proj", "self_attn.k_proj"):
                    W = awq_clip(W, X[group.name], bits, group_size, sym, n_grid)
                linear.weight.copy_(fake_quantize(W, bits, group_size, sym).to(linear.weight))
            records.append(record)
        if log:  # per group: the searched alpha, and the loss it reaches over RTN's
            log(f"layer {index:2d}  " + "  ".join(f"{r['group']} alpha {r['alpha']:.2f} loss/RTN "
                f"{r['loss'] / r['rtn_loss']:.2f}" for r in records[-4:] if r["alpha"] is not None))
        hidden = layer(hidden, **kwargs)  # (B, T, D): the next layer's inputs
    return records


# --- The library: llm-compressor -------------------------------------------------------------
# --8<-- [start:awq_cpu_patch]
def allow_cpu_only_awq() -> None:
    """Workaround for llm-compressor 0.14 on a CPU-only torch.

    AWQModifier pins its cached activations (`IntermediatesCache.pin_memory`) to speed
    up copies to the GPU; pinning needs an accelerator and fails with "Cannot access
    accelerator device when none is available". With no GPU there is nothing to speed up.
    """
    if torch.accelerator.is_available():
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
# --8<-- [end:awq_cpu_patch]


# --8<-- [start:llmcompressor_awq]
def llmcompressor_awq(model: nn.Module, tokenizer, calib: torch.Tensor, bits: int,
                      group_size: int, sym: bool, save_dir: Path) -> nn.Module:
    """AWQModifier (scales) + QuantizationModifier (rounding) on every Linear but lm_head;
    save a compressed-tensors checkpoint and reload it as a reader would."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier
    from transformers import AutoModelForCausalLM

    allow_cpu_only_awq()
    weights = {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": "channel"}
    weights |= {"strategy": "group", "group_size": group_size} if group_size != -1 else {}
    recipe = [AWQModifier(n_grid=20),  # mappings (norm -> q/k/v, ...) from the model
              QuantizationModifier(config_groups={"group_0": {"targets": ["Linear"],
                                                              "weights": weights}},
                                   ignore=["lm_head"])]
    data = Dataset.from_dict({"input_ids": calib.tolist(),
                              "attention_mask": torch.ones_like(calib).tolist()})
    oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=len(calib),
            max_seq_length=calib.shape[1], shuffle_calibration_samples=False)
    model.save_pretrained(save_dir, save_compressed=True)
    tokenizer.save_pretrained(save_dir)
    return AutoModelForCausalLM.from_pretrained(save_dir).eval()
# --8<-- [end:llmcompressor_awq]


# --- Quality on the same tokens, and size --------------------------------------------------
@torch.no_grad()
def log_probs(model: nn.Module, windows: torch.Tensor):
    """Next-token log-probabilities of each window of (NW, T), one (T-1, V) at a time."""
    for w in windows:
        yield torch.log_softmax(model(w[None].to(model.device)).logits[0, :-1].float().cpu(), -1)


@torch.no_grad()
def evaluate(windows: torch.Tensor, reference: list, logqs) -> dict[str, float]:
    """Over the n scored tokens x_t of the windows, with log-probabilities logp of the FP model
    (`reference`) and logq of the quantized one (`logqs`, from log_probs):
        perplexity = exp(mean −log q(x_t)),  s.e. ≈ perplexity · std(nll) / √n  (delta method)
        KL = mean Σ_v p(v) (log p(v) − log q(v)),  top-1 = mean [argmax p = argmax q]
    """
    nll, kl, top1 = [], [], []
    for w, logp, logq in zip(windows, reference, logqs):
        nll.append(-logq.gather(1, w[1:, None]).squeeze(1))  # (T-1,)
        kl.append((logp.exp() * (logp - logq)).sum(-1))
        top1.append((logp.argmax(-1) == logq.argmax(-1)).double())
    nll = torch.cat(nll).double()
    ppl = math.exp(nll.mean())
    return {"perplexity": ppl, "ppl_stderr": ppl * float(nll.std()) / math.sqrt(len(nll)),
            "kl": float(torch.cat(kl).mean()), "top1": float(torch.cat(top1).mean()),
            "eval_tokens": len(nll)}


def quantized_size_mb(model: nn.Module, bits: int | None, group_size: int, sym: bool) -> float:
    """b-bit codes + 16-bit scale (+ b-bit zero) per group, 16 bits elsewhere; None: FP16."""
    total = 16 * sum(p.numel() for p in model.parameters())
    for m in decoder_linears(model) if bits else []:
        N, K = m.weight.shape
        groups = 1 if group_size == -1 else K // group_size
        total += N * K * (bits - 16) + N * groups * (16 + (0 if sym else bits))
    return total / 8 / 1e6


# --- Loading, the table, the command line --------------------------------------------------
def load_model(path: str, device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise Refusal(f"cannot load model {path!r} ({str(error).splitlines()[0][:120]}): "
                      f"pass a local model folder or a hub id you can download") from error
    if not hasattr(getattr(model, "model", None), "layers"):
        raise Refusal(f"{path!r} has no model.layers: use a Llama-style decoder-only model")
    return model.to(device).eval(), tokenizer


def build_parser() -> argparse.ArgumentParser:
    def positive(text: str, low: int = 1, also: tuple[int, ...] = ()) -> int:
        if int(text) < low and int(text) not in also:
            raise argparse.ArgumentTypeError(f"must be at least {low}{' or -1' * bool(also)}: {text}")
        return int(text)

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                        help="hub id or local folder of a Llama-style causal LM")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where the model runs (AWQ's own arithmetic is float32 on the CPU)")
    parser.add_argument("--methods", nargs="+", choices=["rtn", "awq", "llmcompressor"],
                        default=["rtn", "awq", "llmcompressor"],
                        help="rows beside FP: round-to-nearest, AWQ from scratch, llm-compressor")
    parser.add_argument("--bits", type=int, choices=[2, 3, 4, 8], default=4,
                        help="weight bits (llm-compressor: 4 or 8); asymmetric grid, as AWQ")
    parser.add_argument("--group-size", type=lambda t: positive(t, also=(-1,)), default=128,
                        help="inputs sharing one scale; -1 = per channel; must divide in_features")
    parser.add_argument("--calib-samples", type=positive, default=16,
                        help=f"calibration windows of {SEQLEN} tokens")
    parser.add_argument("--eval-tokens", type=lambda t: positive(t, SEQLEN), default=4096,
                        help=f"evaluation tokens, in windows of {SEQLEN}")
    parser.add_argument("--n-grid", type=positive, default=20, help="grid points for alpha and clipping")
    parser.add_argument("--quiet", action="store_true", help="no per-layer lines, only the table")
    return parser


def main(args: argparse.Namespace) -> list[dict]:
    os.environ.update(LLM_COMPRESSOR_LOG_LEVEL="WARNING", TRANSFORMERS_VERBOSITY="error",
                      TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false")  # libraries: quiet
    if args.device == "cuda" and not torch.cuda.is_available():
        raise Refusal("--device cuda but no CUDA GPU is visible: use --device cpu")
    device = {"auto": "cuda" if torch.cuda.is_available() else "cpu"}.get(args.device, args.device)
    if "llmcompressor" in args.methods and (args.bits not in (4, 8)
                                            or importlib.util.find_spec("llmcompressor") is None):
        raise Refusal(f"the llmcompressor row needs --bits 4 or 8 (got {args.bits}) and `pip install "
                      "llmcompressor`: fix that, or leave llmcompressor out of --methods")
    model, tokenizer = load_model(args.model, device)
    for K in sorted({m.in_features for m in decoder_linears(model)}):
        if args.group_size != -1 and K % args.group_size:
            raise Refusal(f"--group-size {args.group_size} does not divide in_features {K}: pass "
                          "a divisor of every in_features (64 for SmolLM2) or -1 for per channel")
    from pydoc_data.topics import topics  # offline text: Python's docs; calibration first 40 %
    text = "\n\n".join(topics[key] for key in sorted(topics))
    cut = text.index("\n\n", int(len(text) * 0.4))
    calib = token_windows(tokenizer, text[:cut], args.calib_samples, SEQLEN, True)  # (B, T)
    evals = token_windows(tokenizer, text[cut:], args.eval_tokens // SEQLEN, SEQLEN)  # (NW, T)
    reference = list(log_probs(model, evals))  # the FP model's, kept
    fp_state = {k: v.clone() for k, v in model.state_dict().items()}
    bits, g = args.bits, args.group_size
    size, size_fp = quantized_size_mb(model, bits, g, False), quantized_size_mb(model, None, g, False)

    rows = [{"method": "FP", **evaluate(evals, reference, reference), "size_mb": size_fp}]
    for method in args.methods:
        model.load_state_dict(fp_state)
        quantized = model
        if method == "rtn":
            rtn_model(model, bits, g, sym=False)
        elif method == "awq":
            awq_model(model, calib, bits, g, False, args.n_grid, log=None if args.quiet else print)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                quantized = llmcompressor_awq(model.cpu(), tokenizer, calib, bits, g, False,
                                              Path(tmp)).to(device)
                model.to(device)
        name = {"rtn": "RTN", "awq": "AWQ", "llmcompressor": "AWQ (llm-comp.)"}[method]
        rows.append({"method": name, **evaluate(evals, reference, log_probs(quantized, evals)),
                     "size_mb": size})
    print(f"\n{'method':<16} {'ppl ± s.e.':>16} {'KL':>8} {'top-1':>7} {'MB':>8}"
          f"   ({rows[0]['eval_tokens']} scored tokens)")
    for r in rows:
        print(f"{r['method']:<16} {r['perplexity']:>8.3f} ± {r['ppl_stderr']:<5.3f} "
              f"{r['kl']:>8.4f} {100 * r['top1']:>6.1f}% {r['size_mb']:>8.1f}")
    return rows


if __name__ == "__main__":
    try:
        main(build_parser().parse_args())
    except Refusal as why:
        print(f"error: {why}", file=sys.stderr)
        sys.exit(2)
