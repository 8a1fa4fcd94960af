import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from shardline.models.loader import load_model, read_model_info
from shardline.models.registry import MODEL_REGISTRY
from shardline.presets import resolve_model


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


def test_wrong_shape_is_named_with_both_shapes(tmp_path):
    tensors = _single_file_copy(tmp_path)
    tensors["model.layers.0.mlp.down_proj.weight"] = torch.zeros(128, 255)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.down_proj\.weight' has "
                                         r"shape \[128, 255\], expected \[128, 256\]"):
        load_model(str(tmp_path), torch.float32, "cpu")


def test_unknown_architecture_lists_supported(tmp_path):
    config = json.load(open(f"{resolve_model('tiny-llama')}/config.json"))
    config["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*not supported.*" +
                       ".*".join(MODEL_REGISTRY)):
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
