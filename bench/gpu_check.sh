#!/usr/bin/env bash
# The GPU half of the performance benches in one command, sized for one call on a lent GPU machine (under 9 minutes
# on an H100 by design; not yet run on one). From the repository root, with the wheels of bench/gpu_wheels.txt in
# .whl/ (`make gpu-wheels` here, then carry .whl):
#
#     bash bench/gpu_check.sh          # logs and JSON lines under $OUT (default /tmp/gpu_check)
#
# 0. pytest -m gpu (tests/test_gpu.py): the CUDA code paths, including a whole fit through the CLI.
# 1. vs_trl.py --gpu: training tokens/s and CUDA peak of lightning_tina against TRL's compute_loss, 1.5B shape,
#    bf16, gradient checkpointing, 512 + 3,584 tokens (common.GPU_SETTINGS), alternating runs.
# 2. logprob_memory.py --gpu: the chunked log-softmax at Qwen's vocabulary, 8 x 4,096 tokens, chunk 1024 and 4096.
# 3. step_breakdown.py --gpu --synthetic --length-spread 0.75, with and without --no-trim-padding: what running each
#    micro-batch at its own longest completion saves at Tina's shape (completions of 896-3,584 tokens).
# No vLLM: its CUDA wheel is far above what a call may carry, so generation is not measured here.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PWD"
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers, peft, lightning; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'lightning', lightning.__version__)"
    python3 -c "import trl; print('trl', trl.__version__)" || echo "trl missing: vs_trl.py will fail; run make gpu-wheels and carry .whl"
} 2>&1 | tee "$OUT/machine.txt"

run() {  # name, seconds, script and its options: the log goes to $OUT/name.log, the summary lines to stdout
    local name=$1 limit=$2
    shift 2
    echo "== $name: python3 $* (at most $limit s)"
    timeout "$limit" python3 "$@" >"$OUT/$name.log" 2>&1
    echo "   exit $?"
    grep -E '^JSON |ratio|tokens/s|peak|passed|failed|Error' "$OUT/$name.log" | tail -n 12
}
run gpu_tests 100 -m pytest -m gpu tests/test_gpu.py -q -rs
run vs_trl 270 bench/vs_trl.py --gpu
run logprob_memory 80 bench/logprob_memory.py --gpu --chunk-tokens 1024 4096
run step_trimmed 50 bench/step_breakdown.py --gpu --synthetic --length-spread 0.75 --steps 2
run step_padded 50 bench/step_breakdown.py --gpu --synthetic --length-spread 0.75 --steps 2 --no-trim-padding
