"""Tuned tables: which config a launch takes (table hit, autotune, default), the table
file's format and its errors, and the linear choice between Triton and torch.matmul."""

import json
import random
import threading

import pytest
import torch
import triton
import triton.language as tl

from shardline.kernels import _config, _tuned, dispatch, matmul, reference, rotary_kv_cache

FAKE_GPU = "NVIDIA Fake GPU 9000"


@triton.jit
def _probe_kernel(x_ptr, out_ptr, n, N_BUCKET, SCALE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) * SCALE + BLOCK, mask=mask)


CONFIGS = [triton.Config({"BLOCK": 64}, num_warps=4, num_stages=2),
           triton.Config({"BLOCK": 32}, num_warps=2, num_stages=1),
           triton.Config({"BLOCK": 16}, num_warps=1, num_stages=1)]


def _fit(configs, named_args, **kwargs):
    return [c for c in configs if c.kwargs["BLOCK"] <= named_args["N_BUCKET"]]


@pytest.fixture(autouse=True)
def fresh_settings(monkeypatch):
    for name in (_tuned.TABLE_ENV, _tuned.AUTOTUNE_ENV):
        monkeypatch.delenv(name, raising=False)
    _tuned.reset()
    yield
    _tuned.KERNELS.pop("_probe_kernel", None)
    _tuned.reset()


class Probe:
    """_probe_kernel as a TunedKernel whose launches and autotunings are recorded."""

    def __init__(self, monkeypatch, autotune_picks: triton.Config = CONFIGS[1]):
        self.kernel = _config.TunedKernel(_probe_kernel, CONFIGS, ["N_BUCKET", "SCALE"], _fit)
        self.launched: list[triton.Config] = []
        self.autotuned = 0

        def autotune(args, grid, warmup, kwargs):
            self.autotuned += 1
            self.kernel.best_config = autotune_picks
        monkeypatch.setattr(self.kernel, "_launch",
                            lambda args, grid, warmup, kwargs, c: self.launched.append(c))
        monkeypatch.setattr(self.kernel, "_autotune", autotune)

    def __call__(self, n: int, scale: int = 2) -> None:
        x = torch.randn(n)
        self.kernel[(1,)](x, torch.empty_like(x), n, triton.next_power_of_2(n), SCALE=scale)

    def key(self, n: int, scale: int = 2) -> str:
        return f"N_BUCKET={triton.next_power_of_2(n)},SCALE={scale},dtype=float32"


def write_fake_table(path, kernels=None, linear=None, device=FAKE_GPU):
    table = _tuned.TunedTable(device, kernels or {}, linear or {}, {"triton": "test"})
    _tuned.write_table(table, path)
    return path


def use_table(monkeypatch, path):
    monkeypatch.setenv(_tuned.TABLE_ENV, str(path))
    _tuned.reset()


@pytest.fixture
def autotune(monkeypatch):
    """SHARDLINE_AUTOTUNE=1: a table miss is autotuned."""
    monkeypatch.setenv(_tuned.AUTOTUNE_ENV, "1")


def test_a_key_in_the_table_launches_its_config_without_timing(monkeypatch, tmp_path):
    probe = Probe(monkeypatch)
    n = random.randint(33, 64)
    use_table(monkeypatch, write_fake_table(tmp_path / "t.json",
                                            {"_probe_kernel": {probe.key(n): CONFIGS[2]}}))
    probe(n)
    probe(n)
    assert probe.launched == [CONFIGS[2], CONFIGS[2]] and probe.autotuned == 0
    assert probe.kernel.reached[probe.key(n)].source == "table"


def test_the_packaged_table_of_the_gpu_by_its_name(monkeypatch, tmp_path, autotune):
    probe = Probe(monkeypatch)
    monkeypatch.setattr(_tuned, "device_name", lambda: FAKE_GPU)
    monkeypatch.setattr(_tuned, "TABLE_DIR", tmp_path)
    write_fake_table(tmp_path / "nvidia-fake-gpu-9000.json",
                     {"_probe_kernel": {probe.key(40): CONFIGS[1]}})
    probe(40)
    monkeypatch.setattr(_tuned, "device_name", lambda: "NVIDIA Other GPU")
    _tuned.reset()
    probe(40)
    assert probe.launched == [CONFIGS[1]] and probe.autotuned == 1


