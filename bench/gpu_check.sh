#!/usr/bin/env bash
# Everything owed on a GPU, in order of value, each stage time-boxed and logged into
# OUT_DIR as it goes (a stage cut off at its limit still leaves its log and any JSON it
# wrote). Plan: about 9 minutes in all on an H100/H200 with an empty Triton cache.
#
#   bash bench/gpu_check.sh OUT_DIR
set -u
OUT=${1:?usage: bench/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."

stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    echo "== $name (limit ${limit}s)" | tee -a "$OUT/stages.txt"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "   rc=$rc after $((SECONDS - started))s" | tee -a "$OUT/stages.txt"
    tail -3 "$OUT/$name.log" | sed 's/^/   /' | tee -a "$OUT/stages.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'triton', triton.__version__)"
  git rev-parse HEAD; } > "$OUT/env.txt" 2>&1

stage install 240 pip install --no-build-isolation --no-deps -e .
stage tests-cuda 200 python -m pytest -q -x tests/kernels tests/models/test_parity_kernels.py \
    tests/worker tests/engine/test_llm_e2e.py --deselect tests/kernels/test_interpreted.py
stage mp-nccl 120 python bench/gpu_mp_check.py --out-dir "$OUT"
stage e2e-decode 150 python bench/e2e_decode.py --out-dir "$OUT"
stage kernels 150 python bench/kernels.py --out-dir "$OUT"
stage tests-interpreted 240 python -m pytest -q tests/kernels/test_interpreted.py
echo "done" >> "$OUT/stages.txt"
