#!/usr/bin/env bash
# Everything the engine issue measures on a GPU, in one run of about 6-8 minutes on an H100/H200:
# CUDA correctness (logits against transformers, chunked flash prefill, CUDA-graph batches), then
# decode at batch 1/16/64 and 4,096-token prefill against transformers on the same random
# Phi-3-mini-128k weights (bf16), the same with the decode step compiled, and a 130,000-token prompt.
#
#   bash bench/gpu.sh            # results in $OUT (or /tmp/phi3-gpu): tests.txt, bench*.md
#
# Needs torch with CUDA, transformers, safetensors, tokenizers, jinja2, tqdm, huggingface_hub (the
# lent machines' image has them); runs from the checkout without installing it.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/phi3-gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

# 1. correctness on CUDA (fp32, tiny models, against transformers)
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_engine.py 2>&1 | tail -15 | tee "$OUT/tests.txt"

MODEL="--random --model phi-3-mini-128k-instruct --device cuda --dtype bf16"
# 2. decode at batch 1/16/64 (512-token prompts, 128 new) and a 4,096-token prefill, with transformers
timeout 300 python3 -m phi3 bench $MODEL --batch 1,16,64 --prefill 4096 --compare transformers 2>&1 | tee "$OUT/bench.md"
# 3. the same decode with the step compiled (fused small ops) inside the CUDA graphs
timeout 300 python3 -m phi3 bench $MODEL --batch 1,16,64 --prefill 0 --compile 2>&1 | tee "$OUT/bench-compiled.md"
# 4. long context: a 130,000-token prompt's first token and decode at that length
timeout 300 python3 -m phi3 bench $MODEL --batch 1 --prompt-len 130000 --new-tokens 16 --prefill 130000 2>&1 | tee "$OUT/bench-long.md"
