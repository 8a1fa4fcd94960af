"""bench/decode_splits.py sweeps the split count choose_splits picks on the GPU it runs on,
whatever that count is: the sweep's powers of two need not hold it (3 splits for TP2's
64 x 2048 case on an H100/H200's 132 SMs), and the row of the heuristic is read from the
sweep, so a missing count ended the GPU run with a KeyError after its first case."""

import json
import random
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"

# Run beside the script (as the bench runs): bench/kernels.py must shadow the repo's kernels.
PROBE = """
import json, sys
from _kernel_shapes import FULL, TP_SIZES
from decode_splits import split_counts
from shardline.kernels import attention_decode as a
rows = []
for sms in json.loads(sys.argv[1]):
    for batch, context in FULL.decode:
        for tp in TP_SIZES:
            kv_heads = FULL.kv_heads // tp
            heuristic = a.launched_splits(a.choose_splits(batch, kv_heads, context, sms),
                                          context)
            counts = split_counts(context, heuristic)
            launched = [a.launched_splits(s, context) for s in counts]
            rows.append([sms, batch, context, tp, heuristic, counts, launched])
print(json.dumps(rows))
"""


def test_the_heuristics_split_count_is_swept_on_every_gpu():
    sms = [132, 108, 78] + [random.randint(8, 256) for _ in range(5)]
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(sms)], cwd=BENCH,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout)
    assert len(rows) == len(sms) * 6
    for num_sms, batch, context, tp, heuristic, counts, launched in rows:
        case = f"{num_sms} SMs, TP{tp} {batch} x {context}: {counts}"
        assert heuristic in counts, case
        assert counts == sorted(set(counts)) and counts[0] == 1, case
        # Each count is what a launch asked for it runs, so the rows are labelled right.
        assert launched == counts, case
    assert [3, 9] == [r[4] for r in rows if r[0] == 132 and (r[3], r[1]) in
                      ((2, 64), (1, 8))]
