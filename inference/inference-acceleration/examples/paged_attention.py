"""PagedAttention and continuous batching from scratch, driving a real model.

What it shows
-------------
A miniature vLLM in one file, with vLLM's (and nano-vllm's) vocabulary:

* ``BlockManager``: the KV cache is cut into NB blocks of BS token slots. A free list hands
  out blocks, reference counts let sequences share them (prefix caching, ``fork``), and a
  shared block is copied before it is written (copy-on-write).
* ``Sequence.block_table``: logical block i of a sequence lives in physical block
  ``block_table[i]``; token position p is stored in slot ``block_table[p // BS] * BS + p % BS``
  (the *slot mapping*).
* ``paged_attention``: attention that gathers K/V through the block table from a cache tensor
  of shape (NB, BS, Hkv, D) per layer, so a sequence's blocks can sit anywhere.
* ``Scheduler``: WAITING -> RUNNING -> FINISHED. New requests are admitted whenever free
  blocks allow (continuous batching); when the pool runs dry a running sequence is preempted
  (its blocks freed) and recomputed later.
* ``LLMEngine``: runs the real model's weights (embeddings, q/k/v/o projections, RoPE, MLP,
  norms of a transformers ``LlamaForCausalLM``) through a compact forward in which every
  decode step batches all running sequences into one forward pass.

Then it checks and measures:

1. greedy tokens identical to a contiguous per-request cache and to transformers ``generate``,
   with a shuffled physical block order and NaN written into every unused cache slot, under
   preemption, with prefix caching, and after a ``fork`` with copy-on-write;
2. KV memory in use against reserved, compared with per-request pre-allocation to max length;
3. throughput on a mixed-length workload (prompt and output lengths drawn uniformly from the
   ``--prompt-len`` and ``--output-len`` ranges with ``--seed``) against static batching in the
   same engine, transformers ``generate`` in padded batches, and ``generate`` one request at a
   time.

Run it
------
    python paged_attention.py --model HuggingFaceTB/SmolLM2-135M-Instruct --json results/paged_attention-cpu.json
    python paged_attention.py --random-weights llama-3-8b --device cuda --num-requests 256 ...

On SmolLM2 (2 CPU cores) it prints that all token checks pass, that the paged pool holds the
same requests in a fraction of the memory that pre-allocation reserves, and a throughput table
in which continuous batching beats static and padded batching. ``vllm_example.py`` in the same
folder imports this file to run the same workload beside vLLM.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum, auto
from functools import partial
from pathlib import Path
from typing import Callable, NoReturn

import torch
import torch.nn.functional as F

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def fail(message: str) -> NoReturn:
    """Bad input ends in one line and exit code 2, never a traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)

# Shapes of real models for speed runs with random weights (speed does not depend on the values).
RANDOM_SHAPES: dict[str, dict] = {
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1024,
                 rope_theta=10000.0, max_position_embeddings=2048),
}


