"""llama.cpp's simplest block formats by hand, byte for byte equal to llama.cpp's own encoder.

What it shows
  1. Q8_0, Q4_0 and Q4_1 in torch, each a `quantize_*` / `dequantize_*` pair over blocks of 32
     weights along a row of W (N, K): Q8_0 (`w = d·q`), Q4_0 (`w = d·(q − 8)`, d = signed
     max / −8) and Q4_1 (`w = d·q + m`); `to_block_bytes` lays the codes and FP16 scales out
     the way ggml stores a block.
  2. The library for the same job: `gguf.quants.quantize` / `dequantize` from the `gguf` package
     (gguf-py, maintained in llama.cpp's repository, a port of ggml-quants.c). Every decoder
     linear weight of the model is encoded both ways and the bytes are compared.
  3. One table: bits per weight, tensors whose bytes are equal, our decoder against the
     library's, and the relative error ‖W − Ŵ‖ / ‖W‖ of the decoder's linear weights.
  Writing these blocks into a GGUF file that llama.cpp loads: `gguf_example.py`.

Run it
  python inference/quantization/examples/gguf_blocks.py --model HuggingFaceTB/SmolLM2-135M-Instruct

What it prints on SmolLM2-135M (about half a minute on one core): for Q8_0, Q4_0 and Q4_1, bytes equal
to gguf-py's on 210/210 linear weights, our decoder equal to the library's (max difference 0),
bits per weight 8.50 / 4.50 / 5.00 and relative error 0.0055 / 0.0866 / 0.0000. Q4_1's zero
is this copy's history: the offline SmolLM2 came through a Q4_1 file, so its weights already
sit on Q4_1's grid (a model downloaded from the Hub in full precision gives about 0.08).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

BLOCK = 32  # weights per block in Q8_0, Q4_0 and Q4_1 (llama.cpp's QK8_0, QK4_0, QK4_1)
BYTES_PER_BLOCK = {"Q8_0": 2 + 32, "Q4_0": 2 + 16, "Q4_1": 2 + 2 + 16}


class Refusal(Exception):
    """A run-time refusal: one line that names the problem and the fix (exit code 2)."""


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties away from zero, the way ggml's C code (and gguf-py) does it."""
    a = x.abs()
    floored = torch.floor(a)
    return torch.sign(x) * (floored + torch.floor(2 * (a - floored)))


# --8<-- [start:q8_0]
def quantize_q8_0(W: torch.Tensor):
    """Q8_0: blocks of 32 weights along a row, symmetric, one FP16 scale per block.

        d = max|w| / 127          (stored as FP16)
        q = round(w / d)          int8 in [-127, 127], ties away from zero
        bytes per block = 2 + 32 = 34, so 34·8/32 = 8.5 bits per weight
    W (N, K), K a multiple of 32 -> q (N, K/32, 32) int8, scale (N, K/32, 1), zero = 0.
    """
    Wb = W.float().reshape(W.shape[0], -1, BLOCK)  # (N, K/32, 32)
    d = Wb.abs().amax(dim=-1, keepdim=True) / 127  # (N, K/32, 1)
    inv_d = torch.where(d == 0, 0.0, 1 / d)
    q = round_half_away(Wb * inv_d).to(torch.int8)
    return q, d.half().float(), torch.zeros_like(d)


