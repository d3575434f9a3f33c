"""GPTQ: quantize a causal LM layer by layer with second-order error compensation.

What it shows, in four parts:

1. GPTQ written from scratch (`gptq_quantize`): for every linear layer of every decoder layer,
   quantize the weight W one column at a time and spread each column's rounding error over the
   columns not yet quantized, weighted by the inverse Hessian H = 2 X Xᵀ of the layer's inputs.
   The inputs X are captured with forward hooks, decoder layer after decoder layer: each layer
   is calibrated on the outputs of the already-quantized layers before it (`gptq_model`).
2. The same job with the maintained production library llm-compressor (`oneshot` + `GPTQModifier`,
   compressed-tensors W4A16, group 64, symmetric, lm_head left in full precision), saved as a
   compressed checkpoint that transformers and vLLM load.
3. Quality on the same evaluation tokens for FP, round-to-nearest (RTN) and GPTQ: perplexity with
   its standard error and token count, mean KL divergence of the next-token distributions against
   the FP model, and top-1 agreement.
4. The saved checkpoint reloaded in transformers, generating a few greedy tokens.

Run it (offline text from Python's own docs; `--model` takes a hub id or a local folder):

    python inference/quantization/examples/gptq_example.py --model .cache/models/SmolLM2-135M-Instruct \
        --bits 4 --group-size 64 --method both --save /tmp/smollm2-w4a16 --json /tmp/gptq.json

On SmolLM2-135M with 4 bits, group 64, GPTQ lands well below RTN in perplexity and KL; the
measured table is `inference/quantization/results/quality-cpu.md` (written by compare_methods.py).

`awq_example.py` and `compare_methods.py` in this folder import the data, evaluation and RTN
helpers from this file (an example's own folder is on `sys.path` when it runs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

SCRATCH_BITS = (2, 3, 4, 8)
# compressed-tensors' integer weight-only presets that vLLM's W4A16/W8A16 kernels serve.
LIBRARY_BITS = (4, 8)
PROMPT = "The capital of France is"
QPARAM_NAMES = ("weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape")


class UserError(Exception):
    """Bad input the reader can fix; main() turns it into one `error: ...` line and exit code 2."""


# ----------------------------------------------------------------------------------------------
# Data: calibration and evaluation text that never overlap
# ----------------------------------------------------------------------------------------------

def load_texts(data: str) -> tuple[str, str]:
    """Return (calibration_text, evaluation_text).

    `pydoc`: Python's bundled `pydoc_data.topics`, joined in key order and cut at the first
    paragraph break after 40 % of the characters (CONTRIBUTING.md). `wikitext2`: the train split
    for calibration and the test split for evaluation, through the `datasets` loader (online).
    """
    if data == "pydoc":
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[key] for key in sorted(topics))
        cut = text.index("\n\n", int(len(text) * 0.4))
        return text[:cut], text[cut:]
    try:
        from datasets import load_dataset
    except ImportError as error:
        raise UserError("--data wikitext2 needs `pip install datasets` (or use --data pydoc)") from error
    try:
        train = load_dataset("wikitext", "wikitext-2-raw-v1", split="train")
        test = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    except Exception as error:  # network or hub errors: say it in one line
        raise UserError(f"cannot load wikitext-2 ({type(error).__name__}); use --data pydoc offline") from error
    return "".join(train["text"]), "\n\n".join(test["text"])


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one row of token ids (no special tokens), shape (N,)."""
    tokenizer.model_max_length = 10**9  # we cut windows ourselves; silence the length warning
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def calibration_batch(tokenizer, text: str, n_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`n_samples` random windows of `seqlen` tokens from the calibration text, shape (N, T)."""
    ids = tokenize(tokenizer, text)
    if len(ids) <= seqlen:
        raise UserError(f"calibration text has {len(ids)} tokens, fewer than --calib-seqlen {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seqlen, (n_samples,), generator=gen)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])  # (N, T)


def evaluation_windows(tokenizer, text: str, n_tokens: int, ctx: int) -> torch.Tensor:
    """The first `n_tokens` evaluation tokens cut into non-overlapping windows (stride = ctx).

    Shape (NW, ctx). Each window predicts its tokens 2..ctx, so ctx - 1 tokens are scored per window.
    """
    ids = tokenize(tokenizer, text)[:n_tokens]
    n_windows = len(ids) // ctx
    if n_windows == 0:
        raise UserError(f"--eval-tokens {n_tokens} gives no full window of --ctx {ctx} tokens")
    return ids[: n_windows * ctx].view(n_windows, ctx)  # (NW, T)


# ----------------------------------------------------------------------------------------------
# Round-to-nearest: the baseline, and the grid GPTQ rounds onto
# ----------------------------------------------------------------------------------------------

# --8<-- [start:rtn]
def quant_params(W: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale s and zero point z for each row of W (..., g), so that w ≈ s · (q − z), q ∈ [0, 2^b − 1].

    Asymmetric: s = (max − min) / (2^b − 1), z = round(−min / s).
    Symmetric:  s = max|w| / ((2^b − 1) / 2), z = 2^(b−1)  (the grid is centred on zero).
    """
    maxq = 2**bits - 1
    if sym:
        s = W.abs().amax(dim=-1, keepdim=True) / (maxq / 2)
        z = torch.full_like(s, 2 ** (bits - 1))
    else:
        lo = W.amin(dim=-1, keepdim=True).clamp(max=0)
        hi = W.amax(dim=-1, keepdim=True).clamp(min=0)
        s = (hi - lo) / maxq
        z = torch.round(-lo / s.clamp(min=1e-12))
    return s.clamp(min=1e-12), z


def quantize(W: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes q = clamp(round(w / s) + z, 0, 2^b − 1)."""
    return torch.clamp(torch.round(W / s) + z, 0, 2**bits - 1)


def dequantize(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """w_hat = s · (q − z)."""
    return s * (q - z)


def quantize_rtn(W: torch.Tensor, bits: int, group_size: int, sym: bool):
    """Round-to-nearest of W (O, I) with one (s, z) per row and group of `group_size` columns.

    Returns q (O, I) integer codes and s, z of shape (O, I / g); group_size −1 means one group
    per row (per channel).
    """
    O, I = W.shape
    g = I if group_size == -1 else group_size
    Wg = W.reshape(O, I // g, g)  # (O, G, g)
    s, z = quant_params(Wg, bits, sym)  # (O, G, 1) each
    q = quantize(Wg, s, z, bits)
    return q.reshape(O, I), s.squeeze(-1), z.squeeze(-1)


def dequantize_rtn(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_rtn: W_hat (O, I) from codes and per-group s, z of shape (O, G)."""
    O, I = q.shape
    G = s.shape[1]
    return dequantize(q.reshape(O, G, I // G), s.unsqueeze(-1), z.unsqueeze(-1)).reshape(O, I)
# --8<-- [end:rtn]


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the decoder layers (the lm_head and embeddings stay in full precision)."""
    return {f"model.layers.{i}.{name}": module
            for i, layer in enumerate(model.model.layers)
            for name, module in layer.named_modules() if isinstance(module, nn.Linear)}


@torch.no_grad()
def rtn_model(model: nn.Module, bits: int, group_size: int, sym: bool) -> nn.Module:
    """Replace every decoder linear weight by its round-to-nearest reconstruction (fake quantization)."""
    for linear in decoder_linears(model).values():
        W = linear.weight.float()
        linear.weight.copy_(dequantize_rtn(*quantize_rtn(W, bits, group_size, sym)).to(linear.weight.dtype))
    return model


def check_group_size(model: nn.Module, group_size: int) -> None:
    """Group-wise scales need groups that tile each row: g must divide every in_features."""
    if group_size == -1:
        return
    if group_size <= 0:
        raise UserError(f"--group-size must be positive or -1 (per channel), got {group_size}")
    for name, linear in decoder_linears(model).items():
        if linear.in_features % group_size:
            raise UserError(
                f"--group-size {group_size} does not divide in_features {linear.in_features} of {name}; "
                f"pick a divisor (e.g. 64 or 32 for hidden size 576) or -1 for per channel")


# ----------------------------------------------------------------------------------------------
# Part 1: GPTQ from scratch
# ----------------------------------------------------------------------------------------------

# --8<-- [start:gptq_core]
@torch.no_grad()
def gptq_quantize(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, sym: bool,
                  block_size: int = 128, damp: float = 0.01, act_order: bool = True):
    """Quantize W (O, I) column by column, minimising ||W X − Q X||² for inputs X (I, N).

    H = 2 X Xᵀ / N (I, I) is the Hessian of that objective. For column i, with d = [H⁻¹]_ii:

        Q[:, i]  = quant(W[:, i])
        Err[:, i] = (W[:, i] − Q[:, i]) / d
        W[:, j] −= Err[:, i] · [H⁻¹]_ij      for every later column j > i

    (the optimal-brain-quantization update: the remaining columns absorb the rounding error).
    Implementation choices of the GPTQ paper, each one line or two below:
    - damping: H += damp · mean(diag H) · I keeps the Cholesky factorisation stable;
    - Cholesky form: the rows [H⁻¹]_i,i: needed in turn are the rows of the upper Cholesky factor
      of H⁻¹, so Hinv = chol(H⁻¹)ᵀ is computed once instead of re-inverting after every column;
    - lazy batches: columns are processed in blocks of `block_size`; inside a block the update
      touches only the block, and the accumulated Err updates all later columns in one matmul;
    - act-order: columns with the largest diag(H) (the inputs with the most energy) go first,
      while more columns remain to absorb their error. Group scales are then fixed up front
      from W ("static groups"), so the checkpoint needs no column permutation.
    Returns (Q, s, z): the dequantized weight (O, I) and per-group scale and zero point (O, G).
    """
    W = W.clone().float()
    H = H.clone().float()
    O, I = W.shape
    g = I if group_size == -1 else group_size
    G = I // g

    dead = torch.diag(H) == 0  # inputs that were always zero: any value is exact, use 0
    H[dead, dead] = 1
    W[:, dead] = 0

    s = torch.zeros(O, G)
    z = torch.zeros(O, G)
    if act_order or g == I:  # static groups: scales from the unmodified W
        s_all, z_all = quant_params(W.reshape(O, G, g), bits, sym)
        s, z = s_all.squeeze(-1), z_all.squeeze(-1)

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(I)
    W, H = W[:, perm], H[perm][:, perm]

    H += damp * torch.mean(torch.diag(H)) * torch.eye(I)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    Q = torch.zeros_like(W)
    for i1 in range(0, I, block_size):
        i2 = min(i1 + block_size, I)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])  # this column's index in the original W
            k = col // g  # its group
            if not act_order and g != I and col % g == 0:
                # first column of a group: scales from the group's current (already updated) values
                group = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :g]
                s_k, z_k = quant_params(group, bits, sym)
                s[:, k], z[:, k] = s_k.squeeze(-1), z_k.squeeze(-1)
            w = W1[:, i]
            d = Hinv1[i, i]
            q = dequantize(quantize(w, s[:, k], z[:, k], bits), s[:, k], z[:, k])
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)  # update inside the block
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # lazy update of every later column, one matmul

    Q = Q[:, torch.argsort(perm)]  # back to the original column order
    return Q, s, z
# --8<-- [end:gptq_core]


# --8<-- [start:capture_inputs]
class _StopForward(Exception):
    """Raised by the hook on the first decoder layer once its inputs are recorded."""


@torch.no_grad()
def capture_layer0_inputs(model: nn.Module, calib: torch.Tensor, batch_size: int):
    """Run the embeddings on the calibration batch and record what decoder layer 0 receives.

    Returns (hidden, kwargs): per calibration batch, the hidden states (B, T, D) and the keyword
    arguments every decoder layer is called with (rotary position embeddings, attention mask, ...),
    so that the layers can then be run one at a time without the rest of the model.
    """
    hidden: list[torch.Tensor] = []
    kwargs: list[dict[str, Any]] = []

    def hook(_module, args, layer_kwargs):
        hidden.append(args[0] if args else layer_kwargs.pop("hidden_states"))
        kwargs.append({k: v for k, v in layer_kwargs.items() if k not in ("past_key_values", "use_cache")})
        raise _StopForward

    handle = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in calib.split(batch_size):  # (B, T) each
            try:
                model(batch.to(model.device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return hidden, kwargs


@torch.no_grad()
def layer_hessians(layer: nn.Module, hidden: list[torch.Tensor], kwargs: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """H = 2 X Xᵀ / N for every linear of one decoder layer, from forward hooks on its inputs."""
    linears = {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
    H = {name: torch.zeros(m.in_features, m.in_features) for name, m in linears.items()}
    count = {name: 0 for name in linears}

    def make_hook(name: str):
        def hook(_module, args):
            X = args[0].reshape(-1, args[0].shape[-1]).float().cpu()  # (B·T, I)
            n = X.shape[0]
            # running mean of 2 X Xᵀ over all tokens seen so far
            H[name] *= count[name] / (count[name] + n)
            count[name] += n
            H[name] += (2 / count[name]) * (X.T @ X)
        return hook

    handles = [m.register_forward_pre_hook(make_hook(name)) for name, m in linears.items()]
    try:
        for h, kw in zip(hidden, kwargs):
            layer(h, **kw)
    finally:
        for handle in handles:
            handle.remove()
    return H
# --8<-- [end:capture_inputs]


@torch.no_grad()
def gptq_model(model: nn.Module, calib: torch.Tensor, bits: int, group_size: int, sym: bool,
               block_size: int, damp: float, act_order: bool, batch_size: int = 8,
               progress: bool = True) -> list[dict[str, Any]]:
    """GPTQ for a whole causal LM, sequentially: layer l is calibrated on the outputs of the
    already-quantized layers 0..l−1. Returns one record per linear with its output error on the
    calibration inputs, tr((W − Q) H (W − Q)ᵀ) / 2, before (RTN) and after GPTQ.
    """
    from tqdm.auto import tqdm

    hidden, kwargs = capture_layer0_inputs(model, calib, batch_size)
    stats = []
    layers = list(model.model.layers)
    for index, layer in enumerate(tqdm(layers, desc="GPTQ layers", disable=not progress)):
        H = layer_hessians(layer, hidden, kwargs)
        for name, linear in layer.named_modules():
            if not isinstance(linear, nn.Linear):
                continue
            W = linear.weight.float().cpu()
            Q, _, _ = gptq_quantize(W, H[name], bits, group_size, sym, block_size, damp, act_order)
            W_rtn = dequantize_rtn(*quantize_rtn(W, bits, group_size, sym))
            stats.append({"layer": f"model.layers.{index}.{name}",
                          "rtn_error": _output_error(W - W_rtn, H[name]),
                          "gptq_error": _output_error(W - Q, H[name])})
            linear.weight.copy_(Q.to(linear.weight.dtype).to(linear.weight.device))
        hidden = [layer(h, **kw) for h, kw in zip(hidden, kwargs)]  # next layer's inputs, from this quantized one
    return stats


def _output_error(dW: torch.Tensor, H: torch.Tensor) -> float:
    """Mean squared output error over the calibration tokens: tr(dW H dWᵀ) / 2 = mean ||dW x||²."""
    return float(torch.einsum("oi,ij,oj->", dW, H, dW) / 2)


# ----------------------------------------------------------------------------------------------
# Part 2: the production path, llm-compressor
# ----------------------------------------------------------------------------------------------

def weight_scheme(bits: int, group_size: int, sym: bool) -> dict[str, Any]:
    """A compressed-tensors weight-only integer scheme: W{bits}A16, group-wise or per channel."""
    if bits not in LIBRARY_BITS:
        raise UserError(f"--bits {bits} is not a compressed-tensors W4A16/W8A16 scheme; the library path "
                        f"takes {' or '.join(map(str, LIBRARY_BITS))} (use --method scratch for 2 or 3 bits)")
    weights = {"num_bits": bits, "type": "int", "symmetric": sym,
               "strategy": "channel" if group_size == -1 else "group"}
    if group_size != -1:
        weights["group_size"] = group_size
    return {"group_0": {"targets": ["Linear"], "weights": weights}}


def calibration_dataset(calib: torch.Tensor):
    """llm-compressor takes a tokenized `datasets.Dataset` with input_ids and attention_mask."""
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})


def library_available() -> str | None:
    """None when llm-compressor imports, else the reason in one line."""
    try:
        import llmcompressor  # noqa: F401
    except ImportError as error:
        return f"llm-compressor is not installed ({error}); `pip install llmcompressor` for the library path"
    return None


# --8<-- [start:llmcompressor_gptq]
def llmcompressor_gptq(model: nn.Module, tokenizer, calib: torch.Tensor, bits: int, group_size: int, sym: bool,
                       act_order: bool, damp: float, block_size: int, save_dir: Path) -> Path:
    """Quantize with llm-compressor's GPTQModifier and save a compressed-tensors checkpoint."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    recipe = GPTQModifier(
        config_groups=weight_scheme(bits, group_size, sym),
        ignore=["lm_head"],  # the output layer stays in full precision
        actorder="static" if act_order else None,  # "static": act-order with fixed groups, as ours
        dampening_frac=damp,
        block_size=block_size,
    )
    oneshot(model=model, dataset=calibration_dataset(calib), recipe=recipe,
            num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1],
            shuffle_calibration_samples=False)
    model.save_pretrained(save_dir, save_compressed=True)  # packed int4 + scales (compressed-tensors)
    tokenizer.save_pretrained(save_dir)
    return save_dir
# --8<-- [end:llmcompressor_gptq]


# --8<-- [start:save_reload]
@torch.no_grad()
def reload_and_generate(save_dir: Path, tokenizer, device: str, new_tokens: int = 8) -> tuple[nn.Module, dict]:
    """Load the compressed checkpoint as a reader would, and generate greedily from PROMPT."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(save_dir, dtype=torch.float32).to(device).eval()
    return model, greedy(model, tokenizer, new_tokens)


@torch.no_grad()
def greedy(model: nn.Module, tokenizer, new_tokens: int = 8) -> dict[str, Any]:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids.to(model.device)
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)[0, ids.shape[1]:]
    return {"prompt": PROMPT, "token_ids": out.tolist(), "text": tokenizer.decode(out)}
# --8<-- [end:save_reload]


def checkpoint_mb(folder: Path) -> float:
    """Size of the weight files of a saved checkpoint, in MB."""
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 1e6


# ----------------------------------------------------------------------------------------------
# Part 3: quality on the same evaluation tokens
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def final_hidden(model: nn.Module, windows: torch.Tensor, progress: bool = False) -> torch.Tensor:
    """Final hidden states (after the last norm) of every evaluation window, (NW, T, D), on the CPU.

    Kept for the FP model only: with the lm_head left in full precision, the FP logits of any
    window are recomputed from them in one matmul instead of storing NW·T·V probabilities.
    """
    from tqdm.auto import tqdm

    out = [model.model(w.unsqueeze(0).to(model.device)).last_hidden_state[0].float().cpu()
           for w in tqdm(windows, desc="FP reference", disable=not progress)]
    return torch.stack(out)


# --8<-- [start:kl_top1]
def token_metrics(logq: torch.Tensor, logp: torch.Tensor, target: torch.Tensor):
    """Per scored token t, from log-probabilities of the quantized model (logq) and the FP model
    (logp), both (T, V), and the true next tokens (T,):

        nll_t  = −log q(x_t)
        KL_t   = Σ_v p(v) (log p(v) − log q(v))     how far the whole distribution moved
        top1_t = [argmax p = argmax q]               does greedy decoding pick the same token
    """
    nll = -logq.gather(1, target.unsqueeze(1)).squeeze(1)
    kl = torch.sum(logp.exp() * (logp - logq), dim=-1)
    top1 = (logp.argmax(-1) == logq.argmax(-1)).float()
    return nll, kl, top1
# --8<-- [end:kl_top1]


# --8<-- [start:perplexity]
@torch.no_grad()
def evaluate(model: nn.Module, windows: torch.Tensor, ref_hidden: torch.Tensor, ref_head: torch.Tensor,
             progress: bool = False) -> dict[str, float]:
    """Perplexity of `model` on the windows (NW, T), and its agreement with the FP reference.

    Each window scores its T − 1 next-token predictions; over all N scored tokens
        perplexity = exp(mean nll),   stderr ≈ perplexity · std(nll) / √N   (delta method)
    plus the mean KL divergence and top-1 agreement against the FP model (`token_metrics`).
    `ref_hidden` (NW, T, D) are the FP model's final hidden states and `ref_head` (V, D) its lm_head.
    """
    from tqdm.auto import tqdm

    per_token = []
    for w, h_ref in tqdm(list(zip(windows, ref_hidden)), desc="evaluate", disable=not progress):
        logits = model(w.unsqueeze(0).to(model.device)).logits[0, :-1]  # (T-1, V)
        logq = torch.log_softmax(logits.float().cpu(), dim=-1)
        logp = torch.log_softmax(h_ref[:-1] @ ref_head.T, dim=-1)  # FP reference, (T-1, V)
        per_token.append(token_metrics(logq, logp, w[1:]))
    nll, kl, top1 = (torch.cat(column).double() for column in zip(*per_token))
    n = nll.numel()
    ppl = math.exp(nll.mean())
    return {"perplexity": ppl, "ppl_stderr": ppl * float(nll.std()) / math.sqrt(n),
            "kl": float(kl.mean()), "top1": float(top1.mean()), "eval_tokens": n}
# --8<-- [end:perplexity]


# ----------------------------------------------------------------------------------------------
# Storage: what a quantized model really occupies
# ----------------------------------------------------------------------------------------------

def quantized_size_mb(model: nn.Module, bits: int | None, group_size: int, sym: bool) -> float:
    """Bytes of a packed checkpoint, in MB: b-bit codes + a 16-bit scale per group (+ a b-bit zero
    point when asymmetric) for the decoder linears, 16 bits for every other tensor (embeddings,
    norms, lm_head; tied tensors once). bits=None gives the 16-bit model.
    """
    seen, total_bits = set(), 0
    linears = decoder_linears(model) if bits else {}
    quantized = {id(m.weight) for m in linears.values()}
    for linear in linears.values():
        O, I = linear.weight.shape
        G = 1 if group_size == -1 else I // group_size
        total_bits += O * I * bits + O * G * (16 + (0 if sym else bits))
    for name, p in model.named_parameters(remove_duplicate=False):
        # a reloaded compressed-tensors model keeps its scales and zero points as parameters:
        # they are counted by the formula above
        if id(p) in seen or id(p) in quantized or name.rsplit(".", 1)[-1] in QPARAM_NAMES:
            continue
        seen.add(id(p))
        total_bits += p.numel() * 16
    return total_bits / 8 / 1e6


def bits_per_weight(bits: int, group_size: int, in_features: int, sym: bool) -> float:
    """Storage bits per quantized weight: b + (16 + zero bits) / g."""
    g = in_features if group_size == -1 else group_size
    return bits + (16 + (0 if sym else bits)) / g


# ----------------------------------------------------------------------------------------------
# Shared plumbing: model loading, results header
# ----------------------------------------------------------------------------------------------

def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA GPU is visible; use --device cpu")
    return device


def load_model(path: str, device: str, dtype: str):
    """(model, tokenizer) from a hub id or a local folder; a bad path is a one-line error."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load model {path!r} (give a local model folder or a hub id): "
                        f"{str(error).splitlines()[0]}") from error
    if not hasattr(model, "model") or not hasattr(model.model, "layers"):
        raise UserError(f"{path!r} is not a decoder-only model with model.layers (Llama-style)")
    return model.to(device).eval(), tokenizer


def hardware_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions(*packages: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", *packages):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def results_header(device: str, *packages: str) -> dict[str, Any]:
    return {"hardware": hardware_name(device), "versions": versions(*packages),
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def write_json(path: str | None, result: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")


def show_progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


def quiet_libraries(progress: bool) -> None:
    """Keep llm-compressor's log lines and transformers' loading bars out of the script's output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "WARNING")  # read when llmcompressor is imported
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if not progress:
        hf_logging.disable_progress_bar()
        os.environ["TQDM_DISABLE"] = "1"  # llm-compressor's own bars


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
                       help="dtype of the model; GPTQ's own arithmetic is always float32")
    model.add_argument("--seed", type=int, default=0, help="seed for the calibration windows")
    method = parser.add_argument_group("Method")
    method.add_argument("--method", choices=["scratch", "library", "both"], default="both",
                        help="GPTQ from scratch, with llm-compressor, or both")
    method.add_argument("--bits", type=int, default=4,
                        help="weight bits: 2, 3, 4 or 8 from scratch; 4 or 8 with the library")
    method.add_argument("--group-size", type=int, default=64,
                        help="columns sharing one scale; -1 = per output channel; must divide in_features")
    method.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True,
                        help="symmetric grid (no zero point), as compressed-tensors' W4A16")
    method.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                        help="quantize columns in order of decreasing diag(H) (static groups)")
    method.add_argument("--damp", type=float, default=0.01, help="damping, as a fraction of mean(diag H)")
    method.add_argument("--block-size", type=int, default=128, help="columns per lazy batch update")
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
    for flag in ("calib_samples", "calib_seqlen", "eval_tokens", "ctx", "block_size"):
        if getattr(args, flag) <= 0:
            raise UserError(f"--{flag.replace('_', '-')} must be positive")
    if not 0 <= args.damp < 1:
        raise UserError("--damp must lie in [0, 1)")


def run_row(method: str, impl: str, model: nn.Module, windows, ref_hidden, ref_head, args,
            seconds: float = 0.0, **extra) -> dict[str, Any]:
    """Evaluate one model and describe it as a row of the quality table."""
    row = {"method": method, "impl": impl, "bits": extra.pop("bits", args.bits),
           "group_size": extra.pop("group_size", args.group_size), "sym": extra.pop("sym", args.sym)}
    row.update(evaluate(model, windows, ref_hidden, ref_head, progress=show_progress(args.quiet)))
    row["size_mb"] = quantized_size_mb(model, None if method == "fp" else row["bits"], row["group_size"], row["sym"])
    row["quantize_seconds"] = round(seconds, 1)
    row.update(extra)
    return row


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
                   "settings": {k: getattr(args, k) for k in ("bits", "group_size", "sym", "act_order",
                                                               "damp", "block_size", "method")}})
    rows = [run_row("fp", "reference", model, windows, ref_hidden, ref_head, args, bits=16, group_size=-1)]
    rows.append(run_row("rtn", "scratch", rtn_model(model, args.bits, args.group_size, args.sym),
                        windows, ref_hidden, ref_head, args))

    if args.method in ("scratch", "both"):
        model.load_state_dict(fp_state)
        start = time.perf_counter()
        stats = gptq_model(model, calib, args.bits, args.group_size, args.sym, args.block_size,
                           args.damp, args.act_order, progress=progress)
        seconds = time.perf_counter() - start
        rows.append(run_row("gptq", "scratch", model, windows, ref_hidden, ref_head, args, seconds,
                            act_order=args.act_order))
        result["layer_errors"] = stats

    if args.method in ("library", "both"):
        model.load_state_dict(fp_state)
        with tempfile.TemporaryDirectory() as tmp:
            save_dir = Path(args.save) if args.save else Path(tmp)
            start = time.perf_counter()
            llmcompressor_gptq(model.cpu(), tokenizer, calib, args.bits, args.group_size, args.sym,
                               args.act_order, args.damp, args.block_size, save_dir)
            seconds = time.perf_counter() - start
            reloaded, generation = reload_and_generate(save_dir, tokenizer, device)
            rows.append(run_row("gptq", "llmcompressor", reloaded, windows, ref_hidden, ref_head, args,
                                seconds, act_order=args.act_order))
            result["checkpoint"] = {"path": str(save_dir) if args.save else None,
                                    "format": "compressed-tensors", "safetensors_mb": checkpoint_mb(save_dir),
                                    "reload_generation": generation}
    result["rows"] = rows
    write_json(args.json, result)
    if not args.quiet:
        print_rows(rows, result["eval"]["scored_tokens"])
    return result


def print_rows(rows: list[dict[str, Any]], tokens: int) -> None:
    print(f"{'method':<6} {'impl':<14} {'bits':>4} {'group':>5} {'ppl':>9} {'± se':>7} {'KL':>8} "
          f"{'top1':>6} {'MB':>7}   ({tokens} scored tokens)")
    for r in rows:
        print(f"{r['method']:<6} {r['impl']:<14} {r['bits']:>4} {r['group_size']:>5} {r['perplexity']:>9.3f} "
              f"{r['ppl_stderr']:>7.3f} {r['kl']:>8.4f} {r['top1']:>6.3f} {r['size_mb']:>7.1f}")


if __name__ == "__main__":
    try:
        main(build_parser().parse_args())
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
