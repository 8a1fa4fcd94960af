"""On a CUDA machine, the CPU cases of the kernel tests run here, in a subprocess that
hides the GPU and turns the Triton interpreter on (it must be chosen before triton is
imported, so it cannot be switched on inside this process). On a CPU-only machine those
cases run in-process and this test has nothing to add."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="without CUDA the CPU cases run in-process under the interpreter")
def test_cpu_cases_pass_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    here = Path(__file__).resolve().parent
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(here), "--deselect", f"{here / 'test_interpreted.py'}"],
                          env=env, cwd=here.parent.parent, capture_output=True, text=True,
                          timeout=1500)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in done.stdout.splitlines()[-1], done.stdout[-2000:]
