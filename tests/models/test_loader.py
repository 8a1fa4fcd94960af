import json
import logging
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from shardline import LLM, SamplingParams
from shardline.models.loader import INDEX_FILE, load_model, read_model_info
from shardline.models.registry import MODEL_REGISTRY
from shardline.presets import build_variant, resolve_model


def _single_file_copy(tmp_path, name="tiny-qwen2"):
    src = resolve_model(name)
    for f in ("config.json", "generation_config.json"):
        shutil.copy(f"{src}/{f}", tmp_path / f)
    return load_file(f"{src}/model.safetensors")


def test_missing_tensor_is_named(tmp_path):
    tensors = _single_file_copy(tmp_path)
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
    tensors = _single_file_copy(tmp_path)
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


def test_unknown_architecture_lists_supported(tmp_path):
    config = json.load(open(f"{resolve_model('tiny-llama')}/config.json"))
    config["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*not supported.*" +
                       ".*".join(MODEL_REGISTRY)):
        read_model_info(str(tmp_path))


def test_architectures_given_as_one_string_asks_for_a_list(tmp_path):
    """A bare string was read letter by letter, and its own supported name was called
    unsupported."""
    config = json.load(open(f"{resolve_model('tiny-llama')}/config.json"))
    config["architectures"] = "LlamaForCausalLM"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="architectures='LlamaForCausalLM' is invalid: it must "
                                         r"be a list of model class names, such as \['"):
        read_model_info(str(tmp_path))


def _config_with(tmp_path, preset: str, **changes) -> str:
    """A copy of `preset`'s config.json with `changes` (None removes a field)."""
    config = json.load(open(f"{resolve_model(preset)}/config.json"))
    for field, value in changes.items():
        if value is None:
            config.pop(field, None)
        else:
            config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path / "config.json")


