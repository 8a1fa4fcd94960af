"""Copies of a preset checkpoint's files to edit in a test (test_loader.py,
test_loader_config.py)."""

import json
import shutil

from safetensors.torch import load_file

from shardline.presets import resolve_model


def single_file_copy(tmp_path, name="tiny-qwen2"):
    """`name`'s config files copied into tmp_path, and its weights as one state dict."""
    src = resolve_model(name)
    for f in ("config.json", "generation_config.json"):
        shutil.copy(f"{src}/{f}", tmp_path / f)
    return load_file(f"{src}/model.safetensors")


def config_with(tmp_path, preset: str, **changes) -> str:
    """A copy of `preset`'s config.json with `changes` (None removes a field)."""
    config = json.load(open(f"{resolve_model(preset)}/config.json"))
    for field, value in changes.items():
        if value is None:
            config.pop(field, None)
        else:
            config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path / "config.json")
