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


FIT_PROBE = """
import json, random, sys
import torch, triton, triton.language as tl
from triton.runtime.errors import OutOfResources
from decode_splits import launched_as_pinned, pinned
from shardline.kernels import _config

@triton.jit
def _copy(x_ptr, n, BLOCK: tl.constexpr):
    pass

configs = [triton.Config({"BLOCK": b}) for b in (128, 64, 32, 16)]
kernel = _config.TunedKernel(_copy, configs, ["n"], None)
too_big = set(json.loads(sys.argv[1]))
def launch(args, grid, warmup, kwargs, config):
    if configs.index(config) in too_big:
        raise OutOfResources(294912, 232448, "shared memory")
kernel._launch = launch
rows = []
for config in configs:
    with pinned(kernel, lambda args, kwargs, c=config: c):
        for n in random.sample(range(1, 99), 3):
            kernel.run(torch.empty(n), n, grid=(1,), warmup=False)
        rows.append(launched_as_pinned(kernel, config))
print(json.dumps(rows))
"""


def test_a_pinned_config_that_does_not_fit_is_not_timed_under_its_name():
    """A pinned tile too big for the GPU is replaced by the next candidate at launch; the
    sweep recorded the replacement's time under the pinned tile's name."""
    too_big = random.sample(range(3), random.randint(1, 2))   # the last config always fits
    done = subprocess.run([sys.executable, "-c", FIT_PROBE, json.dumps(too_big)], cwd=BENCH,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout) == [i not in too_big for i in range(4)]