@pytest.mark.parametrize("preset, changes, error", [
    ("tiny-llama", {"hidden_size": None}, "hidden_size is missing"),
    ("tiny-llama", {"intermediate_size": None}, "intermediate_size is missing"),
    ("tiny-llama", {"hidden_size": "128"},
     "hidden_size='128' is invalid: it must be an integer >= 1"),
    ("tiny-llama", {"num_hidden_layers": 0}, "num_hidden_layers=0 is invalid"),
    ("tiny-llama", {"num_hidden_layers": True}, "num_hidden_layers=True is invalid"),
    ("tiny-llama", {"vocab_size": -3}, "vocab_size=-3 is invalid"),
    ("tiny-llama", {"max_position_embeddings": 0}, "max_position_embeddings=0 is invalid"),
    ("tiny-llama", {"num_key_value_heads": 3}, "num_key_value_heads=3 is invalid: it must "
                                               "divide num_attention_heads=4"),
    ("tiny-llama", {"num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": None},
     "hidden_size=128 is invalid: without head_dim it must be a multiple of "
     "num_attention_heads=3"),
    ("tiny-llama", {"head_dim": 31}, "head_dim=31 is invalid: the head size 31 must be even"),
    ("tiny-llama", {"rope_theta": -1.0}, "rope_theta=-1.0 is invalid: it must be a positive "
                                         "finite number"),
    ("tiny-llama", {"rms_norm_eps": 0}, "rms_norm_eps=0 is invalid"),
    ("tiny-llama", {"partial_rotary_factor": 1.5}, "partial_rotary_factor=1.5 is invalid: it "
                                                   "must be at most 1"),
    ("tiny-llama", {"eos_token_id": "2"}, "eos_token_id='2' is invalid: it must be a token id"),
    ("tiny-llama", {"eos_token_id": [2, -1]}, r"eos_token_id=\[2, -1\] is invalid"),
    ("tiny-llama", {"bos_token_id": [1]}, r"bos_token_id=\[1\] is invalid"),
    ("tiny-mixtral", {"num_local_experts": None}, "num_local_experts is missing"),
    ("tiny-mixtral", {"num_local_experts": 0}, "num_local_experts=0 is invalid"),
    ("tiny-qwen2-moe", {"num_experts": -1}, "num_experts=-1 is invalid: it must be an integer "
                                             ">= 0"),
    ("tiny-qwen2-moe", {"moe_intermediate_size": None}, "moe_intermediate_size is missing"),
    ("tiny-mixtral", {"num_experts_per_tok": 9}, "num_experts_per_tok=9 is invalid: it must be "
                                                 "at most the 4 experts"),
    ("tiny-llama", {"tie_word_embeddings": "no"}, "tie_word_embeddings='no' is invalid: it must "
                                                  "be true or false"),
    ("tiny-llama", {"hidden_act": "gelu"}, "hidden_act='gelu' is invalid: shardline supports silu"),
    ("tiny-llama", {"partial_rotary_factor": 0.3}, "partial_rotary_factor=0.3 is invalid: it "
                                                   "rotates 9 of the head's 32 dims, which must be "
                                                   "even and at least 2"),
    ("tiny-llama", {"partial_rotary_factor": 0.01}, "partial_rotary_factor=0.01 is invalid: it "
                                                    "rotates 0 of"),
    ("tiny-qwen2-moe", {"decoder_sparse_step": 0}, "decoder_sparse_step=0 is invalid: it must be "
                                                   "an integer >= 1"),
    ("tiny-qwen2-moe", {"mlp_only_layers": "0"}, "mlp_only_layers='0' is invalid: it must be a "
                                                 "list of layer indices below num_hidden_layers=3"),
    ("tiny-qwen2-moe", {"mlp_only_layers": [0, 3]}, r"mlp_only_layers=\[0, 3\] is invalid"),
    ("tiny-qwen2", {"use_sliding_window": 1}, "use_sliding_window=1 is invalid"),
    ("tiny-llama", {"rope_scaling": "linear"}, "rope_scaling='linear' is invalid: it must be an "
                                               "object"),
    ("tiny-llama", {"rope_parameters": [10000.0]}, r"rope_parameters=\[10000.0\] is invalid"),
    ("tiny-llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     "rope_scaling=.* is invalid: its type 'yarn' is not supported: use one of default, llama3"),
    ("tiny-llama", {"rope_parameters": {"rope_type": "linear", "factor": 2.0}},
     "rope_parameters=.* is invalid: its type 'linear' is not supported"),
    ("tiny-llama3", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                      "low_freq_factor": 0}},
     "rope_scaling=.* is invalid: llama3 scaling needs low_freq_factor, high_freq_factor, "
     "original_max_position_embeddings as positive numbers"),
    ("tiny-llama3", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2,
                                      "high_freq_factor": 2,
                                      "original_max_position_embeddings": 64}},
     "rope_scaling=.* is invalid: llama3 scaling needs low_freq_factor != high_freq_factor"),
])
def test_a_config_the_model_cannot_be_built_from_is_named(tmp_path, preset, changes, error):
    path = _config_with(tmp_path, preset, **changes)
    with pytest.raises(ValueError, match=f"{re.escape(path)}: {error}"):
        read_model_info(str(tmp_path))


@pytest.mark.parametrize("text, error", [("{not json", "is not valid JSON"),
                                         ("[1, 2]", "holds a JSON list, not an object")])
def test_a_config_that_is_not_a_json_object_is_named(tmp_path, text, error):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=error):
        read_model_info(str(tmp_path))


@pytest.mark.parametrize("changes, error", [
    ({"rope_theta": 0}, "rope_theta=0 is invalid"),
    ({"hidden_act": "gelu_pytorch_tanh"}, "hidden_act='gelu_pytorch_tanh' is invalid"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "its type 'yarn' is not supported"),
])
def test_a_bad_config_is_refused_before_any_worker_starts(tmp_path, no_spawn, changes, error):
    for name in os.listdir(resolve_model("tiny-llama")):
        os.symlink(f"{resolve_model('tiny-llama')}/{name}", tmp_path / name)
    (tmp_path / "config.json").unlink()
    _config_with(tmp_path, "tiny-llama", **changes)
    with pytest.raises(ValueError, match=error):
        LLM(str(tmp_path), tensor_parallel_size=2, device="cpu")


