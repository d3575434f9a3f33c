"""PagedAttention and continuous batching from scratch, driving a real model.

What it shows
-------------
A miniature vLLM in nano-vllm's decomposition: ``Sequence`` (WAITING -> RUNNING -> FINISHED,
token p in slot ``block_table[p // BS] * BS + p % BS``), ``BlockManager`` (free list, reference
counts, prefix caching), ``Scheduler`` (prefill first, preemption when blocks run out),
``paged_attention`` (K/V gathered through block tables; ``attention`` is the plain math) and
``LLMEngine`` (``add_request`` / ``step`` / ``generate`` over a transformers Llama's weights).
One table compares it on a few requests with static batches in the same engine and with
transformers ``generate`` one request at a time (a contiguous cache).

Run it
------
    python inference/inference-acceleration/examples/paged_attention.py --model HuggingFaceTB/SmolLM2-135M-Instruct
    python inference/inference-acceleration/examples/paged_attention.py --num-blocks 6   # preempts

On SmolLM2 (CPU) it prints, for 6 requests of 8 to 24 greedy tokens, the same tokens from all
three methods and fewer steps for continuous than for static batches. ``bench/serving.py``
measures tokens/s and KV memory on larger workloads against more baselines.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

import torch

PROMPTS = ["The capital of France is", "def fibonacci(n):", "The three primary colours are",
           "A list of the planets, in order from the Sun:", "To make a cup of tea, first",
           "Once upon a time, in a small village by the sea, there lived"]


class Refusal(Exception):
    """A run-time refusal: one line that names the problem and the fix (exit code 2)."""


# --8<-- [start:sequence]
Status = Enum("Status", "WAITING RUNNING FINISHED")


@dataclass
class Sequence:
    """One request: its tokens, its state in the scheduler and its blocks in the KV cache."""
    token_ids: list[int]                 # prompt followed by the tokens generated so far
    num_prompt_tokens: int
    max_new_tokens: int
    eos_token_id: int | None = None      # None: generate exactly max_new_tokens (benchmarks)
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)  # logical block i -> physical block
    num_cached_tokens: int = 0           # leading tokens whose K/V are already in the cache

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    def num_blocks(self, block_size: int) -> int:
        return math.ceil(self.num_tokens / block_size)
# --8<-- [end:sequence]


# --8<-- [start:block_manager]
class BlockManager:
    """A free list, reference counts, and full blocks indexed by hash((previous hash, tokens))
    for prefix caching; a freed block keeps its hash until handed out again (an LRU cache)."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        self.block_size, self.prefix_caching = block_size, prefix_caching
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        self.num_prefix_hit_tokens = 0

    def _take(self) -> int:
        block = self.free_block_ids.popleft()
        if self.hash_to_block.get(self.block_hash[block]) == block:
            del self.hash_to_block[self.block_hash[block]]        # its old prefix is evicted
        self.block_hash[block], self.ref_counts[block] = None, 1
        return block

    def _register(self, block: int, prev_hash: int | None, tokens: list[int]) -> int | None:
        if not self.prefix_caching:
            return None
        self.block_hash[block] = h = hash((prev_hash, tuple(tokens)))
        self.hash_to_block[h] = block
        return h

    def can_allocate(self, seq: Sequence) -> bool:
        return len(self.free_block_ids) >= seq.num_blocks(self.block_size)  # ignores hits

    def allocate(self, seq: Sequence) -> None:
        """Blocks for every token of a WAITING sequence, reusing cached prefix blocks."""
        BS, h, hit = self.block_size, None, self.prefix_caching
        for i in range(seq.num_blocks(BS)):
            tokens = seq.token_ids[i * BS:(i + 1) * BS]
            full = len(tokens) == BS
            # The block holding the last token is never a hit: its logits must be computed.
            block = self.hash_to_block.get(hash((h, tuple(tokens))))
            if hit and full and (i + 1) * BS < seq.num_tokens and block is not None:
                if self.ref_counts[block] == 0:
                    self.free_block_ids.remove(block)
                self.ref_counts[block] += 1
                seq.num_cached_tokens += BS
                self.num_prefix_hit_tokens += BS
                h = self.block_hash[block]
            else:
                hit, block = False, self._take()      # a prefix ends at its first miss
                if full:
                    h = self._register(block, h, tokens)
            seq.block_table.append(block)

    def can_append(self, seq: Sequence) -> bool:
        """Room for the K/V of the sequence's last token."""
        needs_block = len(seq.block_table) < seq.num_blocks(self.block_size)
        return len(self.free_block_ids) >= int(needs_block)

    def append_slot(self, seq: Sequence) -> None:
        BS, pos = self.block_size, seq.num_tokens - 1
        if pos // BS == len(seq.block_table):
            seq.block_table.append(self._take())
        if (pos + 1) % BS == 0:             # this token fills its block: index it
            prev = self.block_hash[seq.block_table[-2]] if len(seq.block_table) > 1 else None
            self._register(seq.block_table[-1], prev, seq.token_ids[pos + 1 - BS:pos + 1])

    def free(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):   # tail first: it is the least reusable
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_block_ids.append(block)
        seq.block_table.clear()
        seq.num_cached_tokens = 0
