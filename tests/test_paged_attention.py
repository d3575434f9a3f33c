"""paged_attention.py: the paged engine computes what a contiguous cache computes, and leaks nothing.

Invariances, each compared inside the test:
* paged attention through a SHUFFLED block table equals plain attention over contiguous K/V
  (torch's scaled_dot_product_attention), with NaN in every unused cache slot, odd shapes,
  decode and prefill;
* the engine's greedy tokens equal transformers' greedy `generate` for each request, with
  requests of different lengths, a shared prefix (prefix-cache hits) and a KV pool so small
  that sequences are preempted and recomputed;
* the block manager's invariants over a random run of allocate / append / free: reference
  counts equal the block tables that hold a block, the free list holds exactly the unreferenced
  blocks, nothing leaks, and prefix-cache hits share blocks.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import ACCEL_EXAMPLES, assert_refusal, assert_results_header, import_example, run_bench, run_script
from tolerances import PAGED_FP32_ATOL

SCRIPT = ACCEL_EXAMPLES / "paged_attention.py"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def pa():
    return import_example(SCRIPT)


@pytest.mark.parametrize("is_prefill", [False, True])
def test_paged_equals_contiguous_under_shuffled_blocks_with_nan(pa, is_prefill: bool) -> None:
    torch.manual_seed(0)
    H, Hkv, D, BS = 6, 2, 59, 5                 # odd head dim and block size
    context = [13, 1, 7, 20]                    # tokens of each sequence after this step
    query = [4, 1, 7, 3] if is_prefill else [1] * len(context)
    NB = sum(math.ceil(c / BS) for c in context) + 3
    order = list(range(NB))
    random.Random(0).shuffle(order)             # physical blocks in random order
    k_cache = torch.full((NB, BS, Hkv, D), float("nan"))   # NaN in every slot not written below
    v_cache = torch.full((NB, BS, Hkv, D), float("nan"))
    tables, ks, vs, used = [], [], [], 0
    for c in context:
        n = math.ceil(c / BS)
        tables.append(order[used:used + n])
        used += n
        k, v = torch.randn(c, Hkv, D), torch.randn(c, Hkv, D)
        slots = torch.tensor([tables[-1][p // BS] * BS + p % BS for p in range(c)])
        k_cache.view(-1, Hkv, D)[slots], v_cache.view(-1, Hkv, D)[slots] = k, v
        ks.append(k)
        vs.append(v)
    mb = max(map(len, tables))
    meta = pa.StepMeta(torch.empty(0, dtype=torch.long),
                       torch.tensor([t + [0] * (mb - len(t)) for t in tables]), context, query)
    q = torch.randn(sum(query), H, D)
    out = pa.paged_attention(q, k_cache, v_cache, meta)
    refs, start = [], 0
    for c, t, k, v in zip(context, query, ks, vs):   # contiguous K/V, the library's attention
        mask = torch.arange(c - t, c)[:, None] >= torch.arange(c)[None]
        refs.append(F.scaled_dot_product_attention(
            q[start:start + t].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
            attn_mask=mask, enable_gqa=True).transpose(0, 1))
        start += t
    ref = torch.cat(refs)
    diff = (out - ref).abs()
    print(f"max diff {diff.max():.2e}, mean {diff.mean():.2e}")
    assert not out.isnan().any(), "NaN from an unused slot leaked into the output"
    assert diff.max().item() <= PAGED_FP32_ATOL


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy generate for one request, exactly n tokens (no end token)."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_engine_equals_transformers_generate_under_preemption(pa, tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    rng = random.Random(0)
    shared = [rng.randrange(3, 500) for _ in range(9)]          # a prefix of two full blocks of 4
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (3, 11, 6, 17)]
    prompts += [shared + [rng.randrange(3, 500) for _ in range(n)] for n in (2, 5)]
    new_tokens = [9, 4, 12, 7, 10, 6]
    BS = 4
    # A pool that holds any one request but not all of them as they grow: preemption.
    num_blocks = max(math.ceil((len(p) + n) / BS) for p, n in zip(prompts, new_tokens)) + 2
    engine = pa.LLMEngine(model, num_blocks, BS, max_num_seqs=4, fill=float("nan"))
    ours = engine.generate(prompts, new_tokens)
    expected = [hf_greedy(model, p, n) for p, n in zip(prompts, new_tokens)]
    print(f"preemptions {engine.scheduler.num_preemptions}, prefix hit tokens "
          f"{engine.block_manager.num_prefix_hit_tokens}")
    assert engine.scheduler.num_preemptions > 0, "the small pool should have forced preemption"
    assert engine.block_manager.num_prefix_hit_tokens > 0, "the shared prefix should have hit the cache"
    for i, (a, b) in enumerate(zip(ours, expected)):
        assert a == b, (i, a, b)
    assert sorted(engine.block_manager.free_block_ids) == list(range(num_blocks)), "blocks leaked"


def check_invariants(bm, live: list, num_blocks: int) -> None:
    owners = [0] * num_blocks
    for seq in live:
        for block in seq.block_table:
            owners[block] += 1
    free = list(bm.free_block_ids)
    assert len(free) == len(set(free)), "a block is twice in the free list"
    assert bm.ref_counts == owners, "reference counts differ from the block tables holding them"
    assert set(free) == {b for b in range(num_blocks) if owners[b] == 0}, "leaked or double-used block"


def test_block_manager_invariants_under_random_operations(pa) -> None:
    rng = random.Random(1)
    BS, NB = 4, 40
    bm = pa.BlockManager(NB, BS, prefix_caching=True)
    live: list = []
    shared_seen = False
    for _ in range(500):
        action = rng.random()
        if action < 0.3:
            prompt = [rng.randrange(2) for _ in range(rng.randint(1, 13))]   # few values: prefix hits
            seq = pa.Sequence(prompt, len(prompt), 99)
            if bm.can_allocate(seq):
                bm.allocate(seq)
                live.append(seq)
        elif action < 0.8 and live:
            seq = rng.choice(live)
            seq.token_ids.append(rng.randrange(2))
            if bm.can_append(seq):
                bm.append_slot(seq)
            else:
                seq.token_ids.pop()
        elif live:
            bm.free(live.pop(rng.randrange(len(live))))
        check_invariants(bm, live, NB)
        for seq in live:
            assert len(seq.block_table) == seq.num_blocks(BS)     # every token has a slot
        shared_seen |= any(count > 1 for count in bm.ref_counts)
    for seq in live:
        bm.free(seq)
    check_invariants(bm, [], NB)
    assert bm.num_prefix_hit_tokens > 0 and shared_seen, "prefix-cache hits should share blocks"


def test_script_runs_on_the_tiny_model(tiny_model: Path) -> None:
    proc = run_script(SCRIPT, "--model", tiny_model, "--num-requests", "3", "--num-blocks", "16",
                      env=ONE_THREAD)
    assert "| paged engine, continuous batching |" in proc.stdout, proc.stdout
    assert "| transformers generate, one request at a time |" in proc.stdout


def test_refusals(tmp_path: Path, tiny_model: Path) -> None:
    assert_refusal(run_script(SCRIPT, "--model", tmp_path / "missing", check=False), "--model")
    if not torch.cuda.is_available():
        assert_refusal(run_script(SCRIPT, "--model", tiny_model, "--device", "cuda", check=False), "cuda")
    for flag in ("--num-blocks", "--block-size", "--num-requests", "--max-num-seqs"):
        proc = run_script(SCRIPT, flag, "0", check=False)
        assert proc.returncode == 2 and "must be positive" in proc.stderr, (flag, proc.stderr)


def test_bench_serving_cpu_preset(tiny_model: Path, tmp_path: Path) -> None:
    result = run_bench("serving", "cpu", tmp_path, model=tiny_model)
    assert_results_header(result)
    rows = {row["method"]: row for row in result["rows"]}
    print({name: round(row["tokens_per_s"], 1) for name, row in rows.items()})
    assert {"paged engine, continuous batching", "paged engine, static batches",
            "transformers generate, padded batches"} <= set(rows)
    for row in rows.values():
        assert row["output_tokens"] == result["workload"]["output_tokens"] or row.get("requests_measured")
        assert row["tokens_per_s"] > 0 and row["seconds"]["median"] > 0
        assert row["kv_slots_peak"] > 0
    series, BS = result["memory"]["series"], result["settings"]["block_size"]
    for running, stored, reserved in zip(series["running"], series["tokens_stored"], series["slots_reserved"]):
        assert reserved <= stored + running * BS, "paged waste is under one block per sequence"
    for suffix in (".json", ".md", ".en.md", ".png", "-memory.png"):
        assert (tmp_path / f"serving-cpu{suffix}").exists(), suffix


@pytest.mark.gpu
def test_engine_on_gpu_equals_cpu(pa, tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    prompts, n = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14]], [6, 9]
    cpu = pa.LLMEngine(model, 16, 4).generate(prompts, n)
    gpu = pa.LLMEngine(model.cuda(), 16, 4).generate(prompts, n)
    assert cpu == gpu
