"""GGUF, llama.cpp's file format: write one from a transformers model, read it back, run it.

What it shows
  1. llama.cpp's two simplest block formats written out in torch (`quantize_q8_0` / `quantize_q4_0`
     and their `dequantize_*`): blocks of 32 weights along a row, one FP16 scale per block.
  2. A llama.cpp-loadable GGUF file written with the `gguf` package (gguf-py, maintained inside
     llama.cpp): the `llama` architecture metadata, the tokenizer (tokens, types, merges, special
     ids), tensor names mapped the way llama.cpp's `convert_hf_to_gguf.py` maps them, the q/k
     rows permuted for llama.cpp's RoPE layout, and the weights quantized by `gguf.quants.quantize`
     to F16, Q8_0 or Q4_0.
  3. The round trip: `GGUFReader` reads the file back, `gguf.quants.dequantize` decodes it, and the
     result equals the in-memory quantize-then-dequantize exactly; our torch block code equals
     the library's bit for bit (checked on the first decoder layer); the error against the FP32
     weights; file size and bits per weight.
  4. Quality: perplexity, mean KL divergence and top-1 agreement against the FP32 model on the same
     evaluation tokens, with the GGUF weights loaded back through transformers (`gguf_file=`).
     transformers dequantizes GGUF on load, so that model takes full FP32 memory: it is a way to
     evaluate or fine-tune a GGUF file, not a way to save memory.
  5. Speed: the files run through llama.cpp's Python bindings (`llama_cpp`, package
     llama-cpp-python) when installed: greedy text and tokens/s on the CPU. Without them the
     script says so in one line and records it in the JSON.

Run
  python inference/quantization/examples/gguf_example.py                # downloads the hub model
  python inference/quantization/examples/gguf_example.py --model .cache/models/SmolLM2-135M-Instruct \\
      --threads 1 --eval-tokens 4096 --json inference/quantization/results/gguf_example-cpu.json

The GGUF files go to `--out-dir` (default `.cache/gguf`). On SmolLM2-135M it writes F16, Q8_0 and
Q4_0 files of 271, 145 and 92 MB (16.1, 8.6 and 5.5 bits per weight: the Q4_0 file keeps its
embedding in Q8_0), and prints their perplexity, KL and top-1 agreement against FP32 (Q8_0: +0.3 %
perplexity; Q4_0: +24 %, on top of weights that already went through Q4_1) and llama.cpp's tokens/s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch

BLOCK = 32  # weights per block in Q8_0 and Q4_0 (llama.cpp's QK8_0 and QK4_0)
BITS_TO_QTYPE = {16: "F16", 8: "Q8_0", 4: "Q4_0"}


def fail(message: str) -> NoReturn:
    """Bad input the reader can fix: one line on stderr, exit code 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties away from zero, the way ggml's C code (and gguf-py) does it."""
    a = x.abs()
    floored = torch.floor(a)
    return torch.sign(x) * (floored + torch.floor(2 * (a - floored)))


