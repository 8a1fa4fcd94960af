import multiprocessing as mp
import os
import re

import pytest
from safetensors import safe_open

from shardline import presets
from shardline.presets import PRESETS, byte_tokenizer, preset_dir, resolve_model


def test_contract_presets_exist():
    assert {"tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-mixtral", "tiny-qwen2-moe",
            "small-llama"} <= set(PRESETS)


def test_unknown_name_lists_presets():
    with pytest.raises(ValueError, match="no-such-model.*tiny-llama.*small-llama"):
        resolve_model("no-such-model")


def test_existing_path_is_returned(tmp_path):
    assert resolve_model(str(tmp_path)) == str(tmp_path)


def test_a_file_that_is_not_gguf_is_named_as_a_file(tmp_path, rng):
    """It was 'neither an existing directory, a .gguf file nor a preset', which hid that the
    path was there: a checkpoint's config.json or weights given for its directory."""
    name = rng.choice(["config.json", "model.safetensors", "model.bin"])
    (tmp_path / name).write_bytes(rng.randbytes(rng.randint(0, 64)))
    with pytest.raises(ValueError, match=re.escape(
            f"model={str(tmp_path / name)!r} is a file, not a model directory, and not named "
            f"*.gguf (is the model directory {str(tmp_path)!r}?)")):
        resolve_model(str(tmp_path / name))


def test_a_link_to_nothing_and_a_fifo_are_named(tmp_path, rng):
    """Both were 'neither an existing directory, a .gguf file nor a preset'."""
    target = str(tmp_path / f"gone-{rng.getrandbits(32):08x}")
    os.symlink(target, tmp_path / "link")
    with pytest.raises(ValueError, match=re.escape(
            f"model={str(tmp_path / 'link')!r} is a symbolic link to {target!r}, which does "
            "not exist: expected a model directory")):
        resolve_model(str(tmp_path / "link"))
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ValueError, match=re.escape(
            f"model={str(tmp_path / 'fifo')!r} is neither a directory nor a file: expected")):
        resolve_model(str(tmp_path / "fifo"))


def test_a_path_under_home_is_expanded_as_a_shell_would(tmp_path, monkeypatch, rng):
    """'~/models/x' given from Python was refused as no directory (only the command line's
    shell expanded it); a path of that very name, where one exists, is kept."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    model = tmp_path / "home" / f"model-{rng.randrange(10**6)}"
    model.mkdir(parents=True)
    assert resolve_model(f"~/{model.name}") == str(model)
    with pytest.raises(ValueError, match=re.escape(
            f"model='~/{model.name}x' is not a preset, and no file or directory exists at that "
            f"path ('~/{model.name}x' expanded to {str(model) + 'x'!r})")):
        resolve_model(f"~/{model.name}x")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "~" / model.name).mkdir(parents=True)
    assert resolve_model(f"~/{model.name}") == f"~/{model.name}"


def _build(cache: str, name: str) -> str:
    os.environ["SHARDLINE_CACHE"] = cache
    return resolve_model(name)


def test_concurrent_builds_are_deterministic_and_safe(tmp_path, monkeypatch):
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        paths = pool.starmap_async(_build, [(str(tmp_path), "tiny-mixtral")] * 2).get(timeout=120)
    assert paths[0] == paths[1] and os.path.isdir(paths[0])
    assert [p for p in os.listdir(tmp_path / "presets") if p.startswith(".")] == []
    monkeypatch.setenv("SHARDLINE_CACHE", str(tmp_path / "again"))
    rebuilt = resolve_model("tiny-mixtral")
    for f in ("model.safetensors", "config.json", "tokenizer.json"):
        assert open(f"{paths[0]}/{f}", "rb").read() == open(f"{rebuilt}/{f}", "rb").read()


def test_sharded_and_fused_layouts():
    llama = resolve_model("tiny-llama")
    assert os.path.isfile(f"{llama}/model.safetensors.index.json")
    assert len([f for f in os.listdir(llama) if f.endswith(".safetensors")]) == 2
    with safe_open(f"{resolve_model('tiny-qwen2-moe')}/model.safetensors", "pt") as f:
        assert "model.layers.0.mlp.experts.gate_up_proj" in f.keys()
    with safe_open(f"{resolve_model('tiny-mixtral')}/model.safetensors", "pt") as f:
        assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in f.keys()


def test_byte_tokenizer_round_trips_text():
    tok = byte_tokenizer()
    text = "héllo wörld, 你好!\n"
    ids = tok.encode(text).ids
    assert len(ids) == len(text.encode()) and tok.decode(ids) == text
    assert tok.token_to_id("<s>") == presets.BOS_ID and tok.token_to_id("</s>") == presets.EOS_ID


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SHARDLINE_CACHE", str(tmp_path))
    assert preset_dir("tiny-llama").startswith(str(tmp_path))


@pytest.mark.parametrize("unusable", ["a-file", "under-a-file"])
def test_an_unwritable_cache_names_shardline_cache(unusable, tmp_path, monkeypatch):
    """It was the bare OSError of the folder it could not make (NotADirectoryError: exit 1
    from the command line), naming neither the cache nor the variable that moves it."""
    (tmp_path / "a-file").write_text("")
    chosen = str(tmp_path / "a-file") if unusable == "a-file" else str(tmp_path / "a-file" / "x")
    monkeypatch.setenv("SHARDLINE_CACHE", chosen)
    with pytest.raises(ValueError, match=re.escape(
            f"cannot write the cache folder {os.path.join(chosen, 'presets')!r} (Not a "
            f"directory): set SHARDLINE_CACHE to a writable directory (it is {chosen!r})")):
        resolve_model("tiny-llama")
