"""Config validation and resolution: dtype "auto", the KV cache settings, the token budget."""

import math
import pathlib
import random
import re

import pytest
import torch

from shardline.config import CacheConfig, ModelConfig, SchedulerConfig
from shardline.engine.engine_args import EngineArgs


@pytest.fixture(autouse=True)
def _seed_random(fresh_seed):
    random.seed(fresh_seed)


def test_auto_dtype_is_float32_on_cpu_and_the_checkpoints_on_gpu():
    auto = ModelConfig("m")
    assert auto.dtype == "auto" and ModelConfig("m", dtype="AUTO").dtype == "auto"
    assert auto.resolve_torch_dtype("cpu", "bfloat16") == torch.float32
    assert auto.resolve_torch_dtype("cuda", "bfloat16") == torch.bfloat16
    assert auto.resolve_torch_dtype("cuda", "float16") == torch.float16
    assert auto.resolve_torch_dtype("cuda", None) == torch.float32
    with pytest.raises(ValueError, match="torch_dtype='float64', which is not supported"):
        auto.resolve_torch_dtype("cuda", "float64")
    explicit = ModelConfig("m", dtype="bf16")
    assert explicit.dtype == "bfloat16"
    assert explicit.resolve_torch_dtype("cpu", "float32") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype='int8' is not supported: use auto, float32"):
        ModelConfig("m", dtype="int8")


def test_cache_config_defaults_to_free_memory_and_checks_its_settings():
    cache = CacheConfig()
    assert cache.num_blocks is None and cache.kv_cache_memory_bytes is None
    assert cache.gpu_memory_utilization == 0.9
    for bad in (0, 0.0, -0.5, 1.01):
        with pytest.raises(ValueError, match=f"gpu_memory_utilization={bad!r} is invalid"):
            CacheConfig(gpu_memory_utilization=bad)
    with pytest.raises(ValueError, match="kv_cache_memory_bytes=0 is invalid"):
        CacheConfig(kv_cache_memory_bytes=0)
    share = random.uniform(0.1, 1.0)
    config = EngineArgs("tiny-llama", gpu_memory_utilization=share).to_config()
    assert config.cache.gpu_memory_utilization == share and config.model.dtype == "auto"


def test_token_budget_must_cover_one_token_per_sequence():
    seqs = random.randint(2, 512)
    with pytest.raises(ValueError, match=f"max_num_batched_tokens={seqs - 1} is invalid: must "
                                         f"be an integer >= max_num_seqs={seqs}"):
        SchedulerConfig(max_num_seqs=seqs, max_num_batched_tokens=seqs - 1)
    with pytest.raises(ValueError, match="max_num_batched_tokens=8 is invalid"):
        EngineArgs("tiny-llama", max_num_batched_tokens=8).to_config()
    assert SchedulerConfig(max_num_seqs=seqs, max_num_batched_tokens=seqs).max_num_seqs == seqs