# --8<-- [start:sequence]
class Status(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


@dataclass
class Sequence:
    """One request: its tokens, its place in the scheduler and its blocks in the KV cache."""

    seq_id: int
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
    """Hands out KV-cache blocks: a free list, reference counts and optional prefix caching.

    A block whose reference count falls to 0 goes back to the free list. With prefix caching a
    full block is also indexed by a hash of (hash of the previous block, its token ids), so a
    later prompt with the same prefix reuses it; a freed block keeps its hash until it is
    handed out again, which makes the free list an LRU cache of old prefixes.
    """

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False,
                 shuffle_seed: int | None = None) -> None:
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        order = list(range(num_blocks))
        if shuffle_seed is not None:      # random physical order: proves nothing assumes contiguity
            random.Random(shuffle_seed).shuffle(order)
        self.free_block_ids: deque[int] = deque(order)
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        self.new_blocks: list[int] = []   # handed out since the last drain (the engine may poison them)
        self.num_cow_copies = 0
        self.num_prefix_hit_tokens = 0

    @property
    def num_free(self) -> int:
        return len(self.free_block_ids)

    def _take(self) -> int:
        block = self.free_block_ids.popleft()
        if self.block_hash[block] is not None and self.hash_to_block.get(self.block_hash[block]) == block:
            del self.hash_to_block[self.block_hash[block]]     # its old prefix is evicted
        self.block_hash[block] = self.block_tokens[block] = None
        self.ref_counts[block] = 1
        self.new_blocks.append(block)
        return block

    def _register(self, block: int, prev_hash: int | None, tokens: tuple[int, ...]) -> int:
        """Index a full block by its prefix hash; returns the hash for the next block."""
        h = hash((prev_hash, tokens))
        if self.prefix_caching:
            self.block_hash[block], self.block_tokens[block] = h, tokens
            self.hash_to_block[h] = block
        return h

    def can_allocate(self, seq: Sequence) -> bool:
        return self.num_free >= seq.num_blocks(self.block_size)   # conservative: ignores cache hits

    def allocate(self, seq: Sequence) -> None:
        """Give a WAITING sequence blocks for all its tokens, reusing cached prefix blocks."""
        BS, h, hits_possible = self.block_size, None, self.prefix_caching
        for i in range(seq.num_blocks(BS)):
            tokens = tuple(seq.token_ids[i * BS:(i + 1) * BS])
            full = len(tokens) == BS
            # Never count the block holding the last token as a hit: its logits must be computed.
            if hits_possible and full and (i + 1) * BS < seq.num_tokens:
                key = hash((h, tokens))
                block = self.hash_to_block.get(key)
                if block is not None and self.block_tokens[block] == tokens:
                    if self.ref_counts[block] == 0:
                        self.free_block_ids.remove(block)
                    self.ref_counts[block] += 1
                    seq.block_table.append(block)
                    seq.num_cached_tokens += BS
                    self.num_prefix_hit_tokens += BS
                    h = key
                    continue
            hits_possible = False        # a prefix stops at its first miss
            block = self._take()
            seq.block_table.append(block)
            if full:
                h = self._register(block, h, tokens)

    def can_append(self, seq: Sequence) -> bool:
        """Room for the K/V of the sequence's last token (a new block, or a copy of a shared one)."""
        needs_block = len(seq.block_table) < seq.num_blocks(self.block_size)
        shared = not needs_block and self.ref_counts[seq.block_table[-1]] > 1
        return self.num_free >= int(needs_block or shared)

    def append_slot(self, seq: Sequence) -> list[tuple[int, int]]:
        """Make the slot of position num_tokens-1 writable; returns (src, dst) block copies to do."""
        BS, pos, copies = self.block_size, seq.num_tokens - 1, []
        if pos // BS == len(seq.block_table):
            seq.block_table.append(self._take())
        elif self.ref_counts[seq.block_table[-1]] > 1:           # copy-on-write
            src = seq.block_table[-1]
            self.ref_counts[src] -= 1
            seq.block_table[-1] = self._take()
            copies.append((src, seq.block_table[-1]))
            self.num_cow_copies += 1
        if (pos + 1) % BS == 0:           # this token fills its block: index it for prefix caching
            prev = self.block_hash[seq.block_table[-2]] if len(seq.block_table) > 1 else None
            self._register(seq.block_table[-1], prev, tuple(seq.token_ids[pos + 1 - BS:pos + 1]))
        return copies

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child shares every block of the parent (parallel sampling, beam search)."""
        child.block_table = list(parent.block_table)
        child.num_cached_tokens = parent.num_cached_tokens
        for block in child.block_table:
            self.ref_counts[block] += 1

    def free(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_block_ids.append(block)
        seq.block_table.clear()
        seq.num_cached_tokens = 0
# --8<-- [end:block_manager]

    def drain_new_blocks(self) -> list[int]:
        blocks, self.new_blocks = self.new_blocks, []
        return blocks

    def check_invariants(self, live: list[Sequence]) -> None:
        """Every block is free xor referenced; its count equals the live tables that hold it."""
        owners = [0] * self.num_blocks
        for seq in live:
            for block in seq.block_table:
                owners[block] += 1
        free = list(self.free_block_ids)
        assert len(free) == len(set(free)), "a block is twice in the free list"
        free_set = set(free)
        for block in range(self.num_blocks):
            assert self.ref_counts[block] == owners[block], f"block {block}: ref {self.ref_counts[block]} != owners {owners[block]}"
            assert (block in free_set) == (owners[block] == 0), f"block {block} is leaked or free while in use"


# --8<-- [start:scheduler]
@dataclass
class SchedulerOutput:
    seqs: list[Sequence]
    is_prefill: bool
    block_copies: list[tuple[int, int]]   # copy-on-write: (src, dst) physical blocks
    new_blocks: list[int]                 # blocks handed out in this step (their slots are unused)


class Scheduler:
    """WAITING -> RUNNING -> FINISHED, admitting by free blocks and preempting by recompute.

    policy "continuous": a waiting request joins as soon as a slot and blocks are free.
    policy "static": a batch is filled, then nothing joins until every member has finished.
    """

    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 policy: str = "continuous") -> None:
        self.bm, self.max_num_seqs, self.max_num_batched_tokens = block_manager, max_num_seqs, max_num_batched_tokens
        self.policy = policy
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.filling = True               # static policy: the current batch still admits
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def _admit(self) -> list[Sequence]:
        if self.policy == "static" and not self.running:
            self.filling = True
        if self.policy == "static" and not self.filling:
            return []
        admitted, num_tokens = [], 0
        while self.waiting and len(self.running) + len(admitted) < self.max_num_seqs:
            seq = self.waiting[0]
            if admitted and num_tokens + seq.num_tokens > self.max_num_batched_tokens:
                break                     # prefill token budget of this step is spent
            if not self.bm.can_allocate(seq):
                break                     # not enough free blocks: wait for some to be freed
            self.bm.allocate(seq)
            num_tokens += seq.num_tokens - seq.num_cached_tokens
            seq.status = Status.RUNNING
            admitted.append(self.waiting.popleft())
        return admitted

    def _preempt(self, seq: Sequence) -> None:
        """Free the blocks of a running sequence; it goes back to the front of the queue and its
        K/V (prompt and generated tokens) are recomputed when it is admitted again."""
        self.bm.free(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> SchedulerOutput:
        admitted = self._admit()
        if admitted:                      # prefill step: only the new sequences
            self.running.extend(admitted)
            return SchedulerOutput(admitted, True, [], self.bm.drain_new_blocks())
        self.filling = False
        scheduled, copies = [], []
        while self.running:               # decode step: every running sequence, one token each
            seq = self.running.popleft()
            while not self.bm.can_append(seq):
                victim = self.running.pop() if self.running else seq   # newest first
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                copies += self.bm.append_slot(seq)
                scheduled.append(seq)
        self.running = deque(scheduled)
        return SchedulerOutput(scheduled, False, copies, self.bm.drain_new_blocks())

    def postprocess(self, seqs: list[Sequence], next_tokens: list[int]) -> list[Sequence]:
        finished = []
        for seq, token in zip(seqs, next_tokens):
            seq.token_ids.append(token)
            seq.num_cached_tokens = seq.num_tokens - 1     # all but the new token are in the cache
            done = len(seq.output_ids) >= seq.max_new_tokens or token == seq.eos_token_id
            if done:
                seq.status = Status.FINISHED
                self.bm.free(seq)
                self.running.remove(seq)
                finished.append(seq)
        return finished
# --8<-- [end:scheduler]


# --8<-- [start:paged_attention]
@dataclass
class AttentionMetadata:
    """Everything one forward step needs to find K/V; built per step, passed explicitly."""

    is_prefill: bool
    slot_mapping: torch.Tensor     # (T,) cache slot of each new token
    block_tables: torch.Tensor     # (B, MB) physical blocks of each sequence, padded with 0
    context_lens: torch.Tensor     # (B,) tokens in the cache after this step's writes
    query_lens: list[int]          # new tokens per sequence (1 in decode)
    context_lens_host: list[int]   # the same lengths on the host: the prefill loop reads them without a GPU sync
    decode_slots: torch.Tensor | None = None   # (B, MB*BS) decode: slot of every key position


def decode_slots(block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                 null_slot: int) -> torch.Tensor:
    """Slot of key position p of sequence b: block_tables[b, p // BS] * BS + p % BS.

    Positions past a sequence's length point at null_slot, a slot of an all-zero block that is
    never handed out: the padded gather then reads zeros, never a stale (or NaN) value.
    block_tables (B, MB), context_lens (B,) -> (B, MB*BS).
    """
    pos = torch.arange(block_tables.shape[1] * block_size, device=block_tables.device)   # (MB*BS,)
    slots = block_tables[:, pos // block_size] * block_size + pos % block_size          # (B, MB*BS)
    return torch.where(pos < context_lens[:, None], slots, null_slot)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v with Hkv K/V heads shared by groups of G = H / Hkv queries.

    q (B, Tq, H, D); k, v (B, Hkv, Tk, D); mask (B, Tq, Tk), True where a key may be seen.
    Returns (B, Tq, H, D).
    """
    B, Tq, H, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = H // Hkv
    q = q.view(B, Tq, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * Tq, D)   # (B, Hkv, G*Tq, D)
    scores = q @ k.transpose(-1, -2) * D ** -0.5                                    # (B, Hkv, G*Tq, Tk)
    scores = scores.float().view(B, Hkv, G, Tq, Tk).masked_fill(~mask[:, None, None], float("-inf"))
    p = scores.softmax(dim=-1).to(v.dtype).view(B, Hkv, G * Tq, Tk)
    out = p @ v                                                                     # (B, Hkv, G*Tq, D)
    return out.view(B, Hkv, G, Tq, D).permute(0, 3, 1, 2, 4).reshape(B, Tq, H, D)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata) -> torch.Tensor:
    """Attention of the step's new tokens over each sequence's cached K/V, read through block tables.

    q (T, H, D) packed tokens of all sequences; k_cache, v_cache (NB, BS, Hkv, D) one layer.
    Returns (T, H, D).
    """
    BS, Hkv = k_cache.shape[1], k_cache.shape[2]
    if not meta.is_prefill:               # decode: one query per sequence, one padded gather for all
        slots = meta.decode_slots[:, None, :]                                   # (B, 1, L)
        heads = torch.arange(Hkv, device=q.device)[None, :, None]               # (1, Hkv, 1)
        k = k_cache.flatten(0, 1)[slots, heads]        # (B, Hkv, L, D), the layout the matmul reads
        v = v_cache.flatten(0, 1)[slots, heads]        # (B, Hkv, L, D)
        valid = torch.arange(slots.shape[-1], device=q.device) < meta.context_lens[:, None]   # (B, L)
        return grouped_attention(q[:, None], k, v, valid[:, None]).squeeze(1)   # (B, H, D)
    out, start = [], 0
    for i, Tq in enumerate(meta.query_lens):   # prefill: each sequence attends over its own blocks
        ctx = meta.context_lens_host[i]
        blocks = meta.block_tables[i, :math.ceil(ctx / BS)]
        k = k_cache[blocks].flatten(0, 1)[:ctx].transpose(0, 1)                 # (Hkv, ctx, D)
        v = v_cache[blocks].flatten(0, 1)[:ctx].transpose(0, 1)
        q_pos = torch.arange(ctx - Tq, ctx, device=q.device)                    # positions of the queries
        causal = q_pos[:, None] >= torch.arange(ctx, device=q.device)[None]     # (Tq, ctx)
        out.append(grouped_attention(q[None, start:start + Tq], k[None], v[None], causal[None])[0])
        start += Tq
    return torch.cat(out)                                                       # (T, H, D)
