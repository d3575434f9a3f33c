"""GGUF, llama.cpp's file format: write a file, read it back, quantize it with llama.cpp, run it.

What it shows
  1. A llama.cpp-loadable GGUF file written with the `gguf` package (gguf-py, from llama.cpp),
     the job of llama.cpp's `convert_hf_to_gguf.py`: `llama` metadata, tokenizer, tensor names
     as that converter maps them, q/k rows permuted for llama.cpp's RoPE layout, weights in
     F16 or quantized by `gguf.quants.quantize` (Q8_0, Q4_0, Q4_1: written out by hand, byte
     for byte equal, in `gguf_blocks.py`).
  2. The round trip: `GGUFReader` reads the file back; it decodes to what was quantized.
  3. llama.cpp's own quantizer on our F16 file (the job of `llama-quantize`): k-quants (Q4_K_M,
     Q5_K_M, Q6_K) and IQ4_XS, with an importance matrix computed here from scratch (the job of
     `llama-imatrix`): the mean of x_k² over calibration tokens per input column k.
  4. Each file loaded back through transformers (`gguf_file=`, dequantized to FP32 on load):
     mean KL divergence and top-1 agreement of the next token against the FP32 model.
  5. With `--llama-cpp`, llama.cpp runs each file: greedy text, tokens/s.
  Steps 3 and 5 need llama-cpp-python. Perplexity, timings with repeats and the results
  files: `bench/gguf_files.py --preset cpu`.

Run it
  python inference/quantization/examples/gguf_example.py --model HuggingFaceTB/SmolLM2-135M-Instruct \\
      --types Q4_0 --eval-tokens 0 --quiet

What it prints on SmolLM2-135M (the command above, about 20 s on one core): Q4_0, 91.7 MB,
5.46 bits/weight (the token embedding stays Q8_0), linear-weight error 0.087. Without
`--eval-tokens 0` (+20 s a file): KL 0.31, top-1 agreement 0.70 against FP32 on 256 tokens.
With `--types Q4_K_M IQ4_XS` (llama-cpp-python, about 2 minutes): Q4_K_M 105.5 MB, 6.27
bits/weight (576-wide rows are not a multiple of 256: 166 matrices fall back to Q5_0), KL 0.026
with the importance matrix, 0.055 without (`--imatrix-tokens 0`); IQ4_XS 90.9 MB, KL 0.083 (0.197).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers.utils import logging as hf_logging

BLOCK = 32  # weights per block in Q8_0, Q4_0 and Q4_1 (llama.cpp's QK8_0, QK4_0, QK4_1)
PROMPT = "The capital of France is"
EVAL_TOPICS = ("assignment", "class", "for", "function")  # pydoc topics held out of calibration
OURS = ("F16", "Q8_0", "Q4_0", "Q4_1")  # written with gguf-py
LLAMA_CPP_TYPES = ("Q4_K_M", "Q5_K_M", "Q6_K", "IQ4_XS")  # made by llama.cpp's quantizer from F16


class Refusal(Exception):
    """A run-time refusal: one line that names the problem and the fix (exit code 2)."""


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
               expected: dict[str, np.ndarray] | None = None) -> dict:
    """Read the file back: the type of each tensor, whether it decodes to what was quantized in
    memory (files we wrote), and how far the decoder's linear weights are from FP32."""
    decoded = read_gguf(path)
    file_vs_memory, err2, norm2, types = 0.0, 0.0, 0.0, {}
    for name, W in tensors:
        ggml_type, _, W_hat = decoded[name]
        types[ggml_type] = types.get(ggml_type, 0) + 1
        if expected is not None:
            file_vs_memory = max(file_vs_memory, float(np.abs(W_hat - expected[name]).max()))
        if name.startswith("blk.") and W.ndim == 2:  # the decoder's linear weights
            err2 += float(((W - W_hat) ** 2).sum())
            norm2 += float((W**2).sum())
    checks = {"tensor_types": types, "linear_rel_error": (err2 / norm2) ** 0.5}
    if expected is not None:
        checks["file_vs_memory_max_abs_diff"] = file_vs_memory
    return checks