@pytest.mark.parametrize("field,value,allowed", [
    ("max_model_len", "512", "None (use the checkpoint's) or an integer >= 1"),
    ("max_model_len", 512.0, "None (use the checkpoint's) or an integer >= 1"),
    ("max_num_seqs", "4", "an integer >= 1"),
    ("max_num_seqs", 4.5, "an integer >= 1"),
    ("max_num_batched_tokens", "4096", "an integer >= max_num_seqs=64"),
    ("max_num_batched_tokens", True, "an integer >= max_num_seqs=64"),
    ("block_size", 16.0, "a power of two from 1 to 256"),
    ("block_size", True, "a power of two from 1 to 256"),
    ("num_kv_blocks", "8", "None (size the cache from memory) or an integer >= 1"),
    ("num_kv_blocks", 0, "None (size the cache from memory) or an integer >= 1"),
    ("kv_cache_memory_bytes", 1e6, "None (size the cache from free memory) or an integer"),
    ("gpu_memory_utilization", True, "in (0, 1]"),
    ("seed", "x", "an integer from -2**63 to 2**64 - 1"),
    ("seed", 2**64, "an integer from -2**63 to 2**64 - 1"),
    ("enforce_eager", "no", "True or False"),
    ("max_logprobs", -2, "-1 (up to the vocabulary size) or an integer >= 0"),
    ("max_logprobs", 20.0, "-1 (up to the vocabulary size) or an integer >= 0"),
    ("enable_prefix_caching", "no", "True or False"),
    ("enable_chunked_prefill", 0, "True or False"),
    ("pipeline_stage_layers", 2, "None or a list of 1 layer counts"),
    ("step_timeout_s", 0, "None or a number of seconds > 0"),
    ("step_timeout_s", -5.0, "None or a number of seconds > 0"),
    ("step_timeout_s", math.inf, "None or a number of seconds > 0"),
    ("step_timeout_s", math.nan, "None or a number of seconds > 0"),
    ("step_timeout_s", "30", "None or a number of seconds > 0"),
    ("step_timeout_s", True, "None or a number of seconds > 0"),
])
def test_engine_options_of_the_wrong_type_are_named(field, value, allowed):
    message = f"{field}={value!r} is invalid: must be {allowed}"
    with pytest.raises(ValueError, match=re.escape(message)):
        EngineArgs("tiny-llama", **{field: value}).to_config()


@pytest.mark.parametrize("backend", [None, "uni"])
def test_a_step_timeout_is_refused_where_the_step_runs_in_the_engines_process(backend, rng):
    timeout = rng.uniform(0.5, 600.0)
    with pytest.raises(ValueError, match=re.escape(
            f"step_timeout_s={timeout!r} is invalid: must be None where the one rank runs in "
            "the engine's own process")):
        EngineArgs("tiny-llama", step_timeout_s=timeout,
                   distributed_executor_backend=backend).to_config()


@pytest.mark.parametrize("layout", [dict(distributed_executor_backend="mp"),
                                    dict(distributed_executor_backend="ray"),
                                    dict(tensor_parallel_size=2)])
def test_a_step_timeout_is_taken_where_workers_run_apart(layout, rng):
    timeout = rng.choice([rng.randint(1, 600), rng.uniform(0.01, 600.0)])
    config = EngineArgs("tiny-llama", step_timeout_s=timeout, **layout).to_config()
    assert config.parallel.step_timeout_s == timeout


@pytest.mark.parametrize("model", [None, 5, b"tiny-llama"])
def test_a_model_that_is_not_a_name_or_path_is_named(model):
    with pytest.raises(ValueError, match=f"model={model!r} \\({type(model).__name__}\\) is "
                                         "invalid: must be a model directory"):
        EngineArgs(model).to_config()


def test_a_model_path_object_is_taken_as_its_string(tmp_path):
    from shardline.presets import resolve_model

    directory = resolve_model("tiny-llama")
    assert EngineArgs(pathlib.Path(directory)).to_config().model.model == directory
    seed = random.randrange(-2**63, 2**64)
    assert EngineArgs("tiny-llama", seed=seed).to_config().model.seed == seed


def test_a_bad_shardline_device_is_named_before_any_rank_starts(rng, monkeypatch):
    """It reached torch.device in the rank, whose RuntimeError listed twenty device types
    (exit 1 from the command line)."""
    from shardline.config import ParallelConfig

    bad = rng.choice(["gpu", "cuda0", "cuda:", "cpu:0x", "tpu", "CUDA:1"]) + "x" * rng.randint(0, 2)
    monkeypatch.setenv("SHARDLINE_DEVICE", bad)
    with pytest.raises(ValueError, match=re.escape(f"SHARDLINE_DEVICE={bad!r} is invalid: "
                                                   "must be cpu, cuda or cuda:N")):
        ParallelConfig()
    ParallelConfig(device="cpu")   # an explicit device is what the ranks use
    for good in ("cpu", "cuda", f"cuda:{rng.randint(0, 15)}"):
        monkeypatch.setenv("SHARDLINE_DEVICE", good)
        ParallelConfig()
