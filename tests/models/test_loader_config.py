"""Reading a checkpoint's config.json and generation_config.json: a config the model cannot
be built from, or a file that is not there as a file, is refused naming the file, the
field, its value and the rule, before any worker starts; null optional fields take their
defaults. Loading the weights themselves is in test_loader.py."""

import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import save_file

from checkpoint_copies import config_with, single_file_copy
from shardline import LLM, SamplingParams
from shardline.models.loader import load_model, read_model_info
from shardline.models.registry import MODEL_REGISTRY
from shardline.presets import resolve_model


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
    path = config_with(tmp_path, preset, **changes)
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
    config_with(tmp_path, "tiny-llama", **changes)
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
    single_file_copy(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({field: value}))
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path))}/generation_config.json: "
                                         f"{field}={re.escape(repr(value))} is invalid: it must "
                                         "be a token id"):
        read_model_info(str(tmp_path))


def test_a_model_directory_this_user_cannot_read_is_named(tmp_path):
    """Not 'has no config.json', which sent the user looking for a file that is there. (A
    user whose privileges read any file, such as root, cannot meet this error.)"""
    single_file_copy(tmp_path)
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
    tensors = single_file_copy(tmp_path)
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
    tensors = single_file_copy(tmp_path)
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
    path = config_with(tmp_path, "tiny-llama")
    config = json.load(open(path))
    config["vocab_size"] = None
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"{re.escape(path)}: vocab_size is null "
                                         r"\(LlamaForCausalLM needs it\)"):
        read_model_info(str(tmp_path))
