#!/usr/bin/env bash
# What a lent GPU should measure, most valuable first, inside the lent machine's 12 minutes (its
# start-up included): the timeouts below sum to 9¼ minutes (555 s). Each step writes its file under $OUT as
# it finishes, so a run cut short still returns what it did.
#   1. CUDA correctness: fp32 logits and bf16 greedy tokens against transformers, chunked flash
#      prefill, CUDA-graph batches, GQA attention with SDPA's math backend switched off (it fails if a
#      call is not on a flash or memory-efficient kernel) (tests/test_cuda.py), the int4/int8 CUDA kernels
#      (tests/test_quantize.py::test_cuda_kernels), the engine's CUDA-graph step and verify step (speculation); then which SDPA
#      backend attention runs at Phi-3-mini's and -medium's (GQA) shapes (bench/sdpa_backend.py)
#   2. decode at batch 1/16/64 on random Phi-3-mini-128k weights (bf16), against transformers
#   3. the same with --quantize int4 (tinygemm on sm80+)
#   4. the same with the decode step compiled (--compile)
#   5. a 128,000-token prompt served together with 32 short ones on one card (issue 18): its cold
#      first token, then the decode of all 33 rows (the short ones read only their own keys) against
#      the 32 alone, and the peak memory
#
#   bash bench/gpu.sh            # results in $OUT (or /tmp/phi3-gpu): gpu.txt, tests.txt, sdpa.txt, bench*.md
#
# Needs torch with CUDA, transformers, safetensors, tokenizers, jinja2, tqdm, huggingface_hub, psutil,
# pytest (the lent machines' image has them); runs from the checkout without installing it.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/phi3-gpu}
mkdir -p "$OUT"
step() {  # step SECONDS FILE COMMAND...: run with a time limit, output to $OUT/FILE as it comes
    local limit=$1 file=$2
    shift 2
    echo "== $* (limit ${limit}s)" | tee "$OUT/$file"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$file"
    echo "== exit ${PIPESTATUS[0]} (124: timed out)" | tee -a "$OUT/$file"
}
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$OUT/gpu.txt"

step 130 tests.txt python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    tests/test_quantize.py::test_cuda_kernels tests/test_engine.py::test_cuda_graph_step_equals_eager \
    tests/test_speculate.py::test_cuda_graph_verify_step_equals_eager
step 20 sdpa.txt python3 bench/sdpa_backend.py

MODEL="--random --model phi-3-mini-128k-instruct --device cuda --dtype bf16"
DECODE="--batch 1,16,64 --prompt-len 512 --new-tokens 64"
step 120 bench.md python3 -m phi3 bench $MODEL $DECODE --prefill 4096 --compare transformers
step 90 bench-int4.md python3 -m phi3 bench $MODEL $DECODE --prefill 0 --quantize int4
step 105 bench-compiled.md python3 -m phi3 bench $MODEL $DECODE --prefill 0 --compile
step 90 bench-long.md python3 -m phi3 bench $MODEL --batch "" --prefill 0 --prompt-len 200 --new-tokens 16 \
    --long-beside 128000:32