def test_a_miss_autotunes_once_then_launches_the_winner(monkeypatch, tmp_path, autotune):
    probe = Probe(monkeypatch, autotune_picks=CONFIGS[1])
    use_table(monkeypatch, write_fake_table(tmp_path / "t.json",
                                            {"_probe_kernel": {probe.key(64, 3): CONFIGS[0]}}))
    probe(64)
    probe(64)
    probe(60)
    assert probe.autotuned == 1 and probe.launched == [CONFIGS[1], CONFIGS[1]]
    reached = probe.kernel.reached[probe.key(64)]
    assert (reached.source, reached.config, reached.candidates) == ("tuned", CONFIGS[1], 3)


@pytest.mark.parametrize("switch", ["default", "eager", "environment"])
def test_without_autotuning_a_miss_runs_the_first_candidate_untimed(switch, monkeypatch):
    probe = Probe(monkeypatch)
    if switch == "eager":
        monkeypatch.setenv(_tuned.AUTOTUNE_ENV, "1")
        _tuned.set_autotuning(False)
    elif switch == "environment":
        _tuned.set_autotuning(True)
        monkeypatch.setenv(_tuned.AUTOTUNE_ENV, "0")
    probe(64)
    probe(10)   # the prune keeps only the 16-wide config
    probe(20)
    assert probe.autotuned == 0
    assert probe.launched == [CONFIGS[0], CONFIGS[2], CONFIGS[1]]
    assert [r.source for r in probe.kernel.reached.values()] == ["default", "single", "default"]


def test_a_config_that_does_not_fit_the_gpu_gives_way_to_the_next(monkeypatch, caplog):
    from triton.runtime.errors import OutOfResources
    probe = Probe(monkeypatch)
    too_big = set(range(random.randint(1, 2)))    # the first one or two
    attempts = []

    def launch(args, grid, warmup, kwargs, config):
        attempts.append(config)
        if CONFIGS.index(config) in too_big:
            raise OutOfResources(294912, 232448, "shared memory")
    monkeypatch.setattr(probe.kernel, "_launch", launch)
    with caplog.at_level("INFO", logger="shardline"):
        probe(64)
    fits = CONFIGS[max(too_big) + 1]
    assert attempts == [c for i, c in enumerate(CONFIGS) if i in too_big] + [fits]
    assert "does not fit this GPU" in caplog.text
    attempts.clear()
    probe(64)
    assert attempts == [fits]
    reached = probe.kernel.reached[probe.key(64)]
    assert (reached.source, reached.config) == ("default", fits)


def test_a_launch_no_candidate_fits_raises_the_first_error(monkeypatch):
    from triton.runtime.errors import OutOfResources
    probe = Probe(monkeypatch)
    errors = iter(OutOfResources(1 << i, 1, "shared memory") for i in range(10, 20))

    def launch(args, grid, warmup, kwargs, config):
        raise next(errors)
    monkeypatch.setattr(probe.kernel, "_launch", launch)
    with pytest.raises(OutOfResources, match="Required: 1024"):
        probe(20)     # the prune keeps two configs
    with pytest.raises(OutOfResources, match="Required: 4096"):
        probe(10)     # and one


def test_a_key_the_prune_keeps_no_config_for_is_refused_by_name(monkeypatch, rng):
    """As matmul's fp32 gated tiles on a GPU with 99 KiB of shared memory (sm_86, sm_89):
    a named error, not an IndexError from an empty candidate list."""
    probe = Probe(monkeypatch)
    n = rng.randint(1, 8)     # N_BUCKET under every config's BLOCK
    with pytest.raises(ValueError, match=f"_probe_kernel {probe.key(n)}: the prune keeps none"):
        probe(n)
    assert probe.launched == []


def test_a_table_config_the_prune_rejects_counts_as_a_miss(monkeypatch, tmp_path):
    probe = Probe(monkeypatch)
    use_table(monkeypatch, write_fake_table(tmp_path / "t.json",
                                            {"_probe_kernel": {probe.key(20): CONFIGS[0]}}))
    _tuned.set_autotuning(False)
    probe(20)
    assert probe.launched == [CONFIGS[1]]


def engine_config(enforce_eager: bool):
    from shardline.config import (CacheConfig, EngineConfig, ModelConfig, ParallelConfig,
                                  SchedulerConfig)
    return EngineConfig(ModelConfig("tiny-llama", enforce_eager=enforce_eager), CacheConfig(),
                        SchedulerConfig(), ParallelConfig())


