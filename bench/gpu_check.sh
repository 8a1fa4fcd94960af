#!/usr/bin/env bash
# Everything owed on a GPU, in order of value, each stage time-boxed and logged into
# OUT_DIR as it goes (a stage cut off at its limit still leaves its log and any JSON it
# wrote). The whole run keeps within GPU_CHECK_BUDGET seconds (default 540, 9 minutes):
# a stage's limit shrinks to what is left, and a stage with under 20 s left is skipped.
#
#   bash bench/gpu_check.sh OUT_DIR
#
# The tune stage writes this GPU's tuned table to OUT_DIR/<gpu>.json; commit it under
# kernels/tuned/. The startup stage times engine starts with that table, startup-untuned
# one start without any.
set -u
OUT=${1:?usage: bench/gpu_check.sh OUT_DIR}
BUDGET=${GPU_CHECK_BUDGET:-540}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."

stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt 20 ]; then
        echo "== $name skipped: ${left}s of the ${BUDGET}s budget left" | tee -a "$OUT/stages.txt"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local started=$SECONDS
    echo "== $name (limit ${limit}s)" | tee -a "$OUT/stages.txt"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "   rc=$rc after $((SECONDS - started))s" | tee -a "$OUT/stages.txt"
    tail -3 "$OUT/$name.log" | sed 's/^/   /' | tee -a "$OUT/stages.txt"
}

tuned_table() {  # the table the tune stage wrote, else "packaged"
    local found
    found=$(ls "$OUT"/nvidia-*.json 2>/dev/null | head -1)
    echo "${found:-packaged}"
}

table_env() {  # for `env`: the tune stage's table as SHARDLINE_TUNED_TABLE, if it wrote one
    local table
    table=$(tuned_table)
    [ "$table" = packaged ] || echo "SHARDLINE_TUNED_TABLE=$table"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'triton', triton.__version__)"
  git rev-parse HEAD; } > "$OUT/env.txt" 2>&1

stage install 120 python -m pip install --no-build-isolation --no-deps -e .
# No table yet and no autotuning: each kernel key runs its first candidate config, which
# keeps the stage within its limit (the tune stage times them).
stage tests-cuda 150 python -m pytest -q -rf --timeout 120 \
    tests/kernels tests/models/test_parity_kernels.py tests/models/test_parity_bf16.py \
    tests/worker tests/engine/test_llm_e2e.py tests/engine/test_async_scheduling.py \
    --deselect tests/kernels/test_interpreted.py
# Issue 8's one-GPU run (the engine over the multi-process executor in bf16, and NCCL's
# collectives in a grid of one), early: the stages before it may use the whole budget.
stage mp-nccl 60 python bench/gpu_mp_check.py --out-dir "$OUT"
stage tune 150 python bench/tune.py --out-dir "$OUT" --time-limit 90
stage startup 150 python bench/startup.py --table "$(tuned_table)" --runs 1 --timeout 60 \
    --out "$OUT/startup.json"
stage e2e-decode 120 env $(table_env) python bench/e2e_decode.py --out-dir "$OUT"
stage e2e-decode-in-order 90 env $(table_env) python bench/e2e_decode.py --async-scheduling off --runs 3 \
    --out-dir "$OUT/in_order"
stage kernels 100 env $(table_env) python bench/kernels.py --out-dir "$OUT"
stage startup-untuned 100 python bench/startup.py --table none --models small-llama \
    --cases first --runs 1 --timeout 90 --out "$OUT/startup_untuned.json"
# Issue 8's executor target (under 50 us added per step at 2 workers) on a host with a
# core per process; no GPU is used.
stage executor 45 python bench/executor.py --quick --out-dir "$OUT/executor"
stage tests-interpreted 150 python -m pytest -q tests/kernels/test_interpreted.py
echo "done after ${SECONDS}s" >> "$OUT/stages.txt"
