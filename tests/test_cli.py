"""The command line: demo and generate run end to end on a preset; bad input is an error."""

import json

import pytest

from shardline.cli import main


def test_demo_prints_outputs_and_throughput(capsys):
    assert main(["demo", "--model", "tiny-llama", "--num-prompts", "3", "--max-tokens", "4",
                 "--enforce-eager"]) == 0
    out = capsys.readouterr().out
    assert out.count("prompt: ") == 3
    assert "12 output tokens" in out and "tokens/s" in out


def test_generate_prints_one_json_line_per_completion(capsys):
    assert main(["generate", "--model", "tiny-llama", "-p", "hello", "-p", "world",
                 "--max-tokens", "5", "-n", "2", "--temperature", "0.8", "--seed", "3"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["prompt"], line["index"]) for line in lines] == [
        ("hello", 0), ("hello", 1), ("world", 0), ("world", 1)]
    assert all(line["finish_reason"] in ("length", "stop") for line in lines)


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["demo", "--model", "no-such-preset", "--num-prompts", "1"]) == 2
    assert "no-such-preset" in capsys.readouterr().err


def test_bad_sampling_flag_is_a_clear_error(capsys):
    assert main(["generate", "--model", "tiny-llama", "-p", "x", "--top-p", "1.5"]) == 2
    assert "top_p" in capsys.readouterr().err