def test_eager_mode_turns_autotuning_off(autotune):
    from shardline.worker.model_runner import ModelRunner
    for eager in (True, False):
        ModelRunner(engine_config(eager), torch.device("cpu"))
        assert _tuned.autotuning_allowed() is not eager


@pytest.mark.parametrize("value", ["yes", "true", " 1", "2"])
def test_an_invalid_autotune_setting_is_refused_by_name(value, monkeypatch):
    from shardline.worker.model_runner import ModelRunner
    monkeypatch.setenv(_tuned.AUTOTUNE_ENV, value)
    with pytest.raises(ValueError, match=f"SHARDLINE_AUTOTUNE={value!r} is invalid: 1 "
                                         "autotunes"):
        ModelRunner(engine_config(False), torch.device("cpu"))


def test_compiling_ahead_compiles_and_launches_nothing(monkeypatch, tmp_path, autotune):
    probe = Probe(monkeypatch)
    compiled = []
    monkeypatch.setattr(probe.kernel.fn, "warmup",
                        lambda *args, grid, **kwargs: compiled.append(kwargs["BLOCK"]))
    use_table(monkeypatch, write_fake_table(tmp_path / "t.json",
                                            {"_probe_kernel": {probe.key(20): CONFIGS[1]}}))
    token = _tuned._compiling_ahead.set(True)
    try:
        probe(20)    # in the table: its config alone
        probe(64)    # a miss to autotune: every candidate
        assert compiled == [32, 64, 32, 16]
        assert probe.launched == [] and probe.autotuned == 0
        # Compiling ahead is this thread's state: another thread's launch runs meanwhile.
        other = threading.Thread(target=probe, args=(20,))
        other.start()
        other.join()
    finally:
        _tuned._compiling_ahead.reset(token)
    assert compiled == [32, 64, 32, 16] and probe.launched == [CONFIGS[1]]
    with _tuned.compile_ahead(torch.device("cpu")) as ahead:
        assert ahead is False


def test_a_table_config_reaches_the_kernel(monkeypatch, tmp_path, fresh_seed):
    kernel = _config.TunedKernel(_probe_kernel, CONFIGS, ["N_BUCKET", "SCALE"], _fit)
    n = random.randint(17, 64)
    key = f"N_BUCKET={triton.next_power_of_2(n)},SCALE=3,dtype=float32"
    use_table(monkeypatch, write_fake_table(tmp_path / "t.json",
                                            {"_probe_kernel": {key: CONFIGS[2]}}))
    x = torch.randn(n)
    out = torch.full_like(x, float("nan"))
    kernel[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, out, n, triton.next_power_of_2(n),
                                                           SCALE=3)
    assert torch.equal(out, x * 3 + 16)


def test_the_table_file_round_trips(tmp_path):
    configs = {"_matmul_kernel": {"M_BUCKET=16,N=64,K=32,SILU_MUL=True,dtype=bfloat16":
                                  random.choice(matmul._TILED_CONFIGS)},
               "_probe_kernel": {"N_BUCKET=64,SCALE=2,dtype=float32": CONFIGS[1]}}
    linear = {"M_BUCKET=16,N=64,K=32,SILU_MUL=False,dtype=bfloat16":
              {"backend": "torch", "triton_ms": 0.02, "torch_ms": 0.01}}
    path = write_fake_table(tmp_path / "sub" / "t.json", configs, linear)
    table = _tuned.read_table(path)
    assert (table.device, table.kernels, table.linear) == (FAKE_GPU, configs, linear)
    for entries in table.kernels.values():
        for config in entries.values():
            assert config.num_ctas == 1 and config.maxnreg is None and config.pre_hook is None
    assert json.loads(path.read_text())["format"] == _tuned.FORMAT_VERSION