# --8<-- [end:block_manager]


# --8<-- [start:scheduler]
class Scheduler:
    """Prefill first, then decode; preempt by recompute when blocks run out."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int) -> None:
        self.bm, self.max_num_seqs = block_manager, max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> tuple[list[Sequence], bool]:
        """The sequences of the next step, and whether it is a prefill step."""
        admitted, num_tokens = [], 0
        while self.waiting and len(self.running) + len(admitted) < self.max_num_seqs:
            seq = self.waiting[0]
            if admitted and num_tokens + seq.num_tokens > self.max_num_batched_tokens:
                break                       # this step's prefill token budget is spent
            if not self.bm.can_allocate(seq):
                break                       # wait until finished sequences free blocks
            self.bm.allocate(seq)
            num_tokens += seq.num_tokens - seq.num_cached_tokens
            seq.status = Status.RUNNING
            admitted.append(self.waiting.popleft())
        if admitted:
            self.running.extend(admitted)
            return admitted, True
        scheduled = []                      # decode: every running sequence, one token each
        while self.running:
            seq = self.running.popleft()
            while not self.bm.can_append(seq):     # preempt the newest, recompute it later
                victim = self.running.pop() if self.running else seq
                self.bm.free(victim)
                victim.status = Status.WAITING
                self.waiting.appendleft(victim)
                self.num_preemptions += 1
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                self.bm.append_slot(seq)
                scheduled.append(seq)
        self.running.extend(scheduled)
        return scheduled, False

    def postprocess(self, seqs: list[Sequence], token_ids: list[int]) -> list[Sequence]:
        finished = []
        for seq, token in zip(seqs, token_ids):
            seq.token_ids.append(token)
            seq.num_cached_tokens = seq.num_tokens - 1    # all but the new token are cached
            if token == seq.eos_token_id or len(seq.output_ids) >= seq.max_new_tokens:
                seq.status = Status.FINISHED
                self.bm.free(seq)
                self.running.remove(seq)
                finished.append(seq)
        return finished
# --8<-- [end:scheduler]


# --8<-- [start:paged_attention]
@dataclass
class StepMeta:
    """Where one step's K/V live; built once per step and passed to every layer."""
    slot_mapping: torch.Tensor      # (T,) cache slot of each new token
    block_tables: torch.Tensor      # (B, MB) physical blocks of each sequence, padded with 0
    context_lens: list[int]         # tokens of each sequence in the cache after this step
    query_lens: list[int]           # new tokens of each sequence (all 1 in a decode step)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v, each of Hkv K/V heads serving G = H / Hkv queries:
    q (B, Tq, H, D); k, v (B, Hkv, Tk, D); mask (B, Tq, Tk) True where a key is visible."""
    B, Tq, H, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = H // Hkv
    q = q.view(B, Tq, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * Tq, D)
    scores = (q @ k.transpose(-1, -2)).float() * D ** -0.5               # (B, Hkv, G*Tq, Tk)
    scores = scores.view(B, Hkv, G, Tq, Tk).masked_fill(~mask[:, None, None], float("-inf"))
    p = scores.softmax(dim=-1).to(v.dtype).view(B, Hkv, G * Tq, Tk)
    out = p @ v                                                          # (B, Hkv, G*Tq, D)
    return out.view(B, Hkv, G, Tq, D).permute(0, 3, 1, 2, 4).reshape(B, Tq, H, D)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: StepMeta) -> torch.Tensor:
    """Attention of the step's new tokens over each sequence's K/V, read via block tables:
    q (T, H, D) packed tokens of all sequences; k_cache, v_cache (NB, BS, Hkv, D)."""
    BS = k_cache.shape[1]
    if all(n == 1 for n in meta.query_lens):     # decode: one gather for the whole batch
        pos = torch.arange(meta.block_tables.shape[1] * BS, device=q.device)     # (L,)
        slots = meta.block_tables[:, pos // BS] * BS + pos % BS                  # (B, L)
        valid = pos < torch.tensor(meta.context_lens, device=q.device)[:, None]  # (B, L)
        k = k_cache.flatten(0, 1)[slots].transpose(1, 2)                  # (B, Hkv, L, D)
        v = v_cache.flatten(0, 1)[slots].transpose(1, 2)                  # (B, Hkv, L, D)
        v = v.masked_fill(~valid[:, None, :, None], 0.0)        # 0 x NaN would be NaN
        return attention(q[:, None], k, v, valid[:, None]).squeeze(1)     # (B, H, D)
    out, start = [], 0
    for i, (Tq, ctx) in enumerate(zip(meta.query_lens, meta.context_lens)):   # prefill
        blocks = meta.block_tables[i, :math.ceil(ctx / BS)]
        k = k_cache[blocks].flatten(0, 1)[:ctx].transpose(0, 1)             # (Hkv, ctx, D)
        v = v_cache[blocks].flatten(0, 1)[:ctx].transpose(0, 1)             # (Hkv, ctx, D)
        causal = torch.arange(ctx - Tq, ctx)[:, None] >= torch.arange(ctx)[None]
        out.append(attention(q[None, start:start + Tq], k[None], v[None],
                             causal[None].to(q.device))[0])                 # (Tq, H, D)
        start += Tq
    return torch.cat(out)                                                   # (T, H, D)
# --8<-- [end:paged_attention]


# --8<-- [start:kv_cache]
class PagedKVCache:
    """K and V of every layer in blocks: two tensors of shape (L, NB, BS, Hkv, D)."""

    def __init__(self, config, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device, fill: float = 0.0) -> None:
        c = config
        D = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        shape = (c.num_hidden_layers, num_blocks, block_size, c.num_key_value_heads, D)
        self.k = torch.full(shape, fill, dtype=dtype, device=device)
        self.v = torch.full(shape, fill, dtype=dtype, device=device)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               meta: StepMeta) -> torch.Tensor:
        """Store the new tokens' K/V (T, Hkv, D) at their slots, then attend over the cache."""
        self.k[layer].flatten(0, 1)[meta.slot_mapping] = k      # (NB*BS, Hkv, D) view
        self.v[layer].flatten(0, 1)[meta.slot_mapping] = v
        return paged_attention(q, self.k[layer], self.v[layer], meta)