def test_an_index_naming_an_absent_shard_is_named(tmp_path):
    src = resolve_model("tiny-llama")
    for name in os.listdir(src):
        if name != "model-00002-of-00002.safetensors":
            shutil.copy(f"{src}/{name}", tmp_path / name)
    with pytest.raises(FileNotFoundError, match="names 'model-00002-of-00002.safetensors', "
                                                "which is not in"):
        load_model(str(tmp_path), torch.float32, "cpu")


@pytest.mark.parametrize("field, value", [("eos_token_id", "x"), ("eos_token_id", [2, None]),
                                          ("bos_token_id", -1), ("bos_token_id", [1])])
def test_a_bad_token_id_in_generation_config_is_named(tmp_path, field, value):
    _single_file_copy(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({field: value}))
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path))}/generation_config.json: "
                                         f"{field}={re.escape(repr(value))} is invalid: it must "
                                         "be a token id"):
        read_model_info(str(tmp_path))


def test_a_model_directory_this_user_cannot_read_is_named(tmp_path):
    """Not 'has no config.json', which sent the user looking for a file that is there. (A
    user whose privileges read any file, such as root, cannot meet this error.)"""
    _single_file_copy(tmp_path)
    tmp_path.chmod(0)
    try:
        if os.access(tmp_path, os.R_OK | os.X_OK):
            pytest.skip("this user reads a directory of mode 000")
        with pytest.raises(PermissionError, match=f"model directory '{re.escape(str(tmp_path))}' "
                                                  "cannot be read by this user \\(mode 0\\)"):
            read_model_info(str(tmp_path))
    finally:
        tmp_path.chmod(0o755)


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_config_json_that_is_not_a_file_is_named(tmp_path, kind):
    """Not 'has no config.json' (and not an IsADirectoryError, which the CLI counts as an
    internal error rather than bad input)."""
    if kind == "directory":
        (tmp_path / "config.json").mkdir()
    else:
        os.mkfifo(tmp_path / "config.json")
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path))}/config.json is not a "
                                         "regular file"):
        read_model_info(str(tmp_path))


def test_a_config_json_linking_to_nothing_is_named(tmp_path, rng):
    """A Hugging Face cache whose blobs were deleted: not 'has no config.json'."""
    target = str(tmp_path / "blobs" / f"{rng.getrandbits(64):016x}")
    os.symlink(target, tmp_path / "config.json")
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path))}/config.json is a symbolic "
                                         f"link to '{re.escape(target)}', which does not exist"):
        read_model_info(str(tmp_path))


def test_a_config_json_in_a_loop_or_chain_of_links_is_named(tmp_path, rng):
    """A loop of links, or a chain whose last link names nothing, was reported as a link
    to its first target 'which does not exist' (that target exists: it is a link)."""
    hop = tmp_path / f"hop-{rng.getrandbits(32):08x}"
    os.symlink(hop.name, tmp_path / "config.json")
    os.symlink("config.json", hop)
    with pytest.raises(ValueError, match=f"config.json is a symbolic link to '{hop.name}': a "
                                         "loop of symbolic links$"):
        read_model_info(str(tmp_path))
    hop.unlink()
    missing = tmp_path / "blobs" / f"{rng.getrandbits(64):016x}"
    os.symlink(missing, hop)
    with pytest.raises(ValueError, match=f"link to '{hop.name}', whose chain of links ends at "
                                         f"'{re.escape(os.path.realpath(missing))}', which does "
                                         "not exist"):
        read_model_info(str(tmp_path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root reaches every file")
def test_a_config_json_linking_where_this_user_cannot_reach_is_a_permission_error(tmp_path,
                                                                                    rng):
    """A cache's blobs in a directory this user cannot enter: not 'does not exist'."""
    blobs = tmp_path / f"blobs-{rng.getrandbits(32):08x}"
    blobs.mkdir()
    (blobs / "config.json").write_text("{}")
    os.symlink(blobs / "config.json", tmp_path / "config.json")
    blobs.chmod(0)
    try:
        with pytest.raises(PermissionError, match="which this user cannot reach"):
            read_model_info(str(tmp_path))
    finally:
        blobs.chmod(0o700)


def test_a_null_partial_rotary_factor_rotates_the_whole_head(tmp_path):
    """null is the default (1), as for the other optional fields; building the model
    raised a TypeError (an int times None)."""
    tensors = _single_file_copy(tmp_path)
    save_file(tensors, tmp_path / "model.safetensors")
    config = json.load(open(tmp_path / "config.json"))
    config["partial_rotary_factor"] = None
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_model(str(tmp_path), torch.float32, "cpu", max_position=64)
    assert model.model.layers[0].self_attn.rotary_emb.cos_sin_cache.shape == (64, 32)


@pytest.mark.parametrize("field", ["rope_theta", "rms_norm_eps", "max_position_embeddings"])
def test_a_null_optional_size_takes_its_default(tmp_path, field):
    """As when the field is absent; a null one raised TypeError (float() of None, or
    None compared with an int) while loading or at the first forward."""
    tensors = _single_file_copy(tmp_path)
    save_file(tensors, tmp_path / "model.safetensors")
    config = json.load(open(tmp_path / "config.json"))
    config.pop(field)
    (tmp_path / "config.json").write_text(json.dumps(config))
    results = []
    for value in ("absent", None):
        if value is None:
            config[field] = None
            (tmp_path / "config.json").write_text(json.dumps(config))
        with LLM(str(tmp_path), max_model_len=64) as llm:
            out, = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4))
        results.append((read_model_info(str(tmp_path)), out.outputs[0].token_ids))
    assert results[1] == results[0]


