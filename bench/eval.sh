#!/usr/bin/env bash
# Whole-command wall time of `phi3 eval` (prefix cache on, then off) vs lm-eval's `hf` backend on
# SmolLM2-135M-Instruct (Q4_1 GGUF), same machine, the three commands in turn, REPEAT rounds.
# TASK: tiny_mc (tests/eval_tasks: 3-shot multiple choice, 10 questions, answers of several tokens)
# or bench_mc5 (bench/eval_tasks: MMLU's shape, the same 5 examples before each of 100 questions).
# Usage: bench/eval.sh [REPEAT] [HF_BATCH_SIZE] [TASK] [NUM_FEWSHOT]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
repeat=${1:-2}; bs=${2:-16}; task=${3:-tiny_mc}; shots=${4:-3}
case $task in tiny_*) cd "$root/tests/eval_tasks" ;; *) cd "$root/bench/eval_tasks" ;; esac  # data paths are relative
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's phi3
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
gguf=$(python -c "from phi3 import assets; print(assets.fetch(assets.SMOLLM2_GGUF))")
seconds() { local t0; t0=$(date +%s.%N); "$@" >/dev/null 2>&1; python -c "import time; print(f'{time.time() - $t0:.1f}')"; }
for i in $(seq "$repeat"); do
  on=$(seconds python -m phi3 eval --model "$gguf" --tasks "$task" --include_path . --num_fewshot "$shots")
  off=$(seconds python -m phi3 eval --model "$gguf" --tasks "$task" --include_path . --num_fewshot "$shots" --no-prefix-cache)
  hf=$(seconds lm_eval --model hf --model_args "pretrained=$(dirname "$gguf"),gguf_file=$(basename "$gguf"),dtype=float32" \
    --device cpu --tasks "$task" --include_path . --num_fewshot "$shots" --batch_size "$bs")
  python -c "print(f'run $i: phi3 eval {$on} s (no prefix cache {$off} s), lm_eval hf {$hf} s, hf/phi3 {$hf/$on:.2f}, off/on {$off/$on:.2f}')"
done
