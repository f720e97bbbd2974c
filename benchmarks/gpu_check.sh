#!/usr/bin/env bash
# The GPU check: one call, the first thing to run on a GPU (one H100/H200; 6-8 minutes on an H100, estimated).
#   bash benchmarks/gpu_check.sh          # Qwen2.5-Math-1.5B's shape, random init (config + real tokenizer)
#   bash benchmarks/gpu_check.sh --cpu    # the same script on CPU with a 2-layer model (a few minutes)
# Parts (benchmarks/gpu_check.py): rollout (HF generate vs the sampler eager vs compiled, temperature
# change, long prompt, log-probs vs the trainer's pass), train (two train_steps of configs/qwen1.5b.yaml
# by phase), torchrun (the same, one rank, FSDP2 over NCCL, two steps). Each part's tables go to
# benchmarks/results/gpu_check_<date>.md (--cpu: gpu_check_<date>_cpu.md; or $GPU_CHECK_OUT); a failing
# part is named and the script exits 1 after running the others.
# Run from anywhere; the model and data default to ../shared next to the repo (MODEL_DIR, TRAIN_FILE).
# Sizes (GPU defaults): GPU_CHECK_ROWS=128 GPU_CHECK_NEW_TOKENS=512 (rollout), GPU_CHECK_STEP_TOKENS=512
# (train; torchrun 256). The times above are estimates until the first run replaces them.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -n "${PY:-}" ]; then :; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
cpu=()
suffix=""
case "${1:-}" in
  "") ;;
  --cpu) cpu=(--cpu); suffix="_cpu" ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--cpu]" >&2; exit 2 ;;
esac
out=${GPU_CHECK_OUT:-benchmarks/results/gpu_check_$(date +%Y-%m-%d)${suffix}.md}
mkdir -p "$(dirname "$out")"
limit=${PART_TIMEOUT_S:-420}  # one part stuck (a hung collective) must not hold the whole call
{
  echo "# GPU check $(date '+%Y-%m-%d %H:%M')${cpu:+ (--cpu)}"
  echo
  echo "\`bash benchmarks/gpu_check.sh ${cpu[*]:-}\` at commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
} > "$out"

failed=()
t_all=$SECONDS
part() {  # part NAME COMMAND...: run it, time it, remember a failure
  local name=$1 t0=$SECONDS
  shift
  echo "== $name: $*"
  if timeout "$limit" "$@"; then
    echo "== $name: passed ($((SECONDS - t0)) s)"
    echo -e "\n$name: passed in $((SECONDS - t0)) s" >> "$out"
  else
    echo "== $name: FAILED ($((SECONDS - t0)) s)" >&2
    echo -e "\n**$name: FAILED** after $((SECONDS - t0)) s (see the console output)" >> "$out"
    failed+=("$name")
  fi
}
part rollout "$PY" benchmarks/gpu_check.py rollout --out "$out" "${cpu[@]}"
part train "$PY" benchmarks/gpu_check.py train --out "$out" "${cpu[@]}"
part torchrun "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 \
    benchmarks/gpu_check.py train --dist --out "$out" "${cpu[@]}"

echo -e "\ntotal: $((SECONDS - t_all)) s" >> "$out"
echo "tables written to $out ($((SECONDS - t_all)) s)"
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "gpu_check: all parts passed"