# --8<-- [start:imatrix]
@torch.no_grad()
def importance_matrix(model, ids: torch.Tensor, context: int) -> dict[str, np.ndarray]:
    """llama-imatrix from scratch: per linear layer, the mean of x_k² over the
    calibration tokens, one value per input column k (the diagonal of GPTQ's XXᵀ/n).
    llama.cpp's quantizers weight each weight's rounding error by it. Keys are GGUF
    tensor names; the tied output matrix keeps the default."""
    import gguf

    layers = model.config.num_hidden_layers
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    sums, counts, hooks = {}, {}, []

    def record(name: str):
        def hook(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()  # (tokens, K)
            sums[name] = sums.get(name, 0.0) + x.pow(2).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    for hf_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            name = name_map.get_name(hf_name + ".weight", try_suffixes=(".weight",))
            if name and name.startswith("blk."):
                hooks.append(module.register_forward_hook(record(name)))
    try:
        for start in range(0, ids.shape[1], context):
            model(ids[:, start:start + context])
    finally:
        for hook in hooks:
            hook.remove()
    return {name: (sums[name] / counts[name]).cpu().numpy() for name in sums}
# --8<-- [end:imatrix]


# --8<-- [start:llama_quantize]
def llama_cpp_quantize(src: Path, dst: Path, ftype: str,
                       imatrix: dict[str, np.ndarray] | None, threads: int) -> None:
    """llama-quantize through the library call it wraps: F16 GGUF in, `ftype` GGUF out.

    llama.cpp chooses each tensor's type from the file type (Q4_K_M keeps some attn_v and
    ffn_down tensors in Q6_K, for example; rows not a multiple of 256 fall back to 32-wide
    blocks). The importance matrix goes in the way llama-quantize passes it: a C array of
    (name, values, count), ended by a NULL name.
    """
    import llama_cpp
    from llama_cpp import llama_model_imatrix_data as Entry

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = threads
    arrays = [np.ascontiguousarray(v, dtype=np.float32) for v in (imatrix or {}).values()]
    entries = (Entry * (len(arrays) + 1))()  # zeroed: the last entry ends the list
    for entry, name, values in zip(entries, imatrix or {}, arrays):
        entry.name, entry.size = name.encode(), values.size
        entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    if imatrix:
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(Entry))
    with tempfile.TemporaryFile() as log:  # llama.cpp logs a line or two per tensor
        stderr = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            status = llama_cpp.llama_model_quantize(
                str(src).encode(), str(dst).encode(), ctypes.byref(params))
        finally:
            os.dup2(stderr, 2)
            os.close(stderr)
        if status:
            log.seek(0)
            lines = log.read().decode(errors="replace").strip().splitlines()
            dst.unlink(missing_ok=True)  # nothing half-written
            raise Refusal(f"llama.cpp could not quantize {src.name} to {ftype}: "
                          f"{lines[-1] if lines else 'no log'}")
# --8<-- [end:llama_quantize]


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
    print("file    made by                 MB  bits/w  lin. err      KL  top-1  llama.cpp tok/s  tensors")
    for r in rows:
        cells = [f"{r[k]:{f}}" if k in r else "-" for k, f in
                 (("kl", ".4f"), ("top1", ".3f"), ("llama_cpp_tokens_per_s", ".1f"))]
        types = " ".join(f"{t}×{n}" for t, n in sorted(r["tensor_types"].items(), key=lambda kv: -kv[1]))
        print(f"{r['qtype']:<7} {r['made_by']:<19} {r['file_mb']:>6.1f} {r['bits_per_weight']:>7.2f} "
              f"{r['linear_rel_error']:>9.4f} {cells[0]:>7} {cells[1]:>6} {cells[2]:>16}  {types}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("Model")
    model.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                       help="hub id or local transformers folder (Llama architecture)")
    model.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                       help="where transformers runs the FP32 and the loaded-back GGUF models")
    model.add_argument("--tokenizer-pre", default="smollm", help="llama.cpp's name of the "
                       "pre-tokenizer regex: smollm for SmolLM2, gpt-2 for GPT-2-style BPE")
    method = parser.add_argument_group("Method")
    method.add_argument("--types", nargs="+", default=["F16", "Q8_0", "Q4_0"], choices=OURS + LLAMA_CPP_TYPES,
                        help=f"files to write: {', '.join(OURS)} with gguf-py, the others with llama.cpp's "
                             "quantizer from the F16 file")
    method.add_argument("--out-dir", type=Path, default=Path(".cache/gguf"), help="GGUF folder")
    method.add_argument("--eval-tokens", type=int, default=256,
                        help="tokens of text for the KL / top-1 check (0 skips it)")
    method.add_argument("--imatrix-tokens", type=int, default=2048,
                        help="calibration tokens for llama.cpp's types (0: no importance matrix)")
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


