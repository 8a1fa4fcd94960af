"""EngineArgs: flat options land in the right config section and are validated."""

import random

import pytest

from shardline.engine.engine_args import EngineArgs


def test_options_reach_their_config_sections(tmp_path):
    blocks, seqs = random.randint(1, 99), random.randint(1, 99)
    config = EngineArgs(str(tmp_path), num_kv_blocks=blocks, max_num_seqs=seqs, block_size=8,
                        enable_prefix_caching=False, seed=5, dtype="bf16",
                        enforce_eager=True).to_config()
    assert config.model.model == str(tmp_path) and config.model.dtype == "bfloat16"
    assert (config.cache.num_blocks, config.cache.block_size) == (blocks, 8)
    assert not config.cache.enable_prefix_caching and config.model.seed == 5
    assert config.scheduler.max_num_seqs == seqs and config.model.enforce_eager
    assert not EngineArgs(str(tmp_path)).to_config().model.enforce_eager
    for wanted in (None, True, False):
        config = EngineArgs(str(tmp_path), async_scheduling=wanted).to_config()
        assert config.scheduler.async_scheduling is wanted


def test_bad_values_and_unknown_options_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="block_size=3"):
        EngineArgs(str(tmp_path), block_size=3).to_config()
    with pytest.raises(ValueError, match="not-a-model"):
        EngineArgs("not-a-model").to_config()
    with pytest.raises(TypeError, match="max_seqs"):
        EngineArgs(str(tmp_path), max_seqs=4)


@pytest.mark.parametrize("data_parallel_size", [1, 2])
def test_max_model_len_beyond_the_model_fails_before_any_worker_starts(data_parallel_size,
                                                                       monkeypatch, fresh_seed):
    from shardline.engine import data_parallel, llm_engine
    from shardline.engine.llm import LLM
    from shardline.presets import PRESETS

    def start_workers(config):
        raise AssertionError("workers started before max_model_len was checked")

    monkeypatch.setattr(llm_engine, "create_executor", start_workers)
    monkeypatch.setattr(data_parallel, "create_data_parallel_executors", start_workers)
    limit = PRESETS["tiny-llama"]["max_position_embeddings"]
    asked = limit + random.Random(fresh_seed).randint(1, 10**6)
    with pytest.raises(ValueError, match=f"max_model_len={asked} is invalid: the model supports "
                                         f"at most {limit} positions"):
        LLM("tiny-llama", max_model_len=asked, data_parallel_size=data_parallel_size)


@pytest.mark.parametrize("owner", ["LLM", "AsyncLLM"])
def test_an_unknown_option_names_the_class_and_the_option_meant(owner, monkeypatch, fresh_seed):
    """A typo gave "EngineArgs.__init__() got an unexpected keyword argument", naming a
    class the caller never used and no option it could have meant."""
    import dataclasses

    import shardline

    def start_engine(config):
        raise AssertionError("the engine started despite an unknown option")

    for module in ("llm", "async_llm"):
        monkeypatch.setattr(f"shardline.engine.{module}.create_engine", start_engine)
    rng = random.Random(fresh_seed)
    meant = rng.choice([f.name for f in dataclasses.fields(EngineArgs) if len(f.name) > 5])
    cut = rng.randrange(1, len(meant) - 1)
    typo = meant[:cut] + meant[cut + 1:]   # one letter left out
    with pytest.raises(TypeError, match=rf"^{owner}\(\) got an unknown option '{typo}': did "
                                        rf"you mean .*'{meant}'"):
        getattr(shardline, owner)("tiny-llama", **{typo: 1})
    stranger = "".join(rng.choice("qxzjw") for _ in range(12))
    with pytest.raises(TypeError, match=rf"unknown option '{stranger}': the options are dtype, "
                                        "max_model_len, .*, ray_address, step_timeout_s$"):
        getattr(shardline, owner)("tiny-llama", dtype="auto", **{stranger: True})