# --8<-- [end:paged_attention]


# --8<-- [start:kv_cache]
class PagedKVCache:
    """One K and one V tensor of shape (NB, BS, Hkv, D) per layer, stacked: (L, NB, BS, Hkv, D)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device, fill: float = 0.0) -> None:
        # One extra block, never handed out and always zero: padding in a gather points here.
        shape = (num_layers, num_blocks + 1, block_size, num_kv_heads, head_dim)
        self.k = torch.full(shape, fill, dtype=dtype, device=device)
        self.v = torch.full(shape, fill, dtype=dtype, device=device)
        self.k[:, num_blocks], self.v[:, num_blocks] = 0.0, 0.0
        self.null_slot = num_blocks * block_size

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Store the new tokens' K/V (T, Hkv, D) at their slots (T,)."""
        self.k[layer].flatten(0, 1)[slot_mapping] = k      # (NB*BS, Hkv, D) view of the layer
        self.v[layer].flatten(0, 1)[slot_mapping] = v

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        for src, dst in copies:                            # copy-on-write, all layers at once
            self.k[:, dst] = self.k[:, src]
            self.v[:, dst] = self.v[:, src]

    def fill_blocks(self, blocks: list[int], value: float) -> None:
        if blocks:
            index = torch.tensor(blocks, device=self.k.device)
            self.k[:, index] = value
            self.v[:, index] = value
# --8<-- [end:kv_cache]


