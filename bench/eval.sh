#!/usr/bin/env bash
# Whole-command wall time of `phi3 eval` vs lm-eval's `hf` backend on SmolLM2-135M-Instruct (Q4_1 GGUF),
# 3-shot multiple choice (tests/eval_tasks/tiny_mc.yaml), same machine, back to back, REPEAT times.
# Usage: bench/eval.sh [REPEAT] [HF_BATCH_SIZE]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root/tests/eval_tasks"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's phi3
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
repeat=${1:-2}; bs=${2:-16}
gguf=$(python -c "from phi3 import assets; print(assets.fetch(assets.SMOLLM2_GGUF))")
for i in $(seq "$repeat"); do
  t0=$(date +%s.%N)
  python -m phi3 eval --model "$gguf" --tasks tiny_mc --include_path . --num_fewshot 3 >/dev/null 2>&1
  t1=$(date +%s.%N)
  lm_eval --model hf --model_args "pretrained=$(dirname "$gguf"),gguf_file=$(basename "$gguf"),dtype=float32" \
    --device cpu --tasks tiny_mc --include_path . --num_fewshot 3 --batch_size "$bs" >/dev/null 2>&1
  t2=$(date +%s.%N)
  python -c "p=$t1-$t0; h=$t2-$t1; print(f'run $i: phi3 eval {p:.1f} s, lm_eval hf {h:.1f} s, ratio {h/p:.2f}')"
done