def pydoc_text(evaluation: bool) -> str:
    """Python's own help topics: four of them for the KL / top-1 check, the rest for calibration."""
    from pydoc_data.topics import topics
    keys = EVAL_TOPICS if evaluation else sorted(set(topics) - set(EVAL_TOPICS))
    return "\n\n".join(topics[key] for key in keys)


def check_arguments(args: argparse.Namespace) -> torch.device:
    if args.eval_tokens < 0 or args.imatrix_tokens < 0:
        build_parser().error("--eval-tokens and --imatrix-tokens must be 0 (skip) or positive")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise Refusal("--device cuda was asked for but no CUDA GPU is visible: use --device cpu")
    needs = "--llama-cpp" if args.llama_cpp else next((t for t in args.types if t in LLAMA_CPP_TYPES), None)
    if needs and importlib.util.find_spec("llama_cpp") is None:
        raise Refusal(f"{needs} needs llama-cpp-python: pip install llama-cpp-python "
                      "(compiles llama.cpp, a few minutes), or leave it out")
    try:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=args.out_dir).close()
    except OSError as error:
        raise Refusal(f"cannot write to {args.out_dir} ({error.strerror}): "
                      "pass --out-dir with a writable folder") from None
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)


def main(args: argparse.Namespace) -> list[dict]:
    device = check_arguments(args)
    if args.quiet:
        hf_logging.disable_progress_bar()  # transformers' own loading bar
    model, tokenizer = load_model(args.model, device)
    tensors = gguf_tensors(model)
    n_params = sum(W.size for _, W in tensors)
    ids = tokenizer(pydoc_text(evaluation=True), return_tensors="pt")["input_ids"][:, : args.eval_tokens + 1]
    imatrix, rows = None, []
    def header(qtype: str):  # the metadata writer for a file of this type
        return lambda writer: add_metadata(writer, model.config, tokenizer, qtype, args.tokenizer_pre)
    for qtype in sorted(args.types, key=lambda t: t in LLAMA_CPP_TYPES):  # ours first: F16 is the source
        path = args.out_dir / f"{Path(args.model).name}-{qtype}.gguf"
        partial = path.with_name(path.name + ".partial")  # renamed only once complete
        made_by, expected = "gguf-py", None
        if qtype in OURS:
            expected = write_gguf(partial, tensors, qtype, header(qtype), args.quiet)
        else:
            source = args.out_dir / f"{Path(args.model).name}-F16.gguf"
            if "F16" not in args.types:
                write_gguf(source, tensors, "F16", header("F16"), args.quiet)
            if imatrix is None and args.imatrix_tokens:
                calibration = tokenizer(pydoc_text(evaluation=False), return_tensors="pt")["input_ids"]
                imatrix = importance_matrix(model, calibration[:, : args.imatrix_tokens].to(device), 512)
            llama_cpp_quantize(source, partial, qtype, imatrix, threads=torch.get_num_threads())
            made_by = "llama.cpp + imatrix" if imatrix else "llama.cpp"
        partial.replace(path)
        row = {"qtype": qtype, "made_by": made_by, "path": str(path), "file_mb": path.stat().st_size / 1e6,
               "bits_per_weight": 8 * path.stat().st_size / n_params, **check_file(path, tensors, expected)}
        if args.eval_tokens:
            stats = next_token_agreement(model, load_gguf_in_transformers(path, device, args.quiet), ids.to(device))
            row.update(kl=stats["kl"].mean().item(), top1=stats["top1"].mean().item())
        if args.llama_cpp:
            llm = load_llama_cpp(path, threads=torch.get_num_threads())
            start = time.perf_counter()
            text, n_new = generate_llama_cpp(llm, PROMPT, 32)
            row.update(llama_cpp_tokens_per_s=n_new / (time.perf_counter() - start), llama_cpp_text=text)
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
