#!/usr/bin/env bash
# The GPU checks, each one prepared command for a machine with one GPU (H100/H200, 80 GB or more),
# run from the repo root with ../shared next to it (or pass MODEL_DIR / TRAIN_FILE):
#   bash benchmarks/gpu_check.sh rollout   # the sampler vs HF generate, and one full step, split by phase (~7 min)
#   bash benchmarks/gpu_check.sh dist      # torchrun --nproc_per_node 1 (FSDP2) vs one process, 2 steps each (~7 min)
# Random-init Qwen2.5-Math-1.5B of the real shape (config + real tokenizer; no weights needed).
set -euo pipefail
MODEL_DIR=${MODEL_DIR:-../shared/models/qwen2.5-math-1.5b}
TRAIN_FILE=${TRAIN_FILE:-../shared/data/math/train.jsonl}
PY=${PY:-python}
step=(--model-dir "$MODEL_DIR" --train-file "$TRAIN_FILE" --max-new-tokens 1024)
case "${1:-}" in
  rollout)
    $PY benchmarks/bench_generate.py --gpu-check --model-dir "$MODEL_DIR" --rows 128 --max-new-tokens 1024 --budget-s 300
    $PY benchmarks/bench_qwen_gpu.py "${step[@]}" --steps 1
    ;;
  dist)
    $PY benchmarks/bench_qwen_gpu.py "${step[@]}" --steps 2 --set rollout.prompts_per_step=16
    $PY -m torch.distributed.run --standalone --nproc_per_node 1 benchmarks/bench_qwen_gpu.py "${step[@]}" --steps 2 \
        --set rollout.prompts_per_step=16
    ;;
  *) echo "usage: bash benchmarks/gpu_check.sh rollout|dist" >&2; exit 2 ;;
esac