# --8<-- [start:forward]
AttendFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def decoder_forward(model, input_ids: torch.Tensor, positions: torch.Tensor, attend: AttendFn,
                    last_index: torch.Tensor) -> torch.Tensor:
    """The Llama forward on packed tokens, reusing a transformers LlamaForCausalLM's modules.

    input_ids, positions (T,); attend(layer, q, k, v) stores k, v (T, Hkv, D) in some cache and
    returns attention of q (T, H, D); last_index (B,) picks the token whose logits we need.
    Returns logits (B, V).
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    inner = model.model
    x = inner.embed_tokens(input_ids)                                  # (T, C)
    cos, sin = inner.rotary_emb(x, positions[None])                    # (1, T, D) each
    for i, layer in enumerate(inner.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(len(input_ids), -1, attn.head_dim)     # (T, H, D)
        k = attn.k_proj(h).view(len(input_ids), -1, attn.head_dim)     # (T, Hkv, D)
        v = attn.v_proj(h).view(len(input_ids), -1, attn.head_dim)     # (T, Hkv, D)
        q, k = apply_rotary_pos_emb(q, k, cos[0], sin[0], unsqueeze_dim=1)
        o = attend(i, q, k, v)                                         # (T, H, D)
        x = x + attn.o_proj(o.flatten(1))                              # (T, C)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    x = inner.norm(x[last_index])                                      # (B, C)
    return model.lm_head(x)                                            # (B, V)


def paged_attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 cache: PagedKVCache, meta: AttentionMetadata) -> torch.Tensor:
    cache.write(layer, k, v, meta.slot_mapping)
    return paged_attention(q, cache.k[layer], cache.v[layer], meta)
# --8<-- [end:forward]


def contiguous_generate(model, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | None) -> list[int]:
    """Reference: one request, its own contiguous cache of shape (L, Tmax, Hkv, D), greedy."""
    cfg, device = model.config, model.device
    dtype = next(model.parameters()).dtype
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    t_max = len(prompt_ids) + max_new_tokens
    kc = torch.zeros(cfg.num_hidden_layers, t_max, cfg.num_key_value_heads, head_dim, dtype=dtype, device=device)
    vc = torch.zeros_like(kc)

    def attend(layer: int, q, k, v, start: int):
        end = start + len(q)
        kc[layer, start:end], vc[layer, start:end] = k, v
        causal = torch.arange(start, end, device=device)[:, None] >= torch.arange(end, device=device)[None]
        k_all, v_all = kc[layer, :end].transpose(0, 1), vc[layer, :end].transpose(0, 1)   # (Hkv, end, D)
        return grouped_attention(q[None], k_all[None], v_all[None], causal[None])[0]

    tokens, start = list(prompt_ids), 0
    while len(tokens) - len(prompt_ids) < max_new_tokens:
        new = torch.tensor(tokens[start:], device=device)
        positions = torch.arange(start, len(tokens), device=device)
        logits = decoder_forward(model, new, positions, partial(attend, start=start),
                                 torch.tensor([len(new) - 1], device=device))
        start = len(tokens)
        tokens.append(int(logits.argmax(-1)))
        if tokens[-1] == eos_token_id:
            break
    return tokens[len(prompt_ids):]


# --8<-- [start:engine]
@dataclass
class StepStats:
    running: int
    tokens_stored: int      # K/V entries actually held
    slots_reserved: int     # blocks in use x BS (paged)


class LLMEngine:
    """Scheduler + block manager + paged KV cache + the model: add requests, call step()."""

    def __init__(self, model, num_blocks: int, block_size: int = 16, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 2048, policy: str = "continuous", prefix_caching: bool = False,
                 shuffle_seed: int | None = None, poison: bool = False, check: bool = False) -> None:
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.model, self.device, self.block_size = model, model.device, block_size
        self.poison, self.check = poison, check        # NaN in unused slots; invariants every step
        self.block_manager = BlockManager(num_blocks, block_size, prefix_caching, shuffle_seed)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens, policy)
        self.cache = PagedKVCache(cfg.num_hidden_layers, num_blocks, block_size, cfg.num_key_value_heads,
                                  head_dim, next(model.parameters()).dtype, model.device,
                                  fill=float("nan") if poison else 0.0)
        self.all_seqs: list[Sequence] = []
        self.stats: list[StepStats] = []
        self.num_computed_tokens = 0

    def add_request(self, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | None = None) -> Sequence:
        seq = Sequence(len(self.all_seqs), list(prompt_ids), len(prompt_ids), max_new_tokens, eos_token_id)
        self.all_seqs.append(seq)
        self.scheduler.add(seq)
        return seq

    def fork(self, parent: Sequence) -> Sequence:
        """A RUNNING copy of parent that shares its blocks (copy-on-write on the first write)."""
        child = Sequence(len(self.all_seqs), list(parent.token_ids), parent.num_prompt_tokens,
                         parent.max_new_tokens, parent.eos_token_id, Status.RUNNING)
        self.block_manager.fork(parent, child)
        self.all_seqs.append(child)
        self.scheduler.running.append(child)
        return child

    def _prepare(self, seqs: list[Sequence], is_prefill: bool) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        BS, ids, pos, slots, query_lens = self.block_size, [], [], [], []
        for seq in seqs:
            start = seq.num_cached_tokens if is_prefill else seq.num_tokens - 1
            for p in range(start, seq.num_tokens):
                ids.append(seq.token_ids[p])
                pos.append(p)
                slots.append(seq.block_table[p // BS] * BS + p % BS)
            query_lens.append(seq.num_tokens - start)
        mb = max(len(seq.block_table) for seq in seqs)
        tables = [seq.block_table + [0] * (mb - len(seq.block_table)) for seq in seqs]
        as_tensor = partial(torch.tensor, dtype=torch.long, device=self.device)
        lens = [seq.num_tokens for seq in seqs]
        meta = AttentionMetadata(is_prefill, as_tensor(slots), as_tensor(tables), as_tensor(lens), query_lens, lens)
        if not is_prefill:                # computed once per step, read by every layer
            meta.decode_slots = decode_slots(meta.block_tables, meta.context_lens, BS, self.cache.null_slot)
        return as_tensor(ids), as_tensor(pos), meta

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        out = self.scheduler.schedule()
        if not out.seqs:
            raise RuntimeError("the KV pool cannot hold even one sequence: raise --num-blocks")
        if self.poison:
            self.cache.fill_blocks(out.new_blocks, float("nan"))
        self.cache.copy_blocks(out.block_copies)
        input_ids, positions, meta = self._prepare(out.seqs, out.is_prefill)
        last_index = torch.tensor(meta.query_lens, device=self.device).cumsum(0) - 1
        logits = decoder_forward(self.model, input_ids, positions,
                                 partial(paged_attend, cache=self.cache, meta=meta), last_index)
        self.num_computed_tokens += len(input_ids)
        finished = self.scheduler.postprocess(out.seqs, logits.argmax(-1).tolist())
        bm = self.block_manager
        self.stats.append(StepStats(len(self.scheduler.running),
                                    sum(s.num_tokens - 1 for s in self.scheduler.running),
                                    (bm.num_blocks - bm.num_free) * self.block_size))
        if self.check:
            bm.check_invariants(list(self.scheduler.running))
        return finished

    def generate(self, prompts: list[list[int]], max_new_tokens: list[int], eos_token_id: int | None = None,
                 progress=None) -> list[list[int]]:
        seqs = [self.add_request(p, n, eos_token_id) for p, n in zip(prompts, max_new_tokens)]
        while not self.scheduler.is_finished():
            finished = self.step()
            if progress is not None:
                progress.update(sum(len(s.output_ids) for s in finished))
        return [seq.output_ids for seq in seqs]
# --8<-- [end:engine]


# ---------------------------------------------------------------- baselines: transformers generate

def hf_generate(model, prompts: list[list[int]], max_new_tokens: int, pad_token_id: int,
                exact_length: bool = True) -> list[list[int]]:
    """Greedy transformers generate on a left-padded batch.

    exact_length: every row runs max_new_tokens steps (the end token is masked out until then, as a
    benchmark needs); otherwise generation stops at the model's end token (as the checks need).
    """
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), do_sample=False,
                         max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens if exact_length else None,
                         pad_token_id=pad_token_id)
    return [row[width:].tolist() for row in out]


# --8<-- [start:static_batches]
def hf_padded_batches(model, prompts: list[list[int]], max_new_tokens: list[int], batch_size: int,
                      pad_token_id: int, progress=None) -> list[list[int]]:
    """Static batching: take requests in arrival order, pad each batch to its longest prompt and run
    it to its longest output; tokens past a request's own length are wasted work."""
    outputs = []
    for start in range(0, len(prompts), batch_size):
        batch_n = max_new_tokens[start:start + batch_size]
        rows = hf_generate(model, prompts[start:start + batch_size], max(batch_n), pad_token_id)
        outputs += [row[:n] for row, n in zip(rows, batch_n)]
        if progress is not None:
            progress.update(sum(batch_n))
    return outputs
