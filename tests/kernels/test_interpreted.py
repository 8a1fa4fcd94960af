"""On a CUDA machine, the CPU cases of the kernel tests run here, in a subprocess that
hides the GPU and turns the Triton interpreter on (it must be chosen before triton is
imported, so it cannot be switched on inside this process). On a CPU-only machine those
cases run in-process and this test has nothing to add.

Triton 3.6's interpreter cannot run loops under numpy 2.4 or later (the GPU image pairs
triton 3.6 with numpy 2.5): there the test says so and skips, since every kernel loops."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


# A kernel whose loop bound is a tensor: triton 3.6's interpreter turns it into an int
# with int() of a one-element array, which numpy 2.4 and later refuse.
LOOP_PROBE = """
import torch, triton, triton.language as tl

@triton.jit
def count(out_ptr, n):
    for i in range(0, tl.cdiv(n, 1)):
        tl.store(out_ptr + i, i)

out = torch.zeros(3)
count[(1,)](out, 3)
assert out.tolist() == [0.0, 1.0, 2.0], out
"""


def interpreter_loop_failure(env: dict, tmp_path: Path) -> str | None:
    """Why this triton's interpreter cannot run a loop here, or None if it can."""
    probe = tmp_path / "loop_probe.py"
    probe.write_text(LOOP_PROBE)
    done = subprocess.run([sys.executable, str(probe)], env=env, capture_output=True,
                          text=True, timeout=120)
    return None if done.returncode == 0 else done.stderr.strip().splitlines()[-1]


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="without CUDA the CPU cases run in-process under the interpreter")
def test_cpu_cases_pass_under_the_interpreter(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    failure = interpreter_loop_failure(env, tmp_path)
    if failure is not None and "0-dimensional arrays" in failure:
        import numpy
        import triton
        pytest.skip(f"triton {triton.__version__}'s interpreter cannot run a kernel loop "
                    f"under numpy {numpy.__version__} ({failure}); CI runs these cases under "
                    "a triton whose interpreter can")
    assert failure is None, f"the interpreter fails a one-loop kernel: {failure}"
    here = Path(__file__).resolve().parent
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(here), "--deselect", f"{here / 'test_interpreted.py'}"],
                          env=env, cwd=here.parent.parent, capture_output=True, text=True,
                          timeout=1500)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in done.stdout.splitlines()[-1], done.stdout[-2000:]
