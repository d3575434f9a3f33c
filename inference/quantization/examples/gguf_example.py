"""GGUF, llama.cpp's file format: encode its blocks by hand, write a file, read it back, run it.

What it shows
  1. llama.cpp's simplest block formats in torch, each a `quantize_*` / `dequantize_*` pair over
     blocks of 32 weights along a row of W (N, K): Q8_0 (`w = d·q`), Q4_0 (`w = d·(q − 8)`,
     d = signed max / −8) and Q4_1 (`w = d·q + m`); `to_block_bytes` lays the codes and FP16
     scales out byte for byte the way ggml stores a block.
  2. A llama.cpp-loadable GGUF file written with the `gguf` package (gguf-py, from llama.cpp):
     `llama` metadata, tokenizer, tensor names as `convert_hf_to_gguf.py` maps them, q/k rows
     permuted for llama.cpp's RoPE layout, weights quantized by `gguf.quants.quantize`.
  3. The round trip: `GGUFReader` reads the file back; our encoder reproduces its bytes exactly.
  4. The file loaded back through transformers (`gguf_file=`, dequantized to FP32 on load):
     mean KL divergence and top-1 agreement of the next token against the FP32 model.
  5. With `--llama-cpp` (llama-cpp-python), llama.cpp runs each file: greedy text, tokens/s.
  Perplexity, timings with repeats and the results files: `bench/gguf_files.py --preset cpu`.

Run it
  python inference/quantization/examples/gguf_example.py --model HuggingFaceTB/SmolLM2-135M-Instruct \\
      --types Q4_0 --eval-tokens 0 --quiet

What it prints on SmolLM2-135M (the command above, about 20 s on one core): Q4_0, 91.7 MB,
5.46 bits/weight (the token embedding stays Q8_0), our encoder equal to gguf-py on 211/211
quantized tensors, linear-weight error 0.087. Without `--eval-tokens 0` (+20 s a file, mostly
transformers loading the GGUF): KL 0.31, top-1 agreement 0.70 against FP32 on 256 tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers.utils import logging as hf_logging

BLOCK = 32  # weights per block in Q8_0, Q4_0 and Q4_1 (llama.cpp's QK8_0, QK4_0, QK4_1)
PROMPT = "The capital of France is"


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


SCRATCH = {"Q8_0": (quantize_q8_0, dequantize_q8_0), "Q4_0": (quantize_q4_0, dequantize_q4_0),
           "Q4_1": (quantize_q4_1, dequantize_q4_1)}


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


# --8<-- [start:tensor_names]
def permute_for_rope(W: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k rows from transformers' RoPE layout to llama.cpp's.

    transformers rotates the two halves of each head's dimensions (x_i with x_{i+32} in a
    64-wide head); llama.cpp rotates neighbours (x0 with x1). Same model, other row order:
    per head, interleave the two halves. transformers undoes this when it loads a GGUF.
    """
    D2 = W.shape[0] // n_head // 2
    return W.reshape(n_head, 2, D2, *W.shape[1:]).swapaxes(1, 2).reshape(W.shape)


