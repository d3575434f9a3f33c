#!/usr/bin/env bash
# `make results`: re-measure the committed CPU results files on this machine (tens of minutes).
# GPU results (files named *-h100.*, *-h200x2.*) come from the commands recorded inside them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
MODEL=.cache/models/SmolLM2-135M-Instruct
run() { echo "==> $*"; "$PY" "$@"; }
export OMP_NUM_THREADS=1   # the measured CPU results were taken with one thread per process

run inference/quantization/examples/quant_basics.py --model $MODEL --json inference/quantization/results/quant_basics-cpu.json --quiet
run inference/quantization/examples/gguf_example.py --model $MODEL --threads 1 --eval-tokens 4096 --json inference/quantization/results/gguf_example-cpu.json --quiet
run inference/quantization/examples/compare_methods.py --model $MODEL --calib-samples 8 --eval-tokens 4096 \
    --json inference/quantization/results/quality-cpu.json --sweep-json inference/quantization/results/gptq_sweep-cpu.json
run inference/inference-acceleration/examples/kv_cache_optimization.py --model $MODEL --chat \
    --prompt 'Write a short story about a robot who learns to paint.' --max-new-tokens 128 --lengths 64,128,256,512,1024 \
    --threads 1 --warmup 1 --repeats 3 --json inference/inference-acceleration/results/kv_cache_optimization-cpu.json
run inference/inference-acceleration/examples/flash_attention.py --device cpu --threads 1 --lengths 128,256,512,1024,2048 \
    --warmup 1 --repeats 3 --quiet --json inference/inference-acceleration/results/flash_attention-cpu.json
run inference/inference-acceleration/examples/paged_attention.py --model $MODEL --check-prompts 6 --check-new-tokens 24 \
    --num-requests 32 --prompt-len 16 128 --output-len 16 128 --max-num-seqs 16 --hf-batch-size 16 --hf-single 8 \
    --kv-cache-gib 0.25 --max-model-len 1024 --quiet --json inference/inference-acceleration/results/paged_attention-cpu.json
run inference/inference-acceleration/examples/vllm_example.py --model $MODEL --dtype float32 --kv-cache-gib 2 \
    --compare-requests 64 --hf-single 16 --quiet --json inference/inference-acceleration/results/vllm_example-cpu.json
run inference/inference-acceleration/examples/fast_decode.py --model $MODEL --device cpu --threads 1 --batch-sizes 1 \
    --prompt-len 64 --slow-new-tokens 16 --group-size 64 --ppl-tokens 1024 --ppl-context 256 \
    --json inference/inference-acceleration/results/fast_decode-cpu.json
run -m torch.distributed.run --standalone --nproc-per-node 2 inference/inference-acceleration/examples/tensor_parallel.py \
    --model $MODEL --tp-sizes 1,2 --batch-sizes 1,8 --new-tokens 32 --json inference/inference-acceleration/results/tensor_parallel-cpu.json
run tools/effects.py
