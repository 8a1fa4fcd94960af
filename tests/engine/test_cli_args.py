"""The engine flags: each reaches its EngineArgs field, and nothing else does."""

import argparse
import random

import pytest

from shardline.engine.cli_args import add_engine_args, engine_kwargs, name_by_flags
from shardline.engine.engine_args import EngineArgs


pytestmark = pytest.mark.usefixtures("seeded_random")


def test_every_flag_reaches_its_engine_args_field_and_command_flags_do_not():
    parser = argparse.ArgumentParser()
    add_engine_args(parser, "tiny-llama")
    parser.add_argument("--seed", type=int)  # a command's sampling seed, not the engine's
    counts = {name: random.randint(1, 99) for name in
              ("max-num-seqs", "max-num-batched-tokens", "block-size", "max-model-len",
               "tensor-parallel-size", "pipeline-parallel-size", "data-parallel-size",
               "sequence-parallel-size")}
    argv = [f"--{name}={value}" for name, value in counts.items()]
    timeout = round(random.uniform(0.1, 900.0), 3)
    argv += ["--seed", str(random.randint(1, 99)), "--pipeline-stage-layers", "3,2",
             "--dtype", "bfloat16", "--device", "cpu", "--enforce-eager",
             "--no-async-scheduling", "--step-timeout-s", str(timeout)]
    kwargs = engine_kwargs(parser.parse_args(argv))
    args = EngineArgs(**kwargs)
    for name, value in counts.items():
        assert getattr(args, name.replace("-", "_")) == value
    assert args.pipeline_stage_layers == [3, 2] and args.dtype == "bfloat16"
    assert args.step_timeout_s == timeout
    assert args.enforce_eager and args.async_scheduling is False and args.device == "cpu"
    assert "seed" not in kwargs and args.seed == EngineArgs("x").seed


def test_naming_by_flags_renames_each_option_once_whatever_the_order():
    """A flag that ends in another option's flag (--kv-cache-dtype, --dtype) is not renamed
    again by the shorter one, in either order, and a name already a flag stays as it is."""
    parser = argparse.ArgumentParser()
    add_engine_args(parser, "tiny-llama")
    dests = list(parser.parse_args([]).engine_flags)
    short = random.choice([dest for dest in dests if "_" not in dest])  # its flag is --short
    long = f"{random.choice(['kv_cache', 'draft', 'speculative'])}_{short}"
    dests.insert(random.randrange(len(dests) + 1), long)
    random.shuffle(dests)
    value = random.randint(1, 99)
    flag = lambda dest: "--" + dest.replace("_", "-")  # noqa: E731
    message = f"{long}={value} conflicts with {short}={value + 1} ({flag(short)}={value})"
    assert name_by_flags(message, dests) == (
        f"{flag(long)}={value} conflicts with {flag(short)}={value + 1} "
        f"({flag(short)}={value})")


def test_naming_by_flags_leaves_the_values_alone():
    """An option's value may hold `name=`, a model directory such as /models/dtype=bf16
    or a repr'd string: it is the user's text and stays as it is."""
    parser = argparse.ArgumentParser()
    add_engine_args(parser, "tiny-llama")
    dests = parser.parse_args([]).engine_flags
    inner = random.choice(dests)
    path = f"/models/{inner}={random.randint(1, 99)}/weights"
    message = f"model={path!r} has no config.json; model='{inner}=x' (model={path})"
    assert name_by_flags(message, dests) == (
        f"--model={path!r} has no config.json; --model='{inner}=x' (--model={path})")


@pytest.mark.parametrize("text", ["0", "-1", "inf", "nan", "soon", ""])
def test_a_step_timeout_that_is_no_positive_number_of_seconds_is_refused(text, capsys):
    parser = argparse.ArgumentParser()
    add_engine_args(parser, "tiny-llama")
    with pytest.raises(SystemExit):
        parser.parse_args(["--step-timeout-s", text])
    assert f"argument --step-timeout-s: {text!r} is invalid: must be a number of seconds > 0" \
        in capsys.readouterr().err