def gguf_tensors(model: torch.nn.Module) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, FP32 array) per weight, named as convert_hf_to_gguf.py does."""
    import gguf

    config = model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    out = []
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: llama.cpp reuses token_embd as the output matrix
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise Refusal(f"no GGUF name for {hf_name!r}: use a Llama-architecture model")
        W = tensor.detach().float().cpu().numpy()
        if name.endswith("attn_q.weight"):
            W = permute_for_rope(W, config.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            W = permute_for_rope(W, config.num_key_value_heads)
        out.append((name, W))
    return out


def tensor_qtype(name: str, W: np.ndarray, qtype: str) -> str:
    """Which GGML type a tensor is stored in, for a file whose main type is `qtype`.

    Norms (1-D) stay F32; rows not a multiple of 32 cannot form blocks: they fall to F16.
    The token embedding stays Q8_0 in a 4-bit file: tied, it is also the output head, the
    most sensitive matrix (the SmolLM2 Q4_1 file we start from keeps it in Q8_0 too).
    """
    if W.ndim == 1:
        return "F32"
    if qtype != "F16" and W.shape[-1] % BLOCK:
        return "F16"
    if name == "token_embd.weight" and qtype in ("Q4_0", "Q4_1"):
        return "Q8_0"
    return qtype
# --8<-- [end:tensor_names]


# --8<-- [start:metadata]
def add_metadata(writer, config, tokenizer, qtype: str, tokenizer_pre: str) -> None:
    """The key-value header llama.cpp reads to build a `llama` model and its tokenizer."""
    import gguf

    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    rope = rope or getattr(config, "rope_theta", 10000.0)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(rope))
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{qtype}"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    # Tokenizer: byte-level BPE is llama.cpp's "gpt2" model; `pre` names its split regex.
    special = {i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}
    tokens = [f"[PAD{i}]" for i in range(config.vocab_size)]
    types = [gguf.TokenType.UNUSED] * config.vocab_size
    for token, i in tokenizer.get_vocab().items():
        if i < config.vocab_size:
            tokens[i] = token
            types[i] = gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    special_ids = {"bos": config.bos_token_id, "eos": config.eos_token_id,
                   "pad": config.pad_token_id, "unk": tokenizer.unk_token_id}
    for key, token_id in special_ids.items():
        if token_id is not None:
            getattr(writer, f"add_{key}_token_id")(int(token_id))
    ids = tokenizer("a")["input_ids"]  # BOS in front? tell llama.cpp
    writer.add_add_bos_token(len(ids) > 1 and ids[0] == tokenizer.bos_token_id)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
# --8<-- [end:metadata]


# --8<-- [start:write_gguf]
def write_gguf(path: Path, tensors: list[tuple[str, np.ndarray]], qtype: str, header,
               quiet: bool) -> dict[str, np.ndarray]:
    """Quantize every tensor with gguf-py, write the file; return what each decodes to."""
    import gguf

    writer = gguf.GGUFWriter(path, arch="llama")
    header(writer)
    expected = {}
    for name, W in tensors:
        ggml_type = gguf.GGMLQuantizationType[tensor_qtype(name, W, qtype)]
        data = gguf.quants.quantize(W, ggml_type)  # uint8 blocks, or F16/F32
        writer.add_tensor(name, data, raw_dtype=ggml_type)
        expected[name] = gguf.quants.dequantize(data, ggml_type).reshape(W.shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=not quiet)
    writer.close()
    return expected
# --8<-- [end:write_gguf]


# --8<-- [start:read_back]
def read_gguf(path: Path) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
    """Every tensor of a GGUF file: (GGML type, raw bytes, decoded FP32 array (N, K))."""
    import gguf

    out = {}
    for t in gguf.GGUFReader(path).tensors:
        shape = tuple(reversed(t.shape.tolist()))  # GGUF lists dimensions innermost first
        decoded = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        out[t.name] = (t.tensor_type.name, np.asarray(t.data), decoded)
    return out
# --8<-- [end:read_back]


def check_file(path: Path, tensors: list[tuple[str, np.ndarray]],
               expected: dict[str, np.ndarray]) -> dict:
    """Read the file back: does it decode to what was quantized, does our torch encoder give
    the same bytes for every quantized tensor, and how far are the decoder's weights from FP32."""
    decoded = read_gguf(path)
    file_vs_memory, same, quantized, err2, norm2, types = 0.0, 0, 0, 0.0, 0.0, {}
    for name, W in tensors:
        ggml_type, raw, W_hat = decoded[name]
        types[ggml_type] = types.get(ggml_type, 0) + 1
        file_vs_memory = max(file_vs_memory, float(np.abs(W_hat - expected[name]).max()))
        if ggml_type in SCRATCH:  # our encoder, then ggml's byte layout
            ours = to_block_bytes(ggml_type, *SCRATCH[ggml_type][0](torch.from_numpy(W)))
            quantized += 1
            same += int(np.array_equal(ours, raw.reshape(ours.shape)))
        if name.startswith("blk.") and W.ndim == 2:  # the decoder's linear weights
            err2 += float(((W - W_hat) ** 2).sum())
            norm2 += float((W**2).sum())
    return {"tensor_types": types, "file_vs_memory_max_abs_diff": file_vs_memory,
            "scratch_bytes_equal": same, "quantized_tensors": quantized,
            "linear_rel_error": (err2 / norm2) ** 0.5}


def load_gguf_in_transformers(path: Path, device: torch.device, quiet: bool = True):
    """transformers reads the GGUF and dequantizes every tensor to FP32 on load."""
    from transformers import AutoModelForCausalLM

    with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                     dtype=torch.float32)  # its own tqdm bar
    return model.to(device).eval()


# --8<-- [start:quality]
@torch.no_grad()
def next_token_agreement(reference, candidate, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per position of ids (1, T+1): NLL of both, KL(P_ref ‖ P_q), top-1 match."""
    x, y = ids[:, :-1], ids[0, 1:]  # (1, T), (T,)
    ref = torch.log_softmax(reference(x).logits[0].float(), dim=-1)  # (T, V)
    logq = torch.log_softmax(candidate(x).logits[0].float(), dim=-1)  # (T, V)
    return {"nll_ref": -ref.gather(-1, y[:, None])[:, 0],  # (T,) each
            "nll": -logq.gather(-1, y[:, None])[:, 0],
            "kl": (ref.exp() * (ref - logq)).sum(-1),
            "top1": (ref.argmax(-1) == logq.argmax(-1)).float()}
# --8<-- [end:quality]


# --8<-- [start:llama_cpp]
def load_llama_cpp(path: Path, threads: int):
    """llama.cpp's own loader and kernels, through its Python bindings."""
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=512, n_threads=threads, verbose=False)


