"""Loading a checkpoint's weights (safetensors, one file, sharded with or without an index):
a missing, misplaced, duplicated or ill-typed tensor is refused naming the tensor and the
file; float checkpoints of any precision load as the engine's dtype. Reading config.json
is in test_loader_config.py."""

import json
import logging
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoint_copies import config_with, single_file_copy
from shardline.models.loader import INDEX_FILE, load_model, read_model_info
from shardline.presets import build_variant, resolve_model


def test_missing_tensor_is_named(tmp_path):
    tensors = single_file_copy(tmp_path)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.self_attn\.k_proj\.weight' "
                                         r"is missing"):
        load_model(str(tmp_path), torch.float32, "cpu")


@pytest.mark.parametrize("layout", ["index", "one file", "two files"])
def test_a_missing_tensor_names_where_it_was_looked_for(tmp_path, rng, layout):
    """The index's weight_map (the tensor may well be in a shard the index forgets), the
    file, or the files that were searched."""
    src = resolve_model("tiny-llama")
    for name in os.listdir(src):
        if layout == "index" or not name.endswith("json") or name == "config.json":
            shutil.copy(f"{src}/{name}", tmp_path / name)
    index = json.load(open(f"{src}/{INDEX_FILE}"))
    name = rng.choice(sorted(index["weight_map"]))
    if layout == "index":
        del index["weight_map"][name]
        (tmp_path / INDEX_FILE).write_text(json.dumps(index))
        where = f"the weight_map of {tmp_path}/{INDEX_FILE}"
    else:
        shards = sorted(set(index["weight_map"].values()))
        parts = {shard: load_file(tmp_path / shard) for shard in shards}
        if layout == "one file":
            for shard in shards:
                (tmp_path / shard).unlink()
            parts = {"model.safetensors": {k: v for p in parts.values() for k, v in p.items()}}
        for shard, tensors in parts.items():
            save_file({k: v for k, v in tensors.items() if k != name}, tmp_path / shard)
        where = (f"{tmp_path}/model.safetensors" if layout == "one file" else
                 f"the 2 files {', '.join(shards)} of {tmp_path}")
    with pytest.raises(ValueError, match=f"checkpoint tensor '{re.escape(name)}' is missing "
                                         f"from {re.escape(where)} \\(needed for parameter"):
        load_model(str(tmp_path), torch.float32, "cpu")


def test_wrong_shape_is_named_with_both_shapes(tmp_path):
    tensors = single_file_copy(tmp_path)
    tensors["model.layers.0.mlp.down_proj.weight"] = torch.zeros(128, 255)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.down_proj\.weight' has "
                                         r"shape \[128, 255\], expected \[128, 256\]"):
        load_model(str(tmp_path), torch.float32, "cpu")


def test_a_wrong_shape_names_the_shard_holding_it(tmp_path, rng):
    src = resolve_model("tiny-llama")
    for name in os.listdir(src):
        shutil.copy(f"{src}/{name}", tmp_path / name)
    weight_map = json.load(open(tmp_path / INDEX_FILE))["weight_map"]
    name = rng.choice(sorted(weight_map))
    tensors = load_file(tmp_path / weight_map[name])
    shape = list(tensors[name].shape)
    wrong = [size + rng.randint(1, 3) for size in shape]
    tensors[name] = torch.zeros(wrong)
    save_file(tensors, tmp_path / weight_map[name])
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / weight_map[name]))}: "
                                         f"checkpoint tensor '{re.escape(name)}' has shape "
                                         f"{re.escape(str(wrong))}, expected"):
        load_model(str(tmp_path), torch.float32, "cpu")


def test_model_info_of_sharded_preset():
    info = read_model_info(resolve_model("tiny-llama"))
    assert (info.architecture, info.eos_token_ids, info.bos_token_id) == \
        ("LlamaForCausalLM", [2], 1)
    assert (info.num_attention_heads, info.num_key_value_heads, info.head_dim) == (4, 2, 32)