def test_a_rewrite_cut_short_leaves_the_last_whole_table(tmp_path, monkeypatch):
    kept = {"_probe_kernel": {f"N_BUCKET={2 ** random.randint(4, 12)},SCALE=2,dtype=float32":
                              random.choice(CONFIGS)}}
    path = write_fake_table(tmp_path / "t.json", kept)

    def dump_half_then_die(data, f, **kwargs):  # bench/tune.py killed at its time limit
        text = json.dumps(data, **kwargs)
        f.write(text[: len(text) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(_tuned.json, "dump", dump_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        write_fake_table(path, {**kept, "_other_kernel": {"K=1,dtype=float32": CONFIGS[0]}})
    assert _tuned.read_table(path).kernels == kept
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]


def test_every_kernel_config_survives_the_file_so_a_table_hit_matches_it():
    from shardline.kernels import attention_decode, attention_prefill, matmul_split_k, moe
    configs = (matmul._TILED_CONFIGS + matmul_split_k.SPLIT_CONFIGS + attention_decode._CONFIGS
               + attention_prefill._CONFIGS + moe._CONFIGS)
    for config in configs:
        text = json.dumps(_tuned.config_to_json(config))
        assert _tuned.config_from_json(json.loads(text), "test") == config


@pytest.mark.parametrize("change, complaint", [
    (lambda d: d.pop("format"), "format must be 1"),
    (lambda d: d.update(device=None), "device must be"),
    (lambda d: d["kernels"]["k"]["K=1,dtype=float32"].update(num_warps=3),
     "kernels.k[K=1,dtype=float32]: num_warps must be a power of two; got 3"),
    (lambda d: d["kernels"]["k"]["K=1,dtype=float32"].update(num_stages=0), "num_stages"),
    (lambda d: d["kernels"]["k"]["K=1,dtype=float32"].update(kwargs=[1]), "kwargs must map"),
    (lambda d: d["kernels"]["k"]["K=1,dtype=float32"].pop("num_stages"), "a config is"),
    (lambda d: d["kernels"].update(k=[]), "kernels.k must be a JSON object"),
    (lambda d: d["linear"]["K=1"].update(backend="cublas"), "linear[K=1] must name a backend"),
])
def test_a_malformed_table_says_what_is_wrong(change, complaint, tmp_path):
    good = _tuned.table_to_json(_tuned.TunedTable(
        FAKE_GPU, {"k": {"K=1,dtype=float32": CONFIGS[0]}},
        {"K=1": {"backend": "torch"}}))
    change(good)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(good))
    with pytest.raises(_tuned.TunedTableError, match=r"bad\.json") as err:
        _tuned.read_table(path)
    assert complaint in str(err.value)


def test_a_table_that_is_not_json_names_its_file(tmp_path, monkeypatch):
    path = tmp_path / "broken.json"
    path.write_text('{"format": 1,')
    use_table(monkeypatch, path)
    with pytest.raises(_tuned.TunedTableError, match="broken.json: not valid JSON"):
        _tuned.current_table()


def test_a_missing_table_file_is_named_with_its_variable(monkeypatch, tmp_path):
    use_table(monkeypatch, tmp_path / "absent.json")
    with pytest.raises(_tuned.TunedTableError, match="SHARDLINE_TUNED_TABLE=.*absent.json: "
                                                     "no such file"):
        _tuned.current_table()


class FakeCuda(torch.Tensor):
    """A CPU tensor that says it lives on CUDA, for the dispatch rule alone."""

    @property
    def is_cuda(self) -> bool:
        return True


def op_arguments(op, x, weight):
    """Arguments of dispatch's function for the linear `op` (only their shapes matter)."""
    if op in ("linear", "silu_mul"):
        return (x, weight)
    if op == "rms_norm":
        return (x, weight, None, None, None, 1e-6)
    k_cache = torch.empty(2, 4, 1, 16)   # heads of 16: weight rows = (query heads + 2) * 16
    return (x, weight, None, None, None, True, k_cache, k_cache, None,
            weight.shape[0] // 16 - 2)


# op -> dispatch's function, (module, name) of its Triton form and of its torch.matmul form
LINEAR_OPS = {
    "linear": ("linear", (matmul, "linear"), (reference, "linear")),
    "silu_mul": ("linear_silu_mul", (matmul, "linear_silu_mul"),
                 (reference, "linear_silu_mul")),
    "rms_norm": ("linear_rms_norm", (matmul, "linear_rms_norm"),
                 (dispatch, "_cublas_linear_rms_norm")),
    "qkv_rotary": ("qkv_rotary_and_write_kv_cache",
                   (rotary_kv_cache, "qkv_rotary_and_write_kv_cache"),
                   (dispatch, "_cublas_qkv_rotary_and_write_kv_cache"))}


def record_forms(monkeypatch, op: str) -> list[str]:
    """Replaces both forms of the linear `op` with recorders; the list they append to."""
    calls = []
    name, *forms = LINEAR_OPS[op]
    for (module, attribute), label in zip(forms, ("triton", "torch")):
        monkeypatch.setattr(module, attribute, lambda *a, label=label: calls.append(label))
    return calls


@pytest.mark.parametrize("setting", ["default", "autotune", "eager", "forced"])
@pytest.mark.parametrize("op", sorted(LINEAR_OPS))
def test_a_linear_op_takes_its_torch_matmul_form_where_the_table_says_so(op, setting,
                                                                         monkeypatch, tmp_path):
    m, k, rows = random.randint(1, 40), 32, 16 * random.randint(4, 8)
    other_op = "silu_mul" if op == "linear" else "linear"
    faster = {_tuned.linear_key(m, rows, k, torch.float32, op): {"backend": "torch"},
              _tuned.linear_key(m, 2 * rows, k, torch.float32, op): {"backend": "triton"},
              _tuned.linear_key(m, 3 * rows, k, torch.float32, other_op): {"backend": "torch"}}
    use_table(monkeypatch, write_fake_table(tmp_path / "t.json", linear=faster))
    if setting != "default":
        monkeypatch.setenv(_tuned.AUTOTUNE_ENV, "1")
    if setting == "eager":
        _tuned.set_autotuning(False)
    if setting == "forced":
        monkeypatch.setenv("SHARDLINE_FORCE_TRITON", "1")
        dispatch.reset_triton_choice()
    calls = record_forms(monkeypatch, op)
    x = torch.randn(m, k).as_subclass(FakeCuda)
    # in the table as torch, as triton, another op's key, not in the table
    for weight_rows in (rows, 2 * rows, 3 * rows, 4 * rows):
        getattr(dispatch, LINEAR_OPS[op][0])(*op_arguments(op, x, torch.randn(weight_rows, k)))
    # A miss is Triton only where it would be autotuned; forced, every linear is Triton.
    miss = "triton" if setting in ("autotune", "forced") else "torch"
    assert calls == ["triton" if setting == "forced" else "torch", "triton", miss, miss]
    assert sorted(shape[1] for shape in _tuned.linear_shapes()) == [rows, 2 * rows, 3 * rows,
                                                                    4 * rows]
    assert dispatch.linear_forms(op) == tuple(getattr(module, attribute)
                                              for module, attribute in LINEAR_OPS[op][1:])


@pytest.mark.parametrize("op", sorted(LINEAR_OPS))
def test_without_a_table_a_linear_takes_cublas_unless_autotuned(op, monkeypatch):
    monkeypatch.setenv(_tuned.TABLE_ENV, "none")
    calls = record_forms(monkeypatch, op)
    x = torch.randn(random.randint(1, 300), 32).as_subclass(FakeCuda)
    weight = torch.randn(16 * random.randint(4, 8), 32)
    for autotune in ("", "0", "1"):
        monkeypatch.setenv(_tuned.AUTOTUNE_ENV, autotune)
        _tuned.reset()
        getattr(dispatch, LINEAR_OPS[op][0])(*op_arguments(op, x, weight))
    assert calls == ["torch", "torch", "triton"]


def test_tuning_learns_the_heads_of_a_qkv_projection(monkeypatch, tmp_path, autotune):
    use_table(monkeypatch, write_fake_table(tmp_path / "t.json"))
    monkeypatch.setattr(rotary_kv_cache, "qkv_rotary_and_write_kv_cache", lambda *a: None)
    m, heads = random.randint(1, 40), random.randint(1, 4)
    x, weight = torch.randn(m, 32).as_subclass(FakeCuda), torch.randn((heads + 2) * 16, 32)
    dispatch.qkv_rotary_and_write_kv_cache(*op_arguments("qkv_rotary", x, weight))
    dispatch.linear(x, weight)
    assert sorted(_tuned.linear_shapes(), key=str) == sorted(
        [(m, weight.shape[0], 32, torch.float32, "qkv_rotary", (heads, 1, 16)),
         (m, weight.shape[0], 32, torch.float32, "linear", None)], key=str)


def test_an_unknown_linear_op_is_named():
    with pytest.raises(ValueError, match="op must be one of .*got 'gelu'"):
        dispatch.linear_forms("gelu")


def test_device_slug_is_a_file_name():
    assert _tuned.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert _tuned.device_slug(" NVIDIA H200 ") == "nvidia-h200"