def generate_llama_cpp(llm, prompt: str, max_new_tokens: int) -> tuple[str, int]:
    """Greedy generation: (text, number of new tokens)."""
    out = llm(prompt, max_tokens=max_new_tokens, temperature=0.0)
    return out["choices"][0]["text"], out["usage"]["completion_tokens"]
# --8<-- [end:llama_cpp]


def print_table(rows: list[dict]) -> None:
    print("file        MB  bits/w  ours = gguf-py  lin. err       KL  top-1  llama.cpp tok/s")
    for r in rows:
        same = f"{r['scratch_bytes_equal']}/{r['quantized_tensors']}"
        cells = [f"{r[k]:{f}}" if k in r else "-" for k, f in
                 (("kl", ".4f"), ("top1", ".3f"), ("llama_cpp_tokens_per_s", ".1f"))]
        print(f"{r['qtype']:<6} {r['file_mb']:>7.1f} {r['bits_per_weight']:>7.2f} {same:>15} "
              f"{r['linear_rel_error']:>9.4f} {cells[0]:>8} {cells[1]:>6} {cells[2]:>16}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("Model")
    model.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                       help="hub id or local transformers folder (Llama architecture)")
    model.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                       help="where transformers runs the FP32 and the loaded-back GGUF models")
    model.add_argument("--tokenizer-pre", default="smollm", help="llama.cpp's name of the "
                       "pre-tokenizer regex: smollm for SmolLM2, gpt2 for GPT-2-style BPE")
    method = parser.add_argument_group("Method")
    method.add_argument("--types", nargs="+", default=["F16", "Q8_0", "Q4_0"], choices=["F16", "Q8_0", "Q4_0", "Q4_1"],
                        help="files to write (llama.cpp's llama-quantize makes the other types)")
    method.add_argument("--out-dir", type=Path, default=Path(".cache/gguf"), help="GGUF folder")
    method.add_argument("--eval-tokens", type=int, default=256,
                        help="tokens of text for the KL / top-1 check (0 skips it)")
    method.add_argument("--llama-cpp", action="store_true", help="also run llama.cpp on each file")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def load_model(name: str, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise Refusal(f"cannot load model {name!r} ({first}): pass a hub id or a local folder") from None
    if model.config.model_type != "llama":
        raise Refusal(f"{name!r} is {model.config.model_type!r}: use a Llama-architecture model")
    return model, tokenizer


def main(args: argparse.Namespace) -> list[dict]:
    if args.eval_tokens < 0:
        build_parser().error("--eval-tokens must be 0 (skip) or positive")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise Refusal("--device cuda was asked for but no CUDA GPU is visible: use --device cpu")
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    if args.llama_cpp and importlib.util.find_spec("llama_cpp") is None:
        raise Refusal("--llama-cpp needs llama-cpp-python: pip install llama-cpp-python "
                      "(compiles llama.cpp, a few minutes), or leave the flag out")
    try:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=args.out_dir).close()
    except OSError as error:
        raise Refusal(f"cannot write to {args.out_dir} ({error.strerror}): "
                      "pass --out-dir with a writable folder") from None
    if args.quiet:
        hf_logging.disable_progress_bar()  # transformers' own loading bar
    model, tokenizer = load_model(args.model, device)
    tensors = gguf_tensors(model)
    n_params = sum(W.size for _, W in tensors)
    from pydoc_data.topics import topics  # text for the KL / top-1 check: Python's own help
    text = "\n\n".join(topics[key] for key in ("assignment", "class", "for", "function"))
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, : args.eval_tokens + 1].to(device)
    rows = []
    for qtype in args.types:
        path = args.out_dir / f"{Path(args.model).name}-{qtype}.gguf"
        partial = path.with_name(path.name + ".partial")  # renamed only once complete
        header = lambda w, q=qtype: add_metadata(w, model.config, tokenizer, q, args.tokenizer_pre)
        expected = write_gguf(partial, tensors, qtype, header, args.quiet)
        partial.replace(path)
        row = {"qtype": qtype, "path": str(path), "file_mb": path.stat().st_size / 1e6,
               "bits_per_weight": 8 * path.stat().st_size / n_params,
               **check_file(path, tensors, expected)}
        if args.eval_tokens:
            loaded = load_gguf_in_transformers(path, device, args.quiet)
            stats = next_token_agreement(model, loaded, ids)
            row.update(kl=stats["kl"].mean().item(), top1=stats["top1"].mean().item())
        if args.llama_cpp:
            llm = load_llama_cpp(path, threads=torch.get_num_threads())
            start = time.perf_counter()
            text, n_new = generate_llama_cpp(llm, PROMPT, 32)
            row.update(llama_cpp_tokens_per_s=n_new / (time.perf_counter() - start),
                       llama_cpp_text=text)
            print(f"{qtype}: {PROMPT!r} -> {text[:60]!r}")
        rows.append(row)
    print_table(rows)
    return rows


if __name__ == "__main__":
    try:
        main(build_parser().parse_args())
    except Refusal as why:
        print(f"error: {why}", file=sys.stderr)
        sys.exit(2)