# --8<-- [end:static_batches]


# ---------------------------------------------------------------- workload, model, measurement

@dataclass
class Workload:
    prompts: list[list[int]]
    max_new_tokens: list[int]
    description: str


def make_workload(num_requests: int, prompt_len: tuple[int, int], output_len: tuple[int, int],
                  vocab_size: int, seed: int) -> Workload:
    """Prompt and output lengths uniform in the given ranges; prompt tokens uniform in the vocabulary."""
    rng = random.Random(seed)
    lens = [rng.randint(*prompt_len) for _ in range(num_requests)]
    outs = [rng.randint(*output_len) for _ in range(num_requests)]
    prompts = [[rng.randrange(3, vocab_size) for _ in range(n)] for n in lens]
    text = (f"{num_requests} requests, prompt length uniform in [{prompt_len[0]}, {prompt_len[1]}], "
            f"output length uniform in [{output_len[0]}, {output_len[1]}] (seed {seed})")
    return Workload(prompts, outs, text)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but no CUDA GPU is visible; use --device cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(model: str, random_weights: str | None, device: torch.device, dtype: torch.dtype, seed: int):
    """A transformers LlamaForCausalLM: from a folder or hub id, or a named shape with random weights."""
    import transformers
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    if random_weights:
        cfg = LlamaConfig(**RANDOM_SHAPES[random_weights], bos_token_id=1, eos_token_id=2, pad_token_id=0)
        with torch.device(device):
            m = LlamaForCausalLM._from_config(cfg, dtype=dtype)
        return m.eval()
    try:
        m = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    except (OSError, ValueError) as error:
        fail(f"cannot load model {model!r} ({str(error).splitlines()[0]}); "
                 "pass a local folder or a hub id you can download")
    if m.config.model_type != "llama":
        fail(f"{model!r} is a {m.config.model_type} model; this example drives Llama-architecture models")
    return m.to(device).eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable, device: torch.device):
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def progress_bar(total: int, desc: str, quiet: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="tok", disable=quiet or not sys.stderr.isatty(), leave=False)


def kv_bytes_per_token_of(model) -> int:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * next(model.parameters()).element_size()