def dequantize_q8_0(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """w_hat = d · q, returned as (N, K)."""
    return (q.float() * scale).flatten(1)
# --8<-- [end:q8_0]


# --8<-- [start:q4_0]
def quantize_q4_0(W: torch.Tensor):
    """Q4_0: blocks of 32, symmetric, 16 levels, one FP16 scale per block.

        m = the weight of largest magnitude, with its sign
        d = m / -8                (stored as FP16)
        q = min(15, trunc(w / d + 8.5))   an unsigned 4-bit code; the implicit zero is 8
        w_hat = d · (q - 8)
        bytes per block = 2 + 16 = 18, so 4.5 bits per weight
    Dividing by -8 (not 7) puts the largest-magnitude weight exactly on level -8, so all
    16 levels are usable. Returns q (N, K/32, 32) uint8, scale (N, K/32, 1), zero = 8.
    """
    Wb = W.float().reshape(W.shape[0], -1, BLOCK)  # (N, K/32, 32)
    idx = Wb.abs().argmax(dim=-1, keepdim=True)
    m = torch.gather(Wb, -1, idx)  # signed max, (N, K/32, 1)
    d = m / -8
    inv_d = torch.where(d == 0, 0.0, 1 / d)
    q = torch.trunc(Wb * inv_d + 8.5).clamp(0, 15).to(torch.uint8)
    return q, d.half().float(), torch.full_like(d, 8.0)


def dequantize_q4_0(q: torch.Tensor, scale: torch.Tensor,
                    zero: torch.Tensor) -> torch.Tensor:
    """w_hat = d · (q - 8), returned as (N, K)."""
    return ((q.float() - zero) * scale).flatten(1)
# --8<-- [end:q4_0]


# --8<-- [start:q4_1]
def quantize_q4_1(W: torch.Tensor):
    """Q4_1: blocks of 32, asymmetric, 16 levels from the block's minimum upwards.

        m = min(w),  d = (max(w) - m) / 15       (both stored as FP16)
        q = min(15, trunc((w - m) / d + 0.5)),   w_hat = d · q + m
        bytes per block = 2 + 2 + 16 = 20, so 5 bits per weight
    Returns q (N, K/32, 32) uint8, scale d (N, K/32, 1) and the offset m in the zero slot.
    """
    Wb = W.float().reshape(W.shape[0], -1, BLOCK)  # (N, K/32, 32)
    m = Wb.amin(dim=-1, keepdim=True)  # (N, K/32, 1)
    d = (Wb.amax(dim=-1, keepdim=True) - m) / 15
    inv_d = torch.where(d == 0, 0.0, 1 / d)
    q = torch.trunc((Wb - m) * inv_d + 0.5).clamp(0, 15).to(torch.uint8)
    return q, d.half().float(), m.half().float()


def dequantize_q4_1(q: torch.Tensor, scale: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """w_hat = d · q + m, returned as (N, K)."""
    return (q.float() * scale + m).flatten(1)
# --8<-- [end:q4_1]


# --8<-- [start:block_bytes]
def to_block_bytes(qtype: str, q: torch.Tensor, scale: torch.Tensor,
                   zero: torch.Tensor) -> np.ndarray:
    """(q, scale, zero) laid out as ggml stores blocks: (N, K/32 · block bytes) uint8.

        Q8_0: d (FP16, 2 bytes) | 32 int8 codes
        Q4_0: d (FP16)          | 16 bytes: code j in the low nibble, j + 16 in the high
        Q4_1: d (FP16) | m (FP16) | 16 bytes of nibbles as in Q4_0
    """
    d = scale.half().numpy().view(np.uint8)  # (N, K/32, 2), little-endian FP16
    if qtype == "Q8_0":
        return np.concatenate([d, q.numpy().view(np.uint8)], -1).reshape(len(q), -1)
    codes = q.numpy().astype(np.uint8)  # (N, K/32, 32), values 0..15
    nibbles = codes[..., :16] | (codes[..., 16:] << 4)  # (N, K/32, 16)
    m = zero.half().numpy().view(np.uint8)  # Q4_1's FP16 offset
    parts = [d, nibbles] if qtype == "Q4_0" else [d, m, nibbles]
    return np.concatenate(parts, axis=-1).reshape(q.shape[0], -1)
# --8<-- [end:block_bytes]


SCRATCH = {"Q8_0": (quantize_q8_0, dequantize_q8_0), "Q4_0": (quantize_q4_0, dequantize_q4_0),
           "Q4_1": (quantize_q4_1, dequantize_q4_1)}


# --8<-- [start:compare]
def compare_with_gguf_py(weights: dict[str, torch.Tensor], qtype: str) -> dict:
    """Encode every weight both ways: are the bytes equal, do both decoders agree, what error."""
    import gguf

    quantize, dequantize = SCRATCH[qtype]
    ggml_type = gguf.GGMLQuantizationType[qtype]
    same, decoder_diff, err2, norm2 = 0, 0.0, 0.0, 0.0
    for W in weights.values():
        q, scale, zero = quantize(W)
        ours = to_block_bytes(qtype, q, scale, zero)
        theirs = gguf.quants.quantize(W.numpy(), ggml_type)  # (N, K/32 · block bytes) uint8
        same += int(np.array_equal(ours, theirs))
        W_hat = dequantize(q, scale, zero)
        library = torch.from_numpy(gguf.quants.dequantize(theirs, ggml_type)).reshape(W.shape)
        decoder_diff = max(decoder_diff, (W_hat - library).abs().max().item())
        err2 += (W - W_hat).pow(2).sum().item()
        norm2 += W.pow(2).sum().item()
    return {"qtype": qtype, "bits_per_weight": 8 * BYTES_PER_BLOCK[qtype] / BLOCK,
            "bytes_equal": same, "tensors": len(weights), "decoder_max_diff": decoder_diff,
            "rel_error": (err2 / norm2) ** 0.5}
# --8<-- [end:compare]


def decoder_linear_weights(name: str) -> dict[str, torch.Tensor]:
    """Every 2-D weight inside the decoder blocks, FP32 (N, K), from a hub id or a folder."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    except (OSError, ValueError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise Refusal(f"cannot load model {name!r} ({first}): pass a hub id or a local folder") from None
    weights = {key: W.detach() for key, W in model.state_dict().items()
               if W.ndim == 2 and ".layers." in key and W.shape[1] % BLOCK == 0}
    if not weights:
        raise Refusal(f"no decoder linear weights with rows a multiple of {BLOCK} in {name!r}: "
                      "use a decoder LM")
    return weights


def print_table(rows: list[dict]) -> None:
    print("type   bits/w  bytes = gguf-py  decoders differ by  rel. error")
    for r in rows:
        same = f"{r['bytes_equal']}/{r['tensors']}"
        print(f"{r['qtype']:<6} {r['bits_per_weight']:>6.2f} {same:>16} {r['decoder_max_diff']:>19.3g} "
              f"{r['rel_error']:>11.4f}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                        help="hub id or local transformers folder")
    parser.add_argument("--types", nargs="+", default=list(SCRATCH), choices=list(SCRATCH),
                        help="block formats to compare")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(args: argparse.Namespace) -> list[dict]:
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    weights = decoder_linear_weights(args.model)
    rows = [compare_with_gguf_py(weights, qtype) for qtype in args.types]
    print_table(rows)
    return rows


if __name__ == "__main__":
    try:
        main(build_parser().parse_args())
    except Refusal as why:
        print(f"error: {why}", file=sys.stderr)
        sys.exit(2)