# --8<-- [start:q8_0]
def quantize_q8_0(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q8_0: blocks of 32 weights along a row, symmetric, one FP16 scale per block.

        d = max|w| / 127          (stored as FP16)
        q = round(w / d)          int8 in [-127, 127]
        bytes per block = 2 + 32 = 34, so 34·8/32 = 8.5 bits per weight

    W: (R, C) with C a multiple of 32. Returns q (R, C/32, 32) int8, scale (R, C/32, 1), zero = 0.
    """
    Wb = W.float().reshape(W.shape[0], -1, BLOCK)  # (R, C/32, 32)
    d = Wb.abs().amax(dim=-1, keepdim=True) / 127
    inv_d = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = round_half_away(Wb * inv_d).to(torch.int8)
    return q, d.half().float(), torch.zeros_like(d)


def dequantize_q8_0(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """w_hat = d · q, returned as (R, C)."""
    return (q.float() * scale).flatten(1)
# --8<-- [end:q8_0]


# --8<-- [start:q4_0]
def quantize_q4_0(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0: blocks of 32, symmetric, 16 levels, one FP16 scale per block.

        m = the weight of largest magnitude, with its sign
        d = m / -8                (stored as FP16)
        q = min(15, trunc(w / d + 8.5))   an unsigned 4-bit code; the implicit zero is 8
        w_hat = d · (q - 8)
        bytes per block = 2 + 16 = 18, so 4.5 bits per weight

    Dividing by -8 (not by 7) puts the largest-magnitude weight exactly on level -8, so all
    16 levels are usable. Returns q (R, C/32, 32) uint8, scale (R, C/32, 1), zero = 8.
    """
    Wb = W.float().reshape(W.shape[0], -1, BLOCK)  # (R, C/32, 32)
    idx = Wb.abs().argmax(dim=-1, keepdim=True)
    m = torch.gather(Wb, -1, idx)  # signed max, (R, C/32, 1)
    d = m / -8
    inv_d = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc(Wb * inv_d + 8.5).clamp(0, 15).to(torch.uint8)
    return q, d.half().float(), torch.full_like(d, 8.0)


def dequantize_q4_0(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """w_hat = d · (q - 8), returned as (R, C)."""
    return ((q.float() - zero) * scale).flatten(1)
# --8<-- [end:q4_0]


SCRATCH = {"Q8_0": (quantize_q8_0, dequantize_q8_0), "Q4_0": (quantize_q4_0, dequantize_q4_0)}


# --8<-- [start:tensor_names]
def permute_for_rope(W: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k rows from transformers' RoPE layout to llama.cpp's.

    transformers rotates the two halves of each head's dimensions ([x0..x31 | x32..x63] pairs
    x_i with x_{i+32}); llama.cpp rotates neighbours (x0 with x1). Same model, different row
    order: per head, interleave the two halves. transformers undoes this when it loads a GGUF.
    """
    return W.reshape(n_head, 2, W.shape[0] // n_head // 2, *W.shape[1:]).swapaxes(1, 2).reshape(W.shape)


def gguf_tensors(model: torch.nn.Module) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, FP32 array) for every weight, named the way convert_hf_to_gguf.py names them."""
    import gguf

    config = model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    out = []
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: llama.cpp reuses token_embd as the output matrix when `output` is absent
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ValueError(f"no GGUF name for tensor {hf_name!r}")
        W = tensor.detach().float().cpu().numpy()
        if name.endswith("attn_q.weight"):
            W = permute_for_rope(W, config.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            W = permute_for_rope(W, config.num_key_value_heads)
        out.append((name, W))
    return out


def tensor_qtype(name: str, W: np.ndarray, qtype: str) -> str:
    """Which GGML type a tensor is stored in, for a file whose main type is `qtype`.

    Norm weights (1-D) stay F32: tiny, and used in every token's arithmetic. Rows whose length is
    not a multiple of 32 cannot form blocks and fall back to F16. The token embedding stays Q8_0 in
    a Q4_0 file: with tied embeddings it is also the output head, the most sensitive matrix (the
    SmolLM2 Q4_1 file this tutorial starts from keeps it in Q8_0 too).
    """
    if W.ndim == 1:
        return "F32"
    if qtype != "F16" and W.shape[-1] % BLOCK:
        return "F16"
    if name == "token_embd.weight" and qtype == "Q4_0":
        return "Q8_0"
    return qtype
# --8<-- [end:tensor_names]


# --8<-- [start:metadata]
def add_metadata(writer, config, tokenizer, qtype: str, tokenizer_pre: str) -> None:
    """The key-value header llama.cpp reads to build a `llama` model and its tokenizer."""
    import gguf

    rope_theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", 10000.0))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(Path(str(config.name_or_path)).name or "model")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    file_types = {"F16": gguf.LlamaFileType.MOSTLY_F16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                  "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
    writer.add_file_type(file_types[qtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    # Tokenizer: byte-level BPE is llama.cpp's "gpt2" model; `pre` names its pre-split regex.
    vocab = tokenizer.get_vocab()  # token -> id
    special = {i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}
    tokens = [f"[PAD{i}]" for i in range(config.vocab_size)]
    types = [gguf.TokenType.UNUSED] * config.vocab_size
    for token, i in vocab.items():
        if i < config.vocab_size:
            tokens[i] = token
            types[i] = gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for add, token_id in ((writer.add_bos_token_id, config.bos_token_id), (writer.add_eos_token_id, config.eos_token_id),
                          (writer.add_pad_token_id, config.pad_token_id), (writer.add_unk_token_id, tokenizer.unk_token_id)):
        if token_id is not None:
            add(int(token_id))
    ids = tokenizer("a")["input_ids"]  # does the tokenizer itself put BOS in front? tell llama.cpp the same
    writer.add_add_bos_token(len(ids) > 1 and ids[0] == tokenizer.bos_token_id)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
# --8<-- [end:metadata]


# --8<-- [start:write_gguf]
def write_gguf(path: Path, tensors: list[tuple[str, np.ndarray]], qtype: str, header, quiet: bool) -> dict[str, np.ndarray]:
    """Quantize every tensor with gguf-py and write the file; return what each tensor decodes to."""
    import gguf

    writer = gguf.GGUFWriter(path, arch="llama")
    header(writer)
    expected = {}
    for name, W in tensors:
        ggml_type = gguf.GGMLQuantizationType[tensor_qtype(name, W, qtype)]
        data = gguf.quants.quantize(W, ggml_type)  # uint8 blocks (R, C/32·bytes per block), or F16/F32
        writer.add_tensor(name, data, raw_dtype=ggml_type)
        expected[name] = gguf.quants.dequantize(data, ggml_type).reshape(W.shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=not quiet)
    writer.close()
    return expected
# --8<-- [end:write_gguf]


# --8<-- [start:read_back]
def read_gguf(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """Every tensor of a GGUF file as (GGML type name, decoded FP32 array in transformers' (R, C) order)."""
    import gguf

    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        shape = tuple(reversed(t.shape.tolist()))  # GGUF lists dimensions innermost first
        out[t.name] = (t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape))
    return out
# --8<-- [end:read_back]


def check_round_trip(path: Path, tensors: list[tuple[str, np.ndarray]], expected: dict[str, np.ndarray]) -> dict:
    """File vs memory (must be exact, every tensor), our torch blocks vs gguf-py (must be exact; checked
    on the first decoder layer, None when it has no Q8_0 or Q4_0 tensor), and the relative error of
    the decoder's linear weights vs FP32."""
    decoded = read_gguf(path)
    source = dict(tensors)
    if set(decoded) != set(source):
        raise RuntimeError(f"{path.name}: tensor names differ after reading back")
    file_vs_memory = max(float(np.abs(decoded[n][1] - expected[n]).max()) for n in source)
    scratch_vs_gguf, err2, norm2, types = None, 0.0, 0.0, {}
    for name, W in source.items():
        ggml_type, W_hat = decoded[name]
        types[ggml_type] = types.get(ggml_type, 0) + 1
        if ggml_type in SCRATCH and name.startswith("blk.0."):  # one layer is enough to show it, and quick
            quantize, dequantize = SCRATCH[ggml_type]
            ours = dequantize(*quantize(torch.from_numpy(W))).numpy()
            scratch_vs_gguf = max(scratch_vs_gguf or 0.0, float(np.abs(ours - W_hat).max()))
        if name.startswith("blk.") and W.ndim == 2:  # the decoder's linear weights
            err2 += float(((W - W_hat) ** 2).sum())
            norm2 += float((W**2).sum())
    return {"tensor_types": types, "file_vs_memory_max_abs_diff": file_vs_memory,
            "scratch_vs_gguf_max_abs_diff": scratch_vs_gguf, "linear_rel_error": math.sqrt(err2 / norm2)}


# --8<-- [start:llama_cpp]
def run_llama_cpp(path: Path, prompt: str, max_new_tokens: int, threads: int, seed: int, repeats: int) -> dict:
    """Greedy generation with llama.cpp's Python bindings: median tokens/s of `repeats` timed runs,
    after one warm-up call (first-call allocations; the prompt is then cached, so the timed runs
    measure decoding)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_threads=threads, seed=seed, verbose=False)
    llm(prompt, max_tokens=4, temperature=0.0)  # warm-up
    speeds = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = llm(prompt, max_tokens=max_new_tokens, temperature=0.0)
        speeds.append(out["usage"]["completion_tokens"] / (time.perf_counter() - start))
    return {"text": out["choices"][0]["text"], "new_tokens": out["usage"]["completion_tokens"],
            "tokens_per_s": sorted(speeds)[len(speeds) // 2], "tokens_per_s_runs": speeds, "threads": threads}
# --8<-- [end:llama_cpp]


def evaluation_ids(tokenizer, data: str, n_tokens: int) -> torch.Tensor:
    """The first n_tokens tokens of the evaluation text (never the calibration part)."""
    if data == "pydoc":
        from pydoc_data.topics import topics

        text = "\n\n".join(topics[key] for key in sorted(topics))
        text = text[text.index("\n\n", int(len(text) * 0.4)):]  # the part after the calibration 40 %
    else:
        try:
            from datasets import load_dataset
        except ImportError:
            fail("--data wikitext2 needs the `datasets` package (pip install datasets); or use --data pydoc")
        text = "\n\n".join(load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"])
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    return ids[:n_tokens]


# --8<-- [start:quality]
@torch.no_grad()
def compare_models(reference, candidates: dict, ids: torch.Tensor, context: int, device: torch.device) -> dict:
    """Perplexity (± standard error), mean KL(P_ref ‖ P_q) and top-1 agreement on the same tokens.

    The text is cut into non-overlapping windows of `context` tokens; every position except the
    last of a window predicts the next token. ppl = exp(mean NLL); its standard error by the delta
    method is ppl · std(NLL) / sqrt(n).
    """
    names = ["fp32", *candidates]
    nll = {n: [] for n in names}
    kl = {n: [] for n in candidates}
    top1 = {n: [] for n in candidates}
    for start in range(0, len(ids) - 1, context):
        window = ids[start:start + context + 1].to(device)
        x, y = window[:-1].unsqueeze(0), window[1:]  # (1, T), (T,)
        ref = torch.log_softmax(reference(x).logits[0].float(), dim=-1)  # (T, V)
        nll["fp32"].append(-ref.gather(-1, y[:, None])[:, 0])
        for name, model in candidates.items():
            logq = torch.log_softmax(model(x).logits[0].float(), dim=-1)  # (T, V)
            nll[name].append(-logq.gather(-1, y[:, None])[:, 0])
            kl[name].append((ref.exp() * (ref - logq)).sum(-1))
            top1[name].append((ref.argmax(-1) == logq.argmax(-1)).float())
    out = {}
    for name in names:
        values = torch.cat(nll[name])
        ppl = math.exp(values.mean().item())
        out[name] = {"perplexity": ppl, "ppl_stderr": ppl * values.std().item() / math.sqrt(len(values)),
                     "eval_tokens": len(values)}
        if name in candidates:
            out[name]["kl"] = torch.cat(kl[name]).mean().item()
            out[name]["top1"] = torch.cat(top1[name]).mean().item()
    return out
# --8<-- [end:quality]


def load_gguf_in_transformers(path: Path, dtype: torch.dtype, device: torch.device):
    """transformers reads the GGUF and dequantizes every tensor to `dtype` on load."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).to(device).eval()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return model, param_bytes


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where it exists (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown(result: dict) -> str:
    q = result.get("quality_eval_tokens")
    lines = [
        f"`{Path(result['model']).name}` written as GGUF with gguf {result['versions']['gguf']}; "
        + (f"quality on {q} evaluation tokens (context {result['context']}) against the FP32 model, "
           "GGUF loaded back through transformers; " if q else "")
        + (f"llama.cpp tokens/s: median of {result['repeats']} greedy generations of {result['max_new_tokens']} tokens, "
           f"{result['threads']} thread(s)."
           if result["llama_cpp"] == "ran" else f"llama.cpp: {result['llama_cpp']}."),
        "",
        "| file | size (MB) | bits/weight | linear-weight error | perplexity | KL | top-1 | transformers load (MB) | llama.cpp tokens/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    fp = result.get("fp32_quality")
    if fp:
        lines.append(f"| FP32 (transformers) | - | 32 | 0 | {fp['perplexity']:.3f} ± {fp['ppl_stderr']:.3f} | 0 | 1 | "
                     f"{result['fp32_param_mb']:.0f} | - |")
    for row in result["rows"]:
        ppl = f"{row['perplexity']:.3f} ± {row['ppl_stderr']:.3f}" if "perplexity" in row else "-"
        kl = f"{row['kl']:.4f}" if "kl" in row else "-"
        top1 = f"{row['top1']:.3f}" if "top1" in row else "-"
        load = f"{row['transformers_param_mb']:.0f}" if "transformers_param_mb" in row else "-"
        speed = f"{row['llama_cpp']['tokens_per_s']:.0f}" if "llama_cpp" in row else "-"
        lines.append(f"| {row['qtype']} | {row['file_mb']:.1f} | {row['bits_per_weight']:.2f} | "
                     f"{row['linear_rel_error']:.4f} | {ppl} | {kl} | {top1} | {load} | {speed} |")
    return "\n".join(lines) + "\n"


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("Model")
    model.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="hub id or local transformers folder (Llama architecture)")
    model.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the transformers evaluation runs")
    model.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                       help="dtype of the transformers models in the quality check (GGUF is dequantized to it)")
    model.add_argument("--tokenizer-pre", default="smollm",
                       help="llama.cpp's name of the pre-tokenizer regex (convert_hf_to_gguf.py finds it by hashing "
                            "the tokenizer's output): smollm for SmolLM2, gpt2 for GPT-2-style byte-level BPE")
    method = parser.add_argument_group("Method")
    method.add_argument("--bits", type=int, nargs="+", default=[16, 8, 4],
                        help="files to write: 16 = F16, 8 = Q8_0, 4 = Q4_0 (llama-quantize makes the other types)")
    method.add_argument("--group-size", type=int, default=BLOCK, help="weights per block; Q8_0 and Q4_0 fix it at 32")
    method.add_argument("--out-dir", type=Path, default=Path(".cache/gguf"), help="folder for the GGUF files")
    quality = parser.add_argument_group("Quality")
    quality.add_argument("--perplexity", action=argparse.BooleanOptionalAction, default=True,
                         help="load each GGUF back through transformers and compare it with the FP32 model")
    quality.add_argument("--data", default="pydoc", choices=["pydoc", "wikitext2"], help="evaluation text (pydoc: offline)")
    quality.add_argument("--eval-tokens", type=int, default=8192, help="evaluation tokens (the first N of the evaluation text)")
    quality.add_argument("--context", type=int, default=512, help="tokens per evaluation window (non-overlapping)")
    bench = parser.add_argument_group("Benchmark (llama.cpp)")
    bench.add_argument("--llama-cpp", action=argparse.BooleanOptionalAction, default=True,
                       help="run each file with llama.cpp's Python bindings when they are installed")
    bench.add_argument("--prompt", default="The capital of France is", help="prompt for the greedy llama.cpp run")
    bench.add_argument("--max-new-tokens", type=int, default=64, help="tokens llama.cpp generates (greedy)")
    bench.add_argument("--threads", type=int, default=os.cpu_count(),
                       help="llama.cpp CPU threads (on a busy shared machine 1 thread is steadier: threads wait for each other)")
    bench.add_argument("--repeats", type=int, default=3, help="timed generations per file; the median is reported")
    out = parser.add_argument_group("Output")
    out.add_argument("--seed", type=int, default=0, help="random seed (llama.cpp sampler; greedy decoding ignores it)")
    out.add_argument("--json", type=Path, default=None, help="write results here, plus a Markdown table (.md) beside it")
    out.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    bad = [b for b in args.bits if b not in BITS_TO_QTYPE]
    if bad:
        parser.error(f"--bits {bad[0]} has no type in this script; choose from 16 (F16), 8 (Q8_0), 4 (Q4_0) "
                     "(llama.cpp's llama-quantize tool makes Q5_0, Q4_K and the other types)")
    if args.group_size != BLOCK:
        parser.error(f"--group-size {args.group_size}: Q8_0 and Q4_0 use fixed blocks of {BLOCK} weights")
    if args.repeats < 1 or args.threads < 1 or args.max_new_tokens < 1:
        parser.error("--repeats, --threads and --max-new-tokens must be at least 1")
    if args.eval_tokens < 2 or args.context < 2:
        parser.error("--eval-tokens and --context must be at least 2")


def load_model(name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        fail(f"cannot load model {name!r} ({first}); pass a hub id or a local transformers folder")
    if model.config.model_type != "llama":
        fail(f"this script writes the `llama` GGUF architecture; {name!r} is {model.config.model_type!r}")
    return model, tokenizer


def main(args: argparse.Namespace) -> dict:
    validate(build_parser(), args)
    torch.manual_seed(args.seed)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # transformers' own bars (loading, GGUF conversion)
    device = pick_device(args.device)
    model, tokenizer = load_model(args.model)
    import gguf

    tensors = gguf_tensors(model)
    n_params = sum(W.size for _, W in tensors)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(args.model).name
    try:
        import llama_cpp  # noqa: F401  (only asks whether the bindings are installed)
        have_llama_cpp = True
    except ImportError:
        have_llama_cpp = False
    if args.llama_cpp and not have_llama_cpp:
        print("llama_cpp is not installed: skipping the llama.cpp run "
              "(pip install llama-cpp-python==0.3.36 compiles llama.cpp, a few minutes)")

    rows, paths = [], {}
    for bits in args.bits:
        qtype = BITS_TO_QTYPE[bits]
        path = args.out_dir / f"{stem}-{qtype}.gguf"
        expected = write_gguf(path, tensors, qtype,
                              lambda w, q=qtype: add_metadata(w, model.config, tokenizer, q, args.tokenizer_pre), args.quiet)
        size = path.stat().st_size
        row = {"qtype": qtype, "bits": bits, "group_size": BLOCK if qtype != "F16" else 0, "path": str(path),
               "file_mb": size / 1e6, "size_mb": size / 1e6, "bits_per_weight": 8 * size / n_params,
               **check_round_trip(path, tensors, expected)}
        if args.llama_cpp and have_llama_cpp:
            row["llama_cpp"] = run_llama_cpp(path, args.prompt, args.max_new_tokens, args.threads, args.seed, args.repeats)
        rows.append(row)
        paths[qtype] = path
        print(f"{path.name}: {row['file_mb']:.1f} MB, {row['bits_per_weight']:.2f} bits/weight, "
              f"round trip max diff {row['file_vs_memory_max_abs_diff']}, linear error {row['linear_rel_error']:.4f}"
              + (f", llama.cpp {row['llama_cpp']['tokens_per_s']:.0f} tokens/s: {row['llama_cpp']['text'][:40]!r}"
                 if "llama_cpp" in row else ""))

    result = {
        "hardware": cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__, "gguf": _version("gguf"),
                     "llama_cpp_python": _version("llama_cpp_python") if have_llama_cpp else None},
        "command": "python " + " ".join(sys.argv),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "model": args.model, "n_params": n_params, "device": str(device), "dtype": args.dtype,
        "threads": args.threads, "context": args.context, "prompt": args.prompt, "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "llama_cpp": "ran" if args.llama_cpp and have_llama_cpp else
                     ("not installed (pip install llama-cpp-python==0.3.36)" if args.llama_cpp else "not asked for (--no-llama-cpp)"),
        "rows": rows,
    }
    if args.perplexity:
        evaluate(result, model, tokenizer, paths, args, device)
    print(markdown(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        args.json.with_suffix(".md").write_text(markdown(result))
        print(f"wrote {args.json} and {args.json.with_suffix('.md').name}")
    return result


def evaluate(result: dict, model, tokenizer, paths: dict[str, Path], args: argparse.Namespace, device: torch.device) -> None:
    """Load each GGUF through transformers and compare it with the FP32 model on the same tokens."""
    dtype = getattr(torch, args.dtype)
    ids = evaluation_ids(tokenizer, args.data, args.eval_tokens)
    candidates, loaded_bytes = {}, {}
    for qtype, path in paths.items():
        candidates[qtype], loaded_bytes[qtype] = load_gguf_in_transformers(path, dtype, device)
    quality = compare_models(model.to(device=device, dtype=dtype), candidates, ids, args.context, device)
    result["fp32_quality"] = quality["fp32"]
    result["fp32_param_mb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6
    result["quality_eval_tokens"] = quality["fp32"]["eval_tokens"]
    result["data"] = args.data
    for row in result["rows"]:
        row.update(quality[row["qtype"]])
        row["transformers_param_mb"] = loaded_bytes[row["qtype"]] / 1e6


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main(build_parser().parse_args())