# --8<-- [end:kv_cache]


# --8<-- [start:forward]
def decoder_forward(model, input_ids: torch.Tensor, positions: torch.Tensor,
                    cache: PagedKVCache, meta: StepMeta) -> torch.Tensor:
    """The Llama forward on a step's packed tokens, with a transformers model's modules:
    input_ids, positions (T,) -> the logits of each sequence's last token (B, V)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    inner, T = model.model, len(input_ids)
    x = inner.embed_tokens(input_ids)                                # (T, C)
    cos, sin = inner.rotary_emb(x, positions[None])                  # (1, T, D) each
    for i, layer in enumerate(inner.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(T, -1, attn.head_dim)                # (T, H, D)
        k = attn.k_proj(h).view(T, -1, attn.head_dim)                # (T, Hkv, D)
        v = attn.v_proj(h).view(T, -1, attn.head_dim)                # (T, Hkv, D)
        q, k = apply_rotary_pos_emb(q, k, cos[0], sin[0], unsqueeze_dim=1)
        x = x + attn.o_proj(cache.attend(i, q, k, v, meta).flatten(1))   # (T, C)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    last = torch.tensor(meta.query_lens, device=x.device).cumsum(0) - 1     # (B,)
    return model.lm_head(inner.norm(x[last]))                        # (B, V)
# --8<-- [end:forward]


# --8<-- [start:engine]
class LLMEngine:
    """Scheduler + block manager + paged KV cache + model: add_request(), then step()."""

    def __init__(self, model, num_blocks: int, block_size: int = 16, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 2048, prefix_caching: bool = True,
                 fill: float = 0.0) -> None:
        self.model, self.device, self.block_size = model, model.device, block_size
        self.block_manager = BlockManager(num_blocks, block_size, prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens)
        dt = next(model.parameters()).dtype
        self.cache = PagedKVCache(model.config, num_blocks, block_size, dt, self.device, fill)
        self.num_blocks, self.num_steps, self.peak_blocks = num_blocks, 0, 0

    def add_request(self, prompt_ids: list[int], max_new_tokens: int,
                    eos_token_id: int | None = None) -> Sequence:
        seq = Sequence(list(prompt_ids), len(prompt_ids), max_new_tokens, eos_token_id)
        self.scheduler.waiting.append(seq)
        return seq

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """One forward pass over the scheduled sequences; returns those that finished."""
        seqs, is_prefill = self.scheduler.schedule()
        if not seqs:
            raise Refusal("the KV pool cannot hold one sequence: raise --num-blocks")
        starts = [s.num_cached_tokens if is_prefill else s.num_tokens - 1 for s in seqs]
        ids = [t for s, a in zip(seqs, starts) for t in s.token_ids[a:]]
        pos = [p for s, a in zip(seqs, starts) for p in range(a, s.num_tokens)]
        BS, MB = self.block_size, max(len(s.block_table) for s in seqs)
        slots = [s.block_table[p // BS] * BS + p % BS for s, a in zip(seqs, starts)
                 for p in range(a, s.num_tokens)]
        tables = [s.block_table + [0] * (MB - len(s.block_table)) for s in seqs]
        meta = StepMeta(torch.tensor(slots, device=self.device),
                        torch.tensor(tables, device=self.device), [s.num_tokens for s in seqs],
                        [s.num_tokens - a for s, a in zip(seqs, starts)])
        logits = decoder_forward(self.model, torch.tensor(ids, device=self.device),
                                 torch.tensor(pos, device=self.device), self.cache, meta)
        self.num_steps += 1
        in_use = self.num_blocks - len(self.block_manager.free_block_ids)
        self.peak_blocks = max(self.peak_blocks, in_use)
        return self.scheduler.postprocess(seqs, logits.argmax(-1).tolist())   # greedy

    def generate(self, prompts: list[list[int]], max_new_tokens: list[int],
                 eos_token_id: int | None = None) -> list[list[int]]:
        seqs = [self.add_request(p, n, eos_token_id) for p, n in zip(prompts, max_new_tokens)]
        while not self.scheduler.is_finished():
            self.step()
        return [seq.output_ids for seq in seqs]
# --8<-- [end:engine]


def load_model(name: str, device: torch.device, dtype: torch.dtype):
    """A transformers Llama model and its tokenizer, from a hub id or a local folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except (OSError, ValueError) as error:
        raise Refusal(f"cannot load model {name!r} ({type(error).__name__}): pass a local "
                      "transformers folder or a hub id with --model") from None
    if model.config.model_type != "llama":
        raise Refusal(f"{name!r} is a {model.config.model_type} model: this engine runs "
                      "Llama-architecture models (e.g. SmolLM2)")
    return model.to(device).eval(), tokenizer


