"""Shared fixtures. CPU runs use the Triton interpreter, which must be chosen before
triton is first imported, so it is set here, ahead of every test module."""

import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpret_without_overflow_checks() -> None:
    """The Triton interpreter computes an int32 overflow check around each integer add, sub
    and mul, then drops it unless its `debug` option is on (device_assert returns early),
    which it is not here: about a quarter of an interpreted kernel's time bought nothing.
    Off only where the check could not fire anyway; the compiled kernels are unaffected."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import dataclasses

    from triton.runtime import interpreter
    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if (dataclasses.is_dataclass(options) and getattr(options, "sanitize_overflow", False)
            and getattr(options, "debug", True) is False):
        builder.options = dataclasses.replace(options, sanitize_overflow=False)


_interpret_without_overflow_checks()


@pytest.fixture
def fresh_seed() -> int:
    """Seeds torch with a new random seed per test (torch's default seed is fixed), printed
    so that a failure can be replayed."""
    seed = random.SystemRandom().randrange(2**31)
    torch.manual_seed(seed)
    print(f"torch seed {seed}")
    return seed


@pytest.fixture
def rng(fresh_seed) -> random.Random:
    """A Python RNG seeded with the test's printed seed."""
    return random.Random(fresh_seed)


@pytest.fixture(autouse=True)
def _kernel_choice_per_test():
    """The kernels read SHARDLINE_DISABLE_TRITON / SHARDLINE_FORCE_TRITON once per process;
    a test that changes them (then calls reset_triton_choice) leaves its choice behind."""
    yield
    from shardline.kernels.dispatch import reset_triton_choice
    reset_triton_choice()


_COMPILE_SCRIPT = """
import importlib, json, sys
try:
    from shardline.kernels._compile import compile_sm90, cuda_backend_available
except ImportError:
    sys.exit(3)
if not cuda_backend_available():
    sys.exit(3)
module_name, cases = json.loads(sys.argv[1])
module = importlib.import_module(module_name)
for name, types, constexprs in cases:
    compile_sm90(getattr(module, name), types, constexprs)
"""


@pytest.fixture
def compile_for_h100():
    """Compiles Triton kernels for sm_90 in a fresh process (no interpreter, no GPU needed),
    catching what the interpreter lets through: constexpr rules, types, resource limits.

    Call it as compile_for_h100(module, [(kernel_name, arg_types, constexprs), ...]);
    arguments missing from both dicts compile as i32. Skips where triton has no CUDA backend.
    """
    import json
    import subprocess
    import sys

    def compile_kernels(module: str, cases: list[tuple[str, dict, dict]]) -> None:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, json.dumps([module, cases])],
                              env=env, capture_output=True, text=True, timeout=240)
        if done.returncode == 3:
            pytest.skip("triton has no CUDA backend here")
        assert done.returncode == 0, done.stderr[-4000:]
    return compile_kernels


KERNEL_TESTS = os.path.join(os.path.dirname(__file__), "kernels")


def runs_kernels_in_process(item: pytest.Item) -> bool:
    """Whether a kernel test may run in this process: everywhere under the interpreter (a
    CPU-only machine); on a CUDA machine only its CUDA cases, since a compiled kernel cannot
    read CPU tensors. The rest run in tests/kernels/test_interpreted.py's subprocess."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    callspec = getattr(item, "callspec", None)
    return callspec is not None and callspec.params.get("device") == "cuda"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="a CPU case of the Triton kernels: on a CUDA machine it "
                            "runs under the interpreter in tests/kernels/test_interpreted.py")
    for item in items:
        if str(item.path).startswith(KERNEL_TESTS) and item.path.name != "test_interpreted.py" \
                and not runs_kernels_in_process(item):
            item.add_marker(skip)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Where PYTEST_FAILURES_FILE names a file, each failure is appended to it with its
    error the moment it happens: bench/gpu_check.sh's test stages may be stopped at a time
    limit before pytest's summary. Under pytest-xdist the controller writes them all."""
    path = os.environ.get("PYTEST_FAILURES_FILE")
    if not report.failed or not path or "PYTEST_XDIST_WORKER" in os.environ:
        return
    with open(path, "a") as f:
        f.write(f"=== {report.nodeid} (failed in {report.when}, {report.duration:.1f} s)\n"
                f"{report.longreprtext}\n\n")


CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m.role }}: {{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant:{% endif %}")


@pytest.fixture(scope="session")
def chat_model_with(tmp_path_factory):
    """make(template) -> a directory of tiny-llama (linked) with `template` as the chat
    template of its tokenizer_config.json."""
    import json

    from shardline.presets import build_preset

    def make(template: str) -> str:
        preset = build_preset("tiny-llama")
        target = tmp_path_factory.mktemp("tiny-chat")
        for name in os.listdir(preset):
            if name != "tokenizer_config.json":
                os.symlink(os.path.join(preset, name), target / name)
        with open(os.path.join(preset, "tokenizer_config.json")) as f:
            config = json.load(f)
        (target / "tokenizer_config.json").write_text(
            json.dumps({**config, "chat_template": template}))
        return str(target)
    return make


@pytest.fixture(scope="session")
def tiny_chat_model(chat_model_with) -> str:
    """tiny-llama with a chat template in its tokenizer_config.json (its weights are
    random, so its answers are noise, but every chat code path runs)."""
    return chat_model_with(CHAT_TEMPLATE)


@pytest.fixture
def engine_kwargs(monkeypatch) -> dict:
    """The keyword arguments the next `LLM(...)` is given (the CLI's engine options),
    filled in when it is called; the call then fails with ValueError("recorded")."""
    from shardline.engine import llm

    seen = {}

    def record(model, **kwargs):
        seen.update(kwargs)
        raise ValueError("recorded")
    monkeypatch.setattr(llm, "LLM", record)
    return seen


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails a test whose command builds an engine (`LLM(...)`): its input must be refused
    before the model loads."""
    from shardline.engine import llm

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")
    monkeypatch.setattr(llm, "LLM", load)


@pytest.fixture
def no_spawn(monkeypatch):
    """Fails a test that starts a process (and refuses the start), or leaves one running:
    for checks that must happen before any worker is spawned."""
    import multiprocessing.process

    from process_hygiene import live_children

    started = []

    def refuse(process):
        started.append(process.name)
        raise AssertionError(f"process {process.name} was started")

    before = live_children()
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)
    yield
    assert not started
    assert set(live_children()) <= set(before)


@pytest.fixture(scope="module")
def no_process_left_behind():
    """Fails a module that leaves a child process running 10 s after its last test (use
    it with `pytestmark = pytest.mark.usefixtures("no_process_left_behind")`)."""
    import time

    from process_hygiene import live_children

    before = live_children()
    yield
    deadline = time.monotonic() + 10
    while set(live_children()) - set(before) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = {pid: cmd for pid, cmd in live_children().items() if pid not in before}
    assert not left, f"the module left processes behind: {left}"


@pytest.fixture(scope="session")
def hf_tiny_llama():
    """transformers' model of the tiny-llama preset in fp32, the reference for its logits
    (skips where transformers is not installed)."""
    import warnings

    from shardline.presets import resolve_model

    transformers = pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(
            resolve_model("tiny-llama"), dtype=torch.float32).eval()
