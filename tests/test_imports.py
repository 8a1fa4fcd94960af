"""Import layering: a process loads only what its job needs.

Each check imports one module in a fresh interpreter (this process has long since loaded
everything) and lists what came with it. The engine sits on top (engine -> executor ->
worker -> layers/models -> kernels, ipc); nothing below it may pull it in, and a process
that only exchanges messages over the rings loads neither torch nor tokenizers.
"""

import json
import os
import subprocess
import sys

import pytest

_PROBE = """
import json, sys
import {module}
watched = ("torch", "tokenizers", "shardline.engine")
print(json.dumps(sorted(name for name in sys.modules
                        if any(name == w or name.startswith(w + ".") for w in watched))))
"""


def loaded_with(module: str) -> list[str]:
    """The torch, tokenizers and shardline.engine modules that importing `module` loads."""
    done = subprocess.run([sys.executable, "-c", _PROBE.format(module=module)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_ipc_loads_neither_torch_tokenizers_nor_the_engine():
    assert loaded_with("shardline.ipc") == []


@pytest.mark.parametrize("module", ["shardline.worker.worker", "shardline.layers.linear",
                                    "shardline.executor.base"])
def test_layers_below_the_engine_do_not_import_it(module):
    engine = [name for name in loaded_with(module) if name.startswith("shardline.engine")]
    assert engine == [], f"importing {module} loaded {engine}"


def test_package_face_still_exports_the_engine():
    names = ("LLM", "AsyncLLM", "SamplingParams", "RequestOutput", "CompletionOutput")
    done = subprocess.run(
        [sys.executable, "-c",
         f"import shardline; print([getattr(shardline, n).__name__ for n in {names!r}])"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.strip() == str(list(names))


def test_every_public_name_resolves_and_the_package_is_typed():
    import pathlib

    import shardline

    assert sorted(shardline.__all__) == sorted(shardline._EXPORTS)
    for name in shardline.__all__:
        assert getattr(shardline, name).__name__ == name
    assert (pathlib.Path(shardline.__file__).parent / "py.typed").is_file()


def test_a_model_on_the_cpu_never_loads_triton():
    """Triton serves only CUDA tensors (or the CPU when SHARDLINE_FORCE_TRITON=1), so a CPU
    model skips its import (about 0.2 s of every process start)."""
    probe = ("import sys; from shardline import LLM, SamplingParams; "
             "out = LLM('tiny-llama').generate([[1, 2, 3]], "
             "SamplingParams(max_tokens=3, ignore_eos=True)); "
             "assert len(out[0].outputs[0].token_ids) == 3; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'triton')[:5])")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120, env={k: v for k, v in os.environ.items()
                                            if k != "SHARDLINE_FORCE_TRITON"})
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
