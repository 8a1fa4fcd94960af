# Time-boxed stages for bench/gpu_check.sh, sourced by it (and by its tests).
#
# Set before sourcing: OUT (an existing folder: each stage's NAME.log goes there, and a
# line per stage to stages.txt) and BUDGET (seconds for the whole run, counted by bash's
# SECONDS). A stage's limit shrinks to the budget left and a stage with under 20 s left is
# skipped. After each stage, what it started and left running (processes that escaped
# `timeout`'s kill: a test's workers in their own session, say) gets REAP_GRACE_S (15 s)
# to exit, then is killed, so that it holds no GPU memory the next stage needs.

REAP_GRACE_S=${REAP_GRACE_S:-15}
export PYTHONUNBUFFERED=1                        # a stage cut off keeps every line it printed
export PYTEST_FAILURES_FILE="$OUT/failures.txt"  # tests/conftest.py: failures as they happen
# Every process a stage starts inherits this mark, which finds those that outlive it.
RUN_MARK="$$-$RANDOM"
export GPU_CHECK_RUN=$RUN_MARK

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
    tail -3 "$OUT/$name.log" | awk '{ print "   " $0 }' | tee -a "$OUT/stages.txt"
    reap_leftovers
}

leftovers() {  # the stages' processes still alive (not the lookup's own)
    env -u GPU_CHECK_RUN sh -c 'grep -lsz "^GPU_CHECK_RUN=$1\$" /proc/[0-9]*/environ \
        | cut -d/ -f3' sh "$RUN_MARK"
}

reap_leftovers() {  # what a stage left running gets REAP_GRACE_S to exit, then is killed
    local waited=0 pids
    pids=$(leftovers)
    while [ -n "$pids" ] && [ "$waited" -lt "$REAP_GRACE_S" ]; do
        sleep 1
        waited=$((waited + 1))
        pids=$(leftovers)
    done
    if [ -n "$pids" ]; then
        echo "   killed what the stage left running: $(echo $pids)" | tee -a "$OUT/stages.txt"
        kill -9 $pids 2>/dev/null
        sleep 2
    fi
    if command -v nvidia-smi > /dev/null; then
        echo "   GPU memory in use: $(nvidia-smi --query-gpu=memory.used --format=csv,noheader)" \
            | tee -a "$OUT/stages.txt"
    fi
}

xdist() {  # pytest-xdist's options for N processes where it is installed, else none
    python -c "import xdist" 2>/dev/null && echo "-n $1"
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