def num_blocks_for(model, kv_cache_gib: float, block_size: int) -> int:
    return int(kv_cache_gib * 2**30 // (kv_bytes_per_token_of(model) * block_size))


# --------------------------------------------------------------------------- the checks

def run_checks(model, prompts: list[list[int]], max_new_tokens: int, eos: int | None, block_size: int,
               seed: int) -> dict:
    """Greedy tokens of the paged engine against a contiguous cache and transformers generate.

    Every path stops at the end token `eos` (or after max_new_tokens), as transformers does.
    """
    n = [max_new_tokens] * len(prompts)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    hf = [hf_generate(model, [p], k, pad, exact_length=False)[0] for p, k in zip(prompts, n)]
    contiguous = [contiguous_generate(model, p, k, eos) for p, k in zip(prompts, n)]
    roomy = sum(math.ceil((len(p) + max_new_tokens) / block_size) for p in prompts) + 4

    def engine(num_blocks: int, **kw) -> tuple[list[list[int]], LLMEngine]:
        e = LLMEngine(model, num_blocks, block_size, shuffle_seed=seed, poison=True, check=True, **kw)
        out = e.generate(prompts, n, eos)
        e.block_manager.check_invariants([])
        assert e.block_manager.num_free == num_blocks, "blocks leaked after all requests finished"
        return out, e

    paged, _ = engine(roomy)
    # A pool that admits every prompt but cannot hold them as they grow: forces preemption.
    tight_blocks = max(math.ceil((max(map(len, prompts)) + max_new_tokens) / block_size),
                       sum(math.ceil(len(p) / block_size) for p in prompts))
    tight, tight_engine = engine(tight_blocks)
    static, _ = engine(roomy, policy="static", max_num_seqs=2)
    # Prefix caching: every prompt starts with the same "system prompt" of two and a bit blocks.
    system = (sum(prompts, []) * 8)[:2 * block_size + 3]
    shared_prompts = [system + p for p in prompts]
    ref_shared = [contiguous_generate(model, p, max_new_tokens, eos) for p in shared_prompts]
    e = LLMEngine(model, roomy * 4, block_size, max_num_seqs=1, prefix_caching=True, shuffle_seed=seed,
                  poison=True, check=True)
    cached = e.generate(shared_prompts, n, eos)
    # fork: a second greedy continuation shares the prompt's blocks; its first write copies one.
    f = LLMEngine(model, roomy, block_size, shuffle_seed=seed, poison=True, check=True)
    parent = f.add_request(prompts[0], max_new_tokens, eos)
    f.step()                                   # prefill (and the first token)
    child = f.fork(parent)
    while not f.scheduler.is_finished():
        f.step()
    f.block_manager.check_invariants([])
    return {
        "num_prompts": len(prompts),
        "prompt_lengths": [len(p) for p in prompts],
        "max_new_tokens": max_new_tokens,
        "output_lengths": [len(o) for o in contiguous],
        "paged_equals_contiguous": paged == contiguous,
        "contiguous_equals_transformers": contiguous == hf,
        "paged_equals_transformers": paged == hf,
        "shuffled_blocks_and_nan_in_unused_slots": True,
        "preemption": {"num_blocks": tight_blocks, "num_preemptions": tight_engine.scheduler.num_preemptions,
                       "tokens_identical": tight == contiguous},
        "static_policy_tokens_identical": static == contiguous,
        "prefix_caching": {"shared_prefix_tokens": len(system), "prefix_hit_tokens": e.block_manager.num_prefix_hit_tokens,
                           "tokens_computed": e.num_computed_tokens,
                           "tokens_computed_without_cache": sum(map(len, shared_prompts)) + sum(len(o) - 1 for o in ref_shared),
                           "tokens_identical": cached == ref_shared},
        "fork_copy_on_write": {"cow_copies": f.block_manager.num_cow_copies,
                               "tokens_identical": parent.output_ids == child.output_ids == contiguous[0]},
        "allocator_invariants_hold": True,   # check_invariants raised otherwise (after every step)
    }


# --------------------------------------------------------------------------- the benchmark

def run_engine(model, work: Workload, args, policy: str, num_blocks: int, quiet: bool) -> tuple[LLMEngine, float]:
    engine = LLMEngine(model, num_blocks, args.block_size, args.max_num_seqs, args.max_num_batched_tokens, policy)
    with progress_bar(sum(work.max_new_tokens), f"engine ({policy})", quiet) as bar:
        _, seconds = timed(lambda: engine.generate(work.prompts, work.max_new_tokens, progress=bar), model.device)
    return engine, seconds


def memory_summary(engine: LLMEngine, bytes_per_token: int, max_model_len: int, num_blocks: int, block_size: int) -> dict:
    """Paged KV memory in use vs what per-request pre-allocation to max_model_len would reserve."""
    busy = [s for s in engine.stats if s.running > 0]
    peak = max(busy, key=lambda s: s.slots_reserved)
    pool_tokens = num_blocks * block_size
    stored = sum(s.tokens_stored for s in busy)
    return {
        "bytes_per_token": bytes_per_token,
        "pool_tokens": pool_tokens,
        "max_model_len": max_model_len,
        "peak_running": max(s.running for s in busy),
        "peak_tokens_stored": peak.tokens_stored,
        "peak_paged_slots_reserved": peak.slots_reserved,
        "peak_prealloc_slots_reserved": peak.running * max_model_len,
        "mean_paged_utilization": stored / sum(s.slots_reserved for s in busy),
        "mean_prealloc_utilization": stored / sum(s.running * max_model_len for s in busy),
        "prealloc_max_concurrency_in_pool": pool_tokens // max_model_len,
        "series": [[s.running, s.tokens_stored, s.slots_reserved] for s in engine.stats],
    }


def ops_per_decode_step(model, block_size: int) -> int:
    """PyTorch operator calls (top level, views included) in one decode step of 4 sequences.

    Eager PyTorch pays host time for each of them; a CUDA graph replays the whole step at once.
    """
    from torch.profiler import ProfilerActivity, profile

    engine = LLMEngine(model, 64, block_size)
    for n in (5, 9, 17, 30):
        engine.add_request(list(range(3, 3 + n)), 8)
    engine.step()                         # prefill
    engine.step()                         # a first decode step
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.step()
    return sum(1 for e in prof.events() if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def run_benchmark(model, work: Workload, args, device: torch.device,
                  save: Callable[[dict], None] = lambda bench: None) -> dict:
    """Each method on the same workload, one after another; `save` gets the partial results after each."""
    quiet = args.quiet
    num_blocks = args.num_blocks or num_blocks_for(model, args.kv_cache_gib, args.block_size)
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    total_out = sum(work.max_new_tokens)
    # Warm-up (kernel selection, allocator, first-call overheads), reported separately.
    warm = make_workload(2, (8, 16), (4, 4), model.config.vocab_size, args.seed + 1)
    _, warm_engine_s = timed(lambda: LLMEngine(model, 64, args.block_size).generate(warm.prompts, warm.max_new_tokens), device)
    _, warm_hf_s = timed(lambda: hf_generate(model, warm.prompts, 4, pad), device)
    rows: dict[str, dict] = {}
    bench = {"workload": work.description, "total_output_tokens": total_out,
             "total_prompt_tokens": sum(map(len, work.prompts)), "num_blocks": num_blocks,
             "block_size": args.block_size, "max_num_seqs": args.max_num_seqs,
             "warmup_seconds": {"engine": warm_engine_s, "transformers": warm_hf_s},
             "ops_per_decode_step": ops_per_decode_step(model, args.block_size),
             "num_layers": model.config.num_hidden_layers, "throughput": rows}

    def add(name: str, tokens: int, seconds: float, **extra) -> None:
        rows[name] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, **extra}
        base = next(iter(rows.values()))["tokens_per_s"]        # the continuous engine comes first
        for row in rows.values():
            row["fraction_of_paged_engine"] = row["tokens_per_s"] / base
        print(f"{name}: {tokens / seconds:.1f} tokens/s ({seconds:.1f} s)", flush=True)
        save(bench)

    engine, seconds = run_engine(model, work, args, "continuous", num_blocks, quiet)
    bench["memory"] = memory_summary(engine, kv_bytes_per_token_of(model), args.max_model_len, num_blocks,
                                     args.block_size)
    add("paged engine, continuous batching", total_out, seconds, steps=len(engine.stats),
        preemptions=engine.scheduler.num_preemptions)
    del engine                            # free its KV pool before the next engine allocates one
    engine, seconds = run_engine(model, work, args, "static", num_blocks, quiet)
    add("paged engine, static batching", total_out, seconds, steps=len(engine.stats),
        preemptions=engine.scheduler.num_preemptions)
    del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()          # the transformers baselines get the pool's memory back
    if args.hf_batch_size:
        with progress_bar(total_out, "transformers padded", quiet) as bar:
            _, seconds = timed(lambda: hf_padded_batches(model, work.prompts, work.max_new_tokens,
                                                         args.hf_batch_size, pad, bar), device)
        add(f"transformers generate, padded batches of {args.hf_batch_size}", total_out, seconds)
    if args.hf_single:
        k = min(args.hf_single, len(work.prompts))
        sub_out = sum(work.max_new_tokens[:k])
        with progress_bar(sub_out, "transformers one at a time", quiet) as bar:
            _, seconds = timed(lambda: hf_padded_batches(model, work.prompts[:k], work.max_new_tokens[:k], 1, pad, bar),
                               device)
        name = "transformers generate, one request at a time"
        add(name + (f" (first {k} requests)" if k < len(work.prompts) else ""), sub_out, seconds, requests_measured=k)
    return bench


# --------------------------------------------------------------------------- results files

def hardware_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    return platform.processor() or platform.machine()


def versions() -> dict:
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def markdown_table(result: dict) -> str:
    lines = []
    if "bench" in result:
        b = result["bench"]
        lines += [f"Workload: {b['workload']}; model {result['model']} ({result['dtype']}) on {result['hardware']}; "
                  f"block size {b['block_size']}, {b['num_blocks']} blocks, at most {b['max_num_seqs']} running.", "",
                  "| method | output tokens | seconds | tokens/s | × paged engine |", "| --- | ---: | ---: | ---: | ---: |"]
        for name, row in b["throughput"].items():
            lines.append(f"| {name} | {row['tokens']} | {row['seconds']:.2f} | {row['tokens_per_s']:.1f} | "
                         f"{row['fraction_of_paged_engine']:.3f} |")
        if "ops_per_decode_step" in b:
            lines += ["", f"One decode step issues {b['ops_per_decode_step']} PyTorch operator calls "
                          f"({b['ops_per_decode_step'] / b['num_layers']:.0f} per layer, {b['num_layers']} layers), "
                          "each with its own host-side cost in eager mode."]
        m = b["memory"]
        lines += ["", "| KV memory (continuous run) | paged blocks | pre-allocated to max length |",
                  "| --- | ---: | ---: |",
                  f"| slots reserved at the peak ({m['peak_running']} running, {m['peak_tokens_stored']} tokens stored) | "
                  f"{m['peak_paged_slots_reserved']} | {m['peak_prealloc_slots_reserved']} (max length {m['max_model_len']}) |",
                  f"| tokens stored / slots reserved, mean over steps | {m['mean_paged_utilization']:.1%} | "
                  f"{m['mean_prealloc_utilization']:.1%} |",
                  f"| requests the pool of {m['pool_tokens']} slots can hold at once | {m['peak_running']} (measured peak) | "
                  f"{m['prealloc_max_concurrency_in_pool']} |"]
    if "checks" in result:
        c = result["checks"]
        lines += ["", "| check (greedy tokens) | result |", "| --- | --- |",
                  f"| paged (shuffled blocks, NaN in unused slots) = contiguous cache | {c['paged_equals_contiguous']} |",
                  f"| contiguous cache = transformers generate | {c['contiguous_equals_transformers']} |",
                  f"| preemption by recompute ({c['preemption']['num_preemptions']} in a pool of {c['preemption']['num_blocks']} blocks) | "
                  f"{c['preemption']['tokens_identical']} |",
                  f"| prefix caching ({c['prefix_caching']['prefix_hit_tokens']} prompt tokens reused) | "
                  f"{c['prefix_caching']['tokens_identical']} |",
                  f"| fork with copy-on-write (blocks copied: {c['fork_copy_on_write']['cow_copies']}) | "
                  f"{c['fork_copy_on_write']['tokens_identical']} |"]
    return "\n".join(lines).strip() + "\n"


def plot_memory(memory: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = memory["series"]
    steps = range(len(series))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(steps, [r * memory["max_model_len"] for r, _, _ in series], label="pre-allocated to max length")
    ax.plot(steps, [s for _, _, s in series], label="paged: slots in allocated blocks")
    ax.plot(steps, [t for _, t, _ in series], "--", label="tokens actually stored")
    ax.axhline(memory["pool_tokens"], color="grey", lw=0.8, label="pool size")
    ax.set_xlabel("engine step")
    ax.set_ylabel("KV-cache slots (tokens)")
    ax.set_title("KV memory: paged blocks vs per-request pre-allocation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(result: dict, json_path: Path) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    json_path.with_suffix(".md").write_text(markdown_table(result))
    if "bench" in result:
        plot_memory(result["bench"]["memory"], json_path.with_suffix(".png"))


# --------------------------------------------------------------------------- command line

def check_prompts(model_path: str, random_weights: str | None, vocab_size: int, count: int, seed: int) -> list[list[int]]:
    """Real sentences for a real model (tokenized), random ids for random weights; lengths differ."""
    texts = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.",
             "A list of the planets of the solar system, in order from the Sun:",
             "Paged attention stores the key-value cache in fixed-size blocks, so that",
             "Once upon a time, in a small village by the sea, there lived",
             "The three primary colours are", "To make a cup of tea, first",
             "In 1969, the first humans to walk on the Moon were"]
    if random_weights:
        rng = random.Random(seed)
        return [[rng.randrange(3, vocab_size) for _ in range(5 + 7 * i)] for i in range(count)]
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_path)
    return [tok(texts[i % len(texts)])["input_ids"] for i in range(count)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("Model")
    g.add_argument("--model", default=DEFAULT_MODEL, help="Llama-architecture model: hub id or local folder")
    g.add_argument("--random-weights", choices=sorted(RANDOM_SHAPES), default=None,
                   help="ignore --model and build this shape with random weights on the device (speed runs)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to run")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights and KV cache dtype (auto: float32 on CPU, bfloat16 on CUDA)")
    g.add_argument("--seed", type=int, default=0, help="seed for weights, workload and block shuffling")
    g = p.add_argument_group("Engine")
    g.add_argument("--block-size", type=int, default=16, help="token slots per KV-cache block (BS)")
    g.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV pool size in GiB (sets the number of blocks)")
    g.add_argument("--num-blocks", type=int, default=0, help="KV pool size in blocks (overrides --kv-cache-gib)")
    g.add_argument("--max-num-seqs", type=int, default=64, help="most sequences running at once")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048, help="prefill token budget of one step")
    g.add_argument("--max-model-len", type=int, default=2048,
                   help="the length a per-request pre-allocating server would reserve (memory comparison)")
    g = p.add_argument_group("Checks and benchmark")
    g.add_argument("--check-prompts", type=int, default=6, help="prompts for the identical-token checks (0: skip)")
    g.add_argument("--check-new-tokens", type=int, default=24, help="greedy tokens per prompt in the checks")
    g.add_argument("--num-requests", type=int, default=32, help="requests in the benchmark workload (0: skip)")
    g.add_argument("--prompt-len", type=int, nargs=2, default=[16, 128], metavar=("MIN", "MAX"),
                   help="prompt lengths are uniform in [MIN, MAX]")
    g.add_argument("--output-len", type=int, nargs=2, default=[16, 128], metavar=("MIN", "MAX"),
                   help="output lengths are uniform in [MIN, MAX]")
    g.add_argument("--hf-batch-size", type=int, default=16, help="batch size of the padded transformers baseline (0: skip)")
    g.add_argument("--hf-single", type=int, default=8,
                   help="run transformers one request at a time on the first N requests (0: skip)")
    g = p.add_argument_group("Output")
    g.add_argument("--json", type=Path, default=None, help="write results JSON here (and .md, .png beside it)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def validate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    for name in ("prompt_len", "output_len"):
        lo, hi = getattr(args, name)
        if not 1 <= lo <= hi:
            parser.error(f"--{name.replace('_', '-')} needs 1 <= MIN <= MAX")
    if args.block_size < 1 or args.max_num_seqs < 1:
        parser.error("--block-size and --max-num-seqs must be positive")
    if args.prompt_len[1] > args.max_num_batched_tokens:
        parser.error("--max-num-batched-tokens must hold the longest prompt")
    if args.prompt_len[1] + args.output_len[1] > args.max_model_len:
        parser.error("--max-model-len must hold the longest prompt plus the longest output")


def main(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model = load_model(args.model, args.random_weights, device, dtype, args.seed)
    name = f"random {args.random_weights} shape" if args.random_weights else args.model
    result: dict = {"hardware": hardware_name(device), "versions": versions(),
                    "command": "python " + " ".join(sys.argv),
                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "model": name, "device": device.type, "dtype": str(dtype).removeprefix("torch.")}
    if args.check_prompts:
        prompts = check_prompts(args.model, args.random_weights, model.config.vocab_size, args.check_prompts, args.seed)
        eos = model.config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        result["checks"] = run_checks(model, prompts, args.check_new_tokens, eos, args.block_size, args.seed)
        c = result["checks"]
        ok = all([c["paged_equals_contiguous"], c["paged_equals_transformers"], c["preemption"]["tokens_identical"],
                  c["prefix_caching"]["tokens_identical"], c["fork_copy_on_write"]["tokens_identical"]])
        print(f"identical greedy tokens (paged / contiguous / transformers, preemption, prefix caching, fork): {ok}")
    if args.num_requests:
        work = make_workload(args.num_requests, tuple(args.prompt_len), tuple(args.output_len),
                             model.config.vocab_size, args.seed)
        save = (lambda bench: write_results({**result, "bench": bench}, args.json)) if args.json else (lambda bench: None)
        result["bench"] = run_benchmark(model, work, args, device, save)
    if args.json:
        write_results(result, args.json)
    print(markdown_table(result))
    return result


if __name__ == "__main__":
    parser = build_parser()
    arguments = parser.parse_args()
    validate(arguments, parser)
    main(arguments)
