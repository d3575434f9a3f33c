"""GPTQ: quantize a causal LM layer by layer, spreading each column's rounding error over the rest.

What it shows: round-to-nearest (RTN), the baseline, puts each weight of W (N, K) = (out, in)
on a b-bit grid with one scale (and zero) per row and group of G inputs. GPTQ (`quantize_gptq`,
in the paper's symbols H, Hinv, W, Q, Err1) rounds one column at a time and lets the columns not
yet rounded absorb the error, weighted by the inverse Hessian of the layer loss ||W X − Ŵ X||²,
H = 2 X Xᵀ / n. Forward hooks capture each linear's inputs X layer by layer, so layer l is
calibrated on the outputs of the already-quantized layers before it (`gptq_model`), and each
layer's output error is printed for RTN and GPTQ. llm-compressor's `GPTQModifier` does the same
job and saves a packed compressed-tensors checkpoint, which transformers reloads. One table ends
the run: perplexity ± standard error, KL divergence and top-1 agreement against the unquantized
(FP) model on the same evaluation tokens, and the packed size.

Run it

    python inference/quantization/examples/gptq_example.py \
        --model HuggingFaceTB/SmolLM2-135M-Instruct --group-size 64 --methods rtn gptq \
        --calib-samples 2 --eval-tokens 512

It prints one line per decoder layer (output error on the calibration tokens, RTN against
GPTQ), then the table: on SmolLM2 (4 bits, group 64) GPTQ's perplexity and KL to the FP model
come out below RTN's. Drop `--methods` to add llm-compressor's row; `--methods rtn` is the
baseline alone; `--model` takes a hub id or a local folder; the text is Python's own docs.
The default group size 128 does not divide SmolLM2's 576, hence `--group-size 64` (`-1`: per
channel). The full table (3, 4, 8 bits, AWQ, a group-size sweep) comes from bench/quality.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

SEQLEN = 512  # tokens per calibration window and per evaluation window (stride = SEQLEN)


class Refusal(Exception):
    """A run-time refusal: one line that names the problem and the fix (exit code 2)."""


# --- Text: calibration and evaluation never overlap ------------------------------------------
def split_text(data: str) -> tuple[str, str]:
    """(calibration_text, evaluation_text). pydoc: Python's bundled docs, cut after 40 %."""
    if data == "pydoc":
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[key] for key in sorted(topics))
        cut = text.index("\n\n", int(len(text) * 0.4))
        return text[:cut], text[cut:]
    try:
        from datasets import load_dataset

        train, test = (load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
                       for split in ("train", "test"))
        return "".join(train), "\n\n".join(test)
    except Exception as error:  # no `datasets`, no network: one line
        raise Refusal(f"cannot load wikitext-2 ({type(error).__name__}): use --data pydoc") from error


def token_windows(tokenizer, text: str, n: int, seqlen: int, spread: bool = False) -> torch.Tensor:
    """n windows of `seqlen` tokens (n, T): the first ones, or spread evenly over the text."""
    tokenizer.model_max_length = 10**9  # we cut windows ourselves
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])  # (all tokens,)
    if len(ids) < n * seqlen:
        raise Refusal(f"the text has {len(ids)} tokens, fewer than {n} x {seqlen}: ask for less")
    starts = torch.linspace(0, len(ids) - seqlen, n).long() if spread else torch.arange(n) * seqlen
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])  # (n, T)