def compare(model, prompts: list[list[int]], new_tokens: list[int], eos: int | None,
            args: argparse.Namespace) -> list[tuple]:
    """(method, outputs, steps, seconds, peak KV slots) of the same requests, three ways."""
    BS, B, rows = args.block_size, args.max_num_seqs, []
    chunks = [range(i, min(i + B, len(prompts))) for i in range(0, len(prompts), B)]
    for name, batches in (("paged engine, continuous batching", [range(len(prompts))]),
                          ("paged engine, static batches", chunks)):   # B at a time, to the end
        engine, start = LLMEngine(model, args.num_blocks, BS, B), time.perf_counter()
        out = [o for b in batches for o in engine.generate([prompts[j] for j in b],
                                                           [new_tokens[j] for j in b], eos)]
        rows.append((name, out, engine.num_steps, time.perf_counter() - start,
                     engine.peak_blocks * BS))
    out, start = [], time.perf_counter()
    for p, n in zip(prompts, new_tokens):       # a contiguous cache of len(p) + n, one at a time
        ids = model.generate(torch.tensor([p], device=model.device), max_new_tokens=n,
                             do_sample=False, eos_token_id=eos, pad_token_id=eos)
        out.append(ids[0, len(p):].tolist())
    rows.append(("transformers generate, one request at a time", out, sum(new_tokens),
                 time.perf_counter() - start, max(len(p) + n for p, n in zip(prompts, new_tokens))))
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("Model")
    g.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                   help="Llama-architecture model: hub id or local folder")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to run (auto: cuda if visible)")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weights and KV cache")
    g.add_argument("--seed", type=int, default=0, help="seed of the output lengths")
    g = p.add_argument_group("Engine")
    g.add_argument("--num-requests", type=int, default=6, help="requests to serve")
    g.add_argument("--block-size", type=int, default=16, help="token slots per block (BS)")
    g.add_argument("--num-blocks", type=int, default=64,
                   help="blocks in the KV pool (NB); a few force preemption")
    g.add_argument("--max-num-seqs", type=int, default=4,
                   help="most sequences running at once (B, also the static batch size)")
    return p


