#!/usr/bin/env bash
# The GPU acceptance check of issue 17 in one command, sized for one call of at most 8 minutes on a lent single GPU
# and runnable as is by a user with GPUs. From the repository root (on a machine whose image lacks lightning_tina's
# pure-Python dependencies, with the wheels of bench/gpu_wheels.txt in .whl/: `make gpu-wheels` here, then carry .whl):
#
#     bash bench/gpu_check.sh          # acceptance: logs, JSON lines and summary.txt under $OUT (default /tmp/gpu_check)
#     bash bench/gpu_check.sh perf     # the performance benches instead (vs_trl, logprob_memory, step_breakdown)
#
# Acceptance, in order (each step's log is $OUT/<name>.log; summary.txt says what ran, what was skipped and why):
# 1. plan: `python -m lightning_tina.plan` for every recipe in configs/tina at this card's memory (and at 48 GB).
# 2. gpu_tests: `pytest -m gpu tests/test_gpu.py -rs`: the CUDA code paths; the planner's estimate against the
#    measured peak of a random-weight 1.5B-shaped model at Tina's lengths (JSON plan_vs_measured); a 3-step fit with
#    the vLLM engine when vLLM's CUDA build is importable (freshness, sleep and wake, memory before each wake: JSON
#    vllm_fit); with two visible GPUs, one engine per GPU (nvidia-smi). Skipped tests name their reason.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
MODE=${1:-acceptance}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD" TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PWD"
fi
{
    date -u
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers, peft, lightning; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__, 'lightning', lightning.__version__)"
    python3 -c "import vllm; from vllm.platforms import current_platform as p; print('vllm', vllm.__version__, 'cuda build' if p.is_cuda() else 'not the CUDA build')" 2>/dev/null \
        || echo "vllm: not importable (the 3-step vLLM fit and the 2-GPU check will be skipped)"
} 2>&1 | tee "$OUT/machine.txt"
SUMMARY="$OUT/summary.txt"
echo "gpu_check $MODE, $(date -u)" >"$SUMMARY"

run() {  # name, seconds, command...: the log goes to $OUT/name.log, the summary lines to stdout and summary.txt
    local name=$1 limit=$2 rc
    shift 2
    echo "== $name: $* (at most $limit s)"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    local verdict="ran, exit $rc"
    [ $rc -eq 124 ] && verdict="TIMED OUT after $limit s"
    echo "$name: $verdict in $((SECONDS - t0)) s" | tee -a "$SUMMARY"
    grep -E '^JSON |=> |^(SKIPPED|FAILED|ERROR)|passed|failed|ratio|tokens/s|peak|Error' "$OUT/$name.log" | tail -n 40 \
        | tee -a "$SUMMARY"
}

if [ "$MODE" = perf ]; then
    # The performance benches (under 10 minutes on an H100 by design): training tokens/s and CUDA peak against TRL,
    # the chunked log-softmax at Qwen's vocabulary, and what trimming each micro-batch's padding saves.
    python3 -c "import trl" 2>/dev/null || echo "trl missing: vs_trl.py will fail; run make gpu-wheels and carry .whl"
    run vs_trl 270 python3 bench/vs_trl.py --gpu
    run logprob_memory 80 python3 bench/logprob_memory.py --gpu --chunk-tokens 1024 4096
    run step_trimmed 50 python3 bench/step_breakdown.py --gpu --synthetic --length-spread 0.75 --steps 2
    run step_padded 50 python3 bench/step_breakdown.py --gpu --synthetic --length-spread 0.75 --steps 2 --no-trim-padding
    # issue 21 at Tina's lengths: count-based micro-batches against packing by a token budget (sdpa with an explicit
    # block mask on CUDA; flash_attention_2, if installed, takes cu_seq_lens instead), 0.9 length spread
    run step_spread_count 60 python3 bench/step_breakdown.py --gpu --synthetic --length-spread 0.9 --steps 2 --micro-batch-tokens 0
    run step_spread_packed 60 python3 bench/step_breakdown.py --gpu --synthetic --length-spread 0.9 --steps 2 --micro-batch-tokens 16384
    exit 0
fi

CARD_GB=$(python3 -c "import torch; print(round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1))" 2>/dev/null || echo 48)
run plan 60 python3 -m lightning_tina.plan --gpu-memory "$CARD_GB" $(printf -- '--config %s ' configs/tina/[!b]*.yaml)
run plan_l40s 60 python3 -m lightning_tina.plan --gpu-memory 48 $(printf -- '--config %s ' configs/tina/[!b]*.yaml)
run gpu_tests 400 python3 -m pytest -m gpu tests/test_gpu.py -q -rs -s -p no:cacheprovider
{
    echo "-- what was skipped and why (pytest -rs):"
    grep -E '^SKIPPED' "$OUT/gpu_tests.log" || echo "nothing skipped"
    echo "-- GPUs visible: $(nvidia-smi -L 2>/dev/null | wc -l)"
} | tee -a "$SUMMARY"