# --- Round-to-nearest: the baseline, and the grid GPTQ rounds onto ---------------------------
def grid(W: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """scale and zero of each row of W (..., G) so that w ≈ scale · (q − zero), q ∈ [0, 2^b − 1].

    Symmetric:  scale = max|w| / ((2^b − 1) / 2), zero = 2^(b−1)  (grid centred on 0).
    Asymmetric: scale = (max − min) / (2^b − 1), zero = round(−min / scale); 0 is on the grid.
    """
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


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear of the decoder layers (embeddings and lm_head stay in full precision)."""
    return {f"model.layers.{i}.{name}": module for i, layer in enumerate(model.model.layers)
            for name, module in layer.named_modules() if isinstance(module, nn.Linear)}


def check_group_size(model: nn.Module, group_size: int) -> None:
    for name, linear in decoder_linears(model).items():
        if group_size != -1 and linear.in_features % group_size:
            raise Refusal(f"--group-size {group_size} does not divide in_features "
                          f"{linear.in_features} of {name}: pass a divisor of every in_features "
                          f"(64 for SmolLM2) or -1 for per channel")


@torch.no_grad()
def rtn_model(model: nn.Module, bits: int, group_size: int, sym: bool) -> nn.Module:
    """Replace every decoder weight by its round-to-nearest reconstruction (fake quantization)."""
    for linear in decoder_linears(model).values():
        W = linear.weight.float()
        linear.weight.copy_(dequantize_rtn(*quantize_rtn(W, bits, group_size, sym)))
    return model


# --- GPTQ from scratch -----------------------------------------------------------------------
# --8<-- [start:gptq_core]
@torch.no_grad()
def quantize_gptq(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, sym: bool,
                  block_size: int = 128, damp: float = 0.01, act_order: bool = True):
    """Quantize W (N, K) column by column, minimising ||W X − Ŵ X||² for inputs X (K, n).

    H = 2 X Xᵀ / n (K, K). For column i, with d = Hinv[i, i] and q = quant(W[:, i]):
        Err1[:, i] = (W[:, i] − q) / d
        W[:, j]   −= Err1[:, i] · Hinv[i, j]     for every later column j
    where Hinv is the upper Cholesky factor of H⁻¹ (its rows are the H⁻¹ rows needed in
    turn). Damping H += damp · mean(diag H) · I keeps the factorisation stable. Lazy
    batches: inside a block of `block_size` columns the update touches only the block; the
    block's Err1 updates all later columns in one matmul. act_order: columns with the
    largest diag(H) go first, with group scales fixed from W up front ("static groups"),
    so no permutation is stored.
    Returns Q (N, K) integer codes, scale and zero (N, K // G), as quantize_rtn.
    """
    W, H = W.clone().float(), H.clone().float()
    N, K = W.shape
    G = K if group_size == -1 else group_size
    dead = torch.diag(H) == 0  # inputs that were always 0: any weight is exact there
    H[dead, dead] = 1
    W[:, dead] = 0
    scale, zero = (t[..., 0] for t in grid(W.reshape(N, K // G, G), bits, sym))

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K)
    W, H = W[:, perm].T.contiguous(), H[perm][:, perm]  # (K, N): row i is column perm[i]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K)
    H_inverse = torch.cholesky_inverse(torch.linalg.cholesky(H))
    Hinv = torch.linalg.cholesky(H_inverse, upper=True)
    S, Z = scale.T[perm // G].contiguous(), zero.T[perm // G].contiguous()  # (K, N)

    Q = torch.zeros_like(W)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1, Hinv1 = W[i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            if not act_order and G < K and (i1 + i) % G == 0:
                # a group starts: its scales come from the updated W
                s, z = grid(torch.cat([W1[i:], W[i2:]])[:G].T, bits, sym)
                S[i1 + i:i1 + i + G], Z[i1 + i:i1 + i + G] = s.T, z.T
                scale[:, (i1 + i) // G], zero[:, (i1 + i) // G] = s[:, 0], z[:, 0]
            w, s, z = W1[i], S[i1 + i], Z[i1 + i]  # (N,) each
            Q[i1 + i] = q = (w / s).round_().add_(z).clamp_(0, 2**bits - 1)
            torch.div(w - s * (q - z), Hinv1[i, i], out=Err1[i])
            W1[i:].addr_(Hinv1[i, i:], Err1[i], alpha=-1)  # W1[j] -= Hinv1[i,j]·Err1[i]
        W[i2:] -= Hinv[i1:i2, i2:].T @ Err1  # lazy update of every later column
    return Q.T[:, torch.argsort(perm)], scale, zero
# --8<-- [end:gptq_core]


# --8<-- [start:capture_inputs]
class _Stop(Exception):
    """Raised by the hook on decoder layer 0 once its inputs are recorded."""


@torch.no_grad()
def capture_layer0_inputs(model: nn.Module, calib: torch.Tensor, batch_size: int = 8):
    """What decoder layer 0 receives for each calibration batch: hidden states (B, T, D)
    and the keyword arguments (rotary embeddings, mask...), so that the layers can then
    run one at a time."""
    hidden, kwargs = [], []

    def hook(_module, args, layer_kwargs):
        hidden.append(args[0] if args else layer_kwargs.pop("hidden_states"))
        kwargs.append({k: v for k, v in layer_kwargs.items()
                       if k not in ("past_key_values", "use_cache")})
        raise _Stop

    handle = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in calib.split(batch_size):  # (B, T)
            try:
                model(batch.to(model.device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return hidden, kwargs


@torch.no_grad()
def layer_hessians(layer: nn.Module, hidden: list,
                   kwargs: list) -> dict[str, torch.Tensor]:
    """H = 2 X Xᵀ / n (K, K) of every linear in one decoder layer, from input hooks."""
    linears = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
    H = {name: torch.zeros(m.in_features, m.in_features) for name, m in linears.items()}
    seen = dict.fromkeys(linears, 0)

    def make_hook(name: str):
        def hook(_module, args):
            X = args[0].reshape(-1, args[0].shape[-1]).float().cpu()  # (n, K)
            H[name] *= seen[name] / (seen[name] + len(X))  # running mean over all tokens
            seen[name] += len(X)
            H[name] += (2 / seen[name]) * (X.T @ X)
        return hook

    handles = [m.register_forward_pre_hook(make_hook(name))
               for name, m in linears.items()]
    try:
        for h, kw in zip(hidden, kwargs):
            layer(h, **kw)
    finally:
        for handle in handles:
            handle.remove()
    return H
# --8<-- [end:capture_inputs]


def output_error(dW: torch.Tensor, H: torch.Tensor) -> float:
    """Mean ||dW x||² over the calibration tokens = tr(dW H dWᵀ) / 2."""
    return float(((dW @ H) * dW).sum() / 2)


@torch.no_grad()
def gptq_model(model: nn.Module, calib: torch.Tensor, bits: int, group_size: int, sym: bool,
               act_order: bool = True, damp: float = 0.01, block_size: int = 128,
               log=print) -> list[dict[str, Any]]:
    """GPTQ on every decoder layer in turn; returns each linear's RTN and GPTQ output error."""
    hidden, kwargs = capture_layer0_inputs(model, calib)
    stats = []
    for index, layer in enumerate(model.model.layers):
        H = layer_hessians(layer, hidden, kwargs)
        for name, linear in layer.named_modules():
            if isinstance(linear, nn.Linear):
                W = linear.weight.float().cpu()  # (N, K)
                Q = dequantize_rtn(*quantize_gptq(W, H[name], bits, group_size, sym,
                                                  block_size, damp, act_order))
                W_rtn = dequantize_rtn(*quantize_rtn(W, bits, group_size, sym))
                stats.append({"layer": index, "linear": name,
                              "rtn_error": output_error(W - W_rtn, H[name]),
                              "gptq_error": output_error(W - Q, H[name])})
                linear.weight.copy_(Q.to(linear.weight))
        rtn, gptq = (sum(s[key] for s in stats if s["layer"] == index)
                     for key in ("rtn_error", "gptq_error"))
        if log:
            log(f"layer {index:2d}  output error  RTN {rtn:.3e}  GPTQ {gptq:.3e}  ({gptq / rtn:.2f}x)")
        hidden = [layer(h, **kw) for h, kw in zip(hidden, kwargs)]  # inputs of the next layer
    return stats


# --- The library: llm-compressor -------------------------------------------------------------
# --8<-- [start:llmcompressor_gptq]
def llmcompressor_gptq(model: nn.Module, tokenizer, calib: torch.Tensor, bits: int,
                       group_size: int, sym: bool, act_order: bool,
                       save_dir: Path) -> nn.Module:
    """GPTQModifier on every Linear but lm_head; saved as compressed-tensors, reloaded."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    weights = {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": "channel"}
    if group_size != -1:
        weights.update(strategy="group", group_size=group_size)
    recipe = GPTQModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
        ignore=["lm_head"],  # the output layer stays in full precision
        actorder="static" if act_order else None,  # static: fixed groups, as ours
        dampening_frac=0.01, block_size=128)
    data = Dataset.from_dict({"input_ids": calib.tolist(),
                              "attention_mask": torch.ones_like(calib).tolist()})
    oneshot(model=model, dataset=data, recipe=recipe, num_calibration_samples=len(calib),
            max_seq_length=calib.shape[1], shuffle_calibration_samples=False)
    model.save_pretrained(save_dir, save_compressed=True)  # packed int4 codes + scales
    tokenizer.save_pretrained(save_dir)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(save_dir).eval()  # as a reader loads it
# --8<-- [end:llmcompressor_gptq]


# --- Quality on the same tokens, and size ----------------------------------------------------
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
    """Packed size: b-bit codes + a 16-bit scale per group (+ b-bit zero if asymmetric) for the
    decoder linears, 16 bits for every other tensor (tied ones once). bits=None: all 16-bit."""
    total = 16 * sum(p.numel() for p in model.parameters())
    for m in decoder_linears(model).values() if bits else []:
        N, K = m.weight.shape
        groups = 1 if group_size == -1 else K // group_size
        total += N * K * (bits - 16) + N * groups * (16 + (0 if sym else bits))
    return total / 8 / 1e6


# --- Loading, the table, the command line ----------------------------------------------------
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


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'method':<16} {'ppl ± s.e.':>16} {'KL':>8} {'top-1':>7} {'MB':>8}"
          f"   ({rows[0]['eval_tokens']} scored tokens)")
    for r in rows:
        print(f"{r['method']:<16} {r['perplexity']:>8.3f} ± {r['ppl_stderr']:<5.3f} "
              f"{r['kl']:>8.4f} {100 * r['top1']:>6.1f}% {r['size_mb']:>8.1f}")


def build_parser() -> argparse.ArgumentParser:
    def positive(text: str, allowed: tuple[int, ...] = ()) -> int:
        if int(text) <= 0 and int(text) not in allowed:
            raise argparse.ArgumentTypeError(f"must be positive{' or -1' * bool(allowed)}: {text}")
        return int(text)

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                        help="hub id or local folder of a Llama-style causal LM")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="where the model runs (GPTQ's own arithmetic is float32 on the CPU)")
    parser.add_argument("--methods", nargs="+", choices=["rtn", "gptq", "llmcompressor"],
                        default=["rtn", "gptq", "llmcompressor"],
                        help="rows beside FP: round-to-nearest, GPTQ from scratch, llm-compressor")
    parser.add_argument("--bits", type=int, choices=[2, 3, 4, 8], default=4,
                        help="weight bits (llm-compressor: 4 or 8); symmetric grid, as W4A16")
    parser.add_argument("--group-size", type=lambda t: positive(t, (-1,)), default=128,
                        help="inputs sharing one scale; -1 = per channel; must divide in_features")
    parser.add_argument("--data", choices=["pydoc", "wikitext2"], default="pydoc",
                        help="pydoc: offline text of Python's docs; wikitext2: `datasets`, online")
    parser.add_argument("--calib-samples", type=positive, default=16,
                        help=f"calibration windows of {SEQLEN} tokens")
    parser.add_argument("--eval-tokens", type=positive, default=4096,
                        help=f"evaluation tokens, in windows of {SEQLEN}")
    parser.add_argument("--quiet", action="store_true", help="no per-layer lines, only the table")
    return parser


def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    os.environ.update(LLM_COMPRESSOR_LOG_LEVEL="WARNING", TRANSFORMERS_VERBOSITY="error",
                      TQDM_DISABLE="1", TOKENIZERS_PARALLELISM="false")  # libraries: quiet
    if args.device == "cuda" and not torch.cuda.is_available():
        raise Refusal("--device cuda but no CUDA GPU is visible: use --device cpu")
    device = {"auto": "cuda" if torch.cuda.is_available() else "cpu"}.get(args.device, args.device)
    if args.eval_tokens < SEQLEN:
        raise Refusal(f"--eval-tokens {args.eval_tokens} is less than one window: pass {SEQLEN} or more")
    if "llmcompressor" in args.methods:
        if importlib.util.find_spec("llmcompressor") is None:
            raise Refusal("llm-compressor is not installed: `pip install llmcompressor`, "
                          "or leave llmcompressor out of --methods")
        if args.bits not in (4, 8):
            raise Refusal(f"--bits {args.bits} is no compressed-tensors W4A16/W8A16 scheme: "
                          "use 4 or 8, or leave llmcompressor out of --methods")
    model, tokenizer = load_model(args.model, device)
    check_group_size(model, args.group_size)
    calib_text, eval_text = split_text(args.data)
    calib = token_windows(tokenizer, calib_text, args.calib_samples, SEQLEN, spread=True)  # (B, T)
    evals = token_windows(tokenizer, eval_text, args.eval_tokens // SEQLEN, SEQLEN)  # (NW, T)
    reference = list(log_probs(model, evals))  # the FP model's, kept
    fp_state = {k: v.clone() for k, v in model.state_dict().items()}
    bits, g = args.bits, args.group_size
    size = quantized_size_mb(model, bits, g, True)  # the same packed size for every method

    rows = [{"method": "FP", **evaluate(evals, reference, reference),
             "size_mb": quantized_size_mb(model, None, g, True)}]
    for method in args.methods:
        model.load_state_dict(fp_state)
        quantized = model
        if method == "rtn":
            rtn_model(model, bits, g, sym=True)
        elif method == "gptq":
            gptq_model(model, calib, bits, g, sym=True, log=None if args.quiet else print)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                quantized = llmcompressor_gptq(model.cpu(), tokenizer, calib, bits, g, True, True,
                                               Path(tmp)).to(device)
                model.to(device)
        name = {"rtn": "RTN", "gptq": "GPTQ", "llmcompressor": "GPTQ (llm-comp.)"}[method]
        rows.append({"method": name, **evaluate(evals, reference, log_probs(quantized, evals)),
                     "size_mb": size})
    print_table(rows)
    return rows


if __name__ == "__main__":
    try:
        main(build_parser().parse_args())
    except Refusal as why:
        print(f"error: {why}", file=sys.stderr)
        sys.exit(2)