def test_a_null_required_size_is_named(tmp_path):
    path = _config_with(tmp_path, "tiny-llama")
    config = json.load(open(path))
    config["vocab_size"] = None
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"{re.escape(path)}: vocab_size is null "
                                         r"\(LlamaForCausalLM needs it\)"):
        read_model_info(str(tmp_path))


def test_model_info_of_sharded_preset():
    info = read_model_info(resolve_model("tiny-llama"))
    assert (info.architecture, info.eos_token_ids, info.bos_token_id) == \
        ("LlamaForCausalLM", [2], 1)
    assert (info.num_attention_heads, info.num_key_value_heads, info.head_dim) == (4, 2, 32)


def test_eos_ids_merge_config_and_generation_config(tmp_path):
    _single_file_copy(tmp_path)
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
    _single_file_copy(tmp_path, "tiny-mistral")
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
    tensors = _single_file_copy(tmp_path)
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
    _single_file_copy(tmp_path)
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
    tensors = _single_file_copy(tmp_path)
    name = rng.choice(sorted(tensors))
    tensors[name] = tensors[name].to(dtype)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=f"model.safetensors: tensor '{re.escape(name)}' is "
                                         f"{re.escape(str(dtype))}, expected one of "
                                         "torch.float32, .*quantized checkpoints"):
        load_model(str(tmp_path), torch.float32, "cpu")


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16, torch.float64])
def test_a_checkpoint_stored_in_another_float_type_loads_as_float32(tmp_path, stored):
    tensors = {name: t.to(stored) for name, t in _single_file_copy(tmp_path).items()}
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
    _config_with(tmp_path, "tiny-qwen2", num_hidden_layers=used)
    with caplog.at_level(logging.WARNING, logger="shardline.models.loader"):
        load_model(str(tmp_path), torch.float32, "cpu")
    beyond = f"{used}-{held - 1}" if held - used > 1 else f"{used}"
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path}/model.safetensors holds decoder layers {beyond} beyond config.json's "
        f"num_hidden_layers={used}: they are not loaded. Is config.json the checkpoint's own?"]


def test_a_pytorch_pickle_checkpoint_is_named(tmp_path):
    """A directory with pytorch_model.bin and no safetensors was only 'has no
    *.safetensors'; it now says the .bin is not loaded and what to do."""
    torch.save(_single_file_copy(tmp_path), tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="has no \\*.safetensors; it has "
                                                "pytorch_model.bin, a PyTorch pickle, which "
                                                "shardline does not load: convert"):
        load_model(str(tmp_path), torch.float32, "cpu")