def main(args: argparse.Namespace) -> None:
    for flag in ("num_requests", "block_size", "num_blocks", "max_num_seqs"):
        if getattr(args, flag) < 1:
            build_parser().error(f"--{flag.replace('_', '-')} must be positive")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise Refusal("--device cuda but no CUDA GPU is visible: use --device cpu")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.model, device, getattr(torch, args.dtype))
    rng = random.Random(args.seed)
    prompts = [tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"] for i in range(args.num_requests)]
    new_tokens = [rng.randint(8, 24) for _ in prompts]
    longest = max(len(p) + n for p, n in zip(prompts, new_tokens))
    if math.ceil(longest / args.block_size) > args.num_blocks:
        raise Refusal(f"the longest request needs {math.ceil(longest / args.block_size)} blocks "
                      f"of {args.block_size}: raise --num-blocks")
    rows = compare(model, prompts, new_tokens, tokenizer.eos_token_id, args)
    print(f"{args.num_requests} requests, {sum(map(len, prompts))} prompt tokens, "
          f"{args.num_blocks} blocks of {args.block_size}, at most {args.max_num_seqs} running\n")
    print("| method | output tokens | steps | tokens/s | peak KV slots | same tokens |\n"
          "| --- | ---: | ---: | ---: | ---: | --- |")
    for name, out, steps, seconds, slots in rows:
        n = sum(map(len, out))
        print(f"| {name} | {n} | {steps} | {n / seconds:.1f} | {slots} | "
              f"{'yes' if out == rows[0][1] else 'NO'} |")


if __name__ == "__main__":
    try:
        main(build_parser().parse_args())
    except Refusal as why:
        print(f"error: {why}", file=sys.stderr)
        sys.exit(2)