def test_eos_ids_merge_config_and_generation_config(tmp_path):
    single_file_copy(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    assert read_model_info(str(tmp_path)).eos_token_ids == [2, 5]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loads_the_same_weights(dtype):
    path = resolve_model("tiny-mixtral")
    full = dict(load_model(path, torch.float32, "cpu").named_parameters())
    for name, p in load_model(path, dtype, "cpu").named_parameters():
        assert p.dtype == dtype
        torch.testing.assert_close(p.float(), full[name].to(dtype).float())


def test_sliding_window_caps_served_length(tmp_path):
    single_file_copy(tmp_path, "tiny-mistral")
    config = json.load(open(tmp_path / "config.json"))
    config["sliding_window"] = 100
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert read_model_info(str(tmp_path)).max_position_embeddings == 100
    config["architectures"], config["use_sliding_window"] = ["Qwen2ForCausalLM"], False
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert read_model_info(str(tmp_path)).max_position_embeddings == 512


def test_a_long_load_reports_its_progress(monkeypatch, caplog):
    """With the report interval at zero every parameter is a report: the counts climb to
    the total, and the last line says how many were loaded."""
    from shardline.models import loader

    monkeypatch.setattr(loader, "PROGRESS_INTERVAL_S", 0.0)
    with caplog.at_level(logging.INFO, logger="shardline.models.loader"):
        model = loader.load_model(resolve_model("tiny-llama"), torch.float32, "cpu")
    total = len(model.weight_sources())
    lines = [r.getMessage() for r in caplog.records]
    counts = [int(line.split()[2]) for line in lines[:-1]]
    assert counts == list(range(total)) and f"of {total} parameters" in lines[0]
    assert lines[-1].startswith(f"loaded {total} parameters in ")


def _sharded_copy_with_index(tmp_path, change) -> str:
    """A copy of tiny-llama (two shards) whose index's weight_map is `change`d in place."""
    src = resolve_model("tiny-llama")
    for name in os.listdir(src):
        shutil.copy(f"{src}/{name}", tmp_path / name)
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    change(index["weight_map"])
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    return str(tmp_path / "model.safetensors.index.json")


def test_an_index_mapping_a_tensor_to_the_wrong_shard_is_named(tmp_path, rng):
    """The index says a tensor is in a file that does not hold it: a ValueError naming the
    index, the tensor and the file, not a KeyError out of the shard."""
    moved = {}

    def move_one(weight_map):
        moved["name"] = rng.choice(sorted(weight_map))
        old = weight_map[moved["name"]]
        moved["file"] = next(f for f in sorted(set(weight_map.values())) if f != old)
        weight_map[moved["name"]] = moved["file"]

    index = _sharded_copy_with_index(tmp_path, move_one)
    with pytest.raises(ValueError, match=f"{re.escape(index)} maps tensor "
                                         f"'{re.escape(moved['name'])}' to "
                                         f"'{re.escape(moved['file'])}', which does not hold it"):
        load_model(str(tmp_path), torch.float32, "cpu")


def test_an_index_naming_a_file_with_a_non_string_is_named(tmp_path, rng):
    spoiled = {}

    def spoil_one(weight_map):
        spoiled["name"] = rng.choice(sorted(weight_map))
        weight_map[spoiled["name"]] = 3

    index = _sharded_copy_with_index(tmp_path, spoil_one)
    with pytest.raises(ValueError, match=f"{re.escape(index)}: weight_map"
                                         rf"\['{re.escape(spoiled['name'])}'\]=3 is not a file"):
        load_model(str(tmp_path), torch.float32, "cpu")


def test_a_tensor_in_two_files_without_an_index_is_named(tmp_path, rng):
    """Without an index the files are merged by name; a tensor two files hold (a stray
    copy left beside the checkpoint) is refused rather than one copy silently winning."""
    tensors = single_file_copy(tmp_path)
    save_file(tensors, tmp_path / "model.safetensors")
    name = rng.choice(sorted(tensors))
    save_file({name: torch.randn(tensors[name].shape)}, tmp_path / "stray.safetensors")
    with pytest.raises(ValueError, match=f"tensor '{re.escape(name)}' is in both "
                                         f".*model.safetensors and .*stray.safetensors"):
        load_model(str(tmp_path), torch.float32, "cpu")


@pytest.mark.parametrize("kind", ["a directory", "not a regular file"])
def test_a_safetensors_name_on_something_not_a_file_is_named(tmp_path, kind):
    """A directory failed on its first read naming no path; a FIFO blocked the open
    forever."""
    single_file_copy(tmp_path)
    if kind == "a directory":
        (tmp_path / "model.safetensors").mkdir()
    else:
        os.mkfifo(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path))}/model.safetensors is "
                                         f"{kind}, not a safetensors file"):
        load_model(str(tmp_path), torch.float32, "cpu")


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool, torch.float8_e4m3fn])
def test_a_weight_stored_as_integers_or_fp8_is_named(tmp_path, rng, dtype):
    """A weight that is not a float (quantized data, whose scales a cast would ignore) is
    refused by name instead of being cast into nonsense weights."""
    tensors = single_file_copy(tmp_path)
    name = rng.choice(sorted(tensors))
    tensors[name] = tensors[name].to(dtype)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=f"model.safetensors: tensor '{re.escape(name)}' is "
                                         f"{re.escape(str(dtype))}, expected one of "
                                         "torch.float32, .*quantized checkpoints"):
        load_model(str(tmp_path), torch.float32, "cpu")


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16, torch.float64])
def test_a_checkpoint_stored_in_another_float_type_loads_as_float32(tmp_path, stored):
    tensors = {name: t.to(stored) for name, t in single_file_copy(tmp_path).items()}
    save_file(tensors, tmp_path / "model.safetensors")
    model = load_model(str(tmp_path), torch.float32, "cpu")
    params = dict(model.named_parameters())
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight",
                 "model.norm.weight"):
        assert params[name].dtype == torch.float32
        torch.testing.assert_close(params[name], tensors[name].float(), rtol=0, atol=0)


def test_layers_beyond_the_config_are_warned_of(tmp_path, rng, caplog):
    """A config with fewer layers than its checkpoint served a model cut short, silently."""
    held = rng.randint(3, 5)
    src = build_variant("tiny-qwen2", num_hidden_layers=held)
    for name in os.listdir(src):
        shutil.copy(f"{src}/{name}", tmp_path / name)
    with caplog.at_level(logging.WARNING, logger="shardline.models.loader"):
        load_model(str(tmp_path), torch.float32, "cpu")
    assert not caplog.records
    used = rng.randint(1, held - 1)
    config_with(tmp_path, "tiny-qwen2", num_hidden_layers=used)
    with caplog.at_level(logging.WARNING, logger="shardline.models.loader"):
        load_model(str(tmp_path), torch.float32, "cpu")
    beyond = f"{used}-{held - 1}" if held - used > 1 else f"{used}"
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path}/model.safetensors holds decoder layers {beyond} beyond config.json's "
        f"num_hidden_layers={used}: they are not loaded. Is config.json the checkpoint's own?"]


def test_a_pytorch_pickle_checkpoint_is_named(tmp_path):
    """A directory with pytorch_model.bin and no safetensors was only 'has no
    *.safetensors'; it now says the .bin is not loaded and what to do."""
    torch.save(single_file_copy(tmp_path), tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="has no \\*.safetensors; it has "
                                                "pytorch_model.bin, a PyTorch pickle, which "
                                                "shardline does not load: convert"):
        load_model(str(tmp_path), torch.float32, "cpu")
