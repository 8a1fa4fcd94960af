"""The command line: demo and generate run end to end on a preset; bad input is an error."""

import argparse
import json
import os
import re
import subprocess
import sys

import pytest

from shardline.cli import build_parser, main
from shardline.engine import llm as llm_module
from shardline.presets import preset_names, resolve_model


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


def test_a_prompt_too_long_for_the_model_names_the_flag(capsys, rng):
    limit = rng.randint(16, 64)
    prompt = "".join(rng.choice("abcdefgh") for _ in range(3 * limit))
    assert main(["generate", "--model", "tiny-llama", "-p", prompt, "--max-model-len",
                 str(limit)]) == 2
    [error] = [line for line in capsys.readouterr().err.splitlines()
               if line.startswith("shardline generate: error:")]
    assert f"longer than --max-model-len={limit}" in error and "max_model_len" not in error


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["demo", "--model", "no-such-preset", "--num-prompts", "1"]) == 2
    assert "no-such-preset" in capsys.readouterr().err


def test_bad_sampling_flag_is_a_clear_error(capsys):
    assert main(["generate", "--model", "tiny-llama", "-p", "x", "--top-p", "1.5"]) == 2
    assert "--top-p 1.5 is invalid: must be in (0, 1]" in capsys.readouterr().err


def _subparsers() -> dict:
    parser = build_parser()
    choices = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"shardline": parser, **choices.choices}


def test_help_names_every_preset(capsys):
    """README: `shardline COMMAND --help` lists the presets; plan's named none."""
    for command in SUBCOMMANDS:
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0
        text = "".join(capsys.readouterr().out.split())   # argparse wraps at hyphens
        assert all(name in text for name in preset_names()), command
    assert all(name in build_parser().format_help() for name in preset_names())


def test_every_flag_has_help():
    """A help of its default alone ("(default: 1)", plan's --nodes) says nothing of what
    the flag is."""
    missing = [f"{command} {action.option_strings}"
               for command, parser in _subparsers().items() for action in parser._actions
               if action.option_strings
               and not re.sub(r"\(default: [^)]*\)", "", action.help or "").strip()]
    assert missing == []


@pytest.mark.parametrize("model", ["meta-llama/Llama-3.1-8B", "no-such-preset"])
def test_model_that_is_neither_directory_nor_preset_is_one_clear_line(model, tmp_path,
                                                                      monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--model", model, "-p", "x"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, lines
    assert repr(model) in lines[0] and "local checkpoints" in lines[0]
    assert "tiny-llama" in lines[0]


def test_a_file_given_for_a_model_directory_is_named_as_a_file(tmp_path, capsys):
    """It was 'neither a directory, a .gguf file nor a preset', hiding that the path exists."""
    (tmp_path / "config.json").write_text("{}")
    assert main(["generate", "--model", str(tmp_path / "config.json"), "-p", "x"]) == 2
    assert capsys.readouterr().err.startswith(
        f"shardline generate: error: --model {str(tmp_path / 'config.json')!r} is a file, not "
        f"a model directory, and not named *.gguf (is the model directory {str(tmp_path)!r}?)")


@pytest.mark.parametrize("error, code", [(RuntimeError("worker 1 died:\n  exit code -9"), 1),
                                         (KeyError("layers.3"), 1),
                                         (OSError("disk full"), 1),
                                         (PermissionError("/m/tokenizer.json cannot be read by "
                                                          "this user (mode 0)"), 2),
                                         (ValueError("max_tokens=0 must be >= 1"), 2)])
def test_any_error_is_one_line_and_nonzero(error, code, monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise error
    monkeypatch.setattr(llm_module, "LLM", fail)
    assert main(["demo", "--model", "tiny-llama"]) == code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert errors == [errors[0]] and errors[0].startswith("shardline demo: error: ")
    assert "Traceback" not in err
    assert " ".join(str(error).split()) in errors[0]
    if code == 1:
        assert type(error).__name__ in errors[0]


def test_a_missing_optional_package_is_named_with_what_to_install(monkeypatch, capsys):
    """bench --url needs httpx, which no extra but test installs: the error was
    "ModuleNotFoundError: No module named 'httpx'", without what to run."""
    monkeypatch.setitem(sys.modules, "httpx", None)   # its import now fails
    assert main(["bench", "-m", "tiny-llama", "--mode", "online", "--url",
                 "http://127.0.0.1:9", "--num-prompts", "1", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("shardline bench: error: "), err
    assert err.rstrip().endswith("; this command needs it: pip install httpx"), err


def test_a_model_this_user_cannot_read_is_bad_input(tmp_path, capsys):
    """A PermissionError was counted an internal error (exit 1, its class name shown). (A
    user whose privileges read any file, such as root, cannot meet this error.)"""
    source = resolve_model("tiny-llama")
    for name in os.listdir(source):
        os.symlink(os.path.join(source, name), tmp_path / name)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "tokenizer.json").chmod(0)
    if os.access(tmp_path / "tokenizer.json", os.R_OK):
        pytest.skip("this user reads a file of mode 000")
    assert main(["generate", "--model", str(tmp_path), "-p", "x"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"shardline generate: error: {tmp_path / 'tokenizer.json'} cannot be read by this "
        "user (mode 0)")


def test_traceback_flag_lets_the_error_through(monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("boom")
    monkeypatch.setattr(llm_module, "LLM", fail)
    with pytest.raises(RuntimeError, match="boom"):
        main(["--traceback", "demo", "--model", "tiny-llama"])


def test_layout_flags_reach_the_engine(engine_kwargs):
    def given(*names):
        return tuple(engine_kwargs[name] for name in names)

    assert main(["generate", "--model", "tiny-llama", "-p", "x", "-dp", "2", "-tp", "2",
                 "-pp", "3", "-sp", "4", "--enable-expert-parallel"]) == 2
    assert given("data_parallel_size", "tensor_parallel_size", "pipeline_parallel_size",
                 "sequence_parallel_size", "enable_expert_parallel") == (2, 2, 3, 4, True)
    main(["generate", "--model", "tiny-llama", "-p", "x"])
    assert given("data_parallel_size", "sequence_parallel_size", "enable_expert_parallel",
                 "ray_address") == (1, 1, False, None)
    main(["generate", "--model", "tiny-llama", "-p", "x", "--distributed-executor-backend",
          "ray", "--ray-address", "auto"])
    assert given("distributed_executor_backend", "ray_address") == ("ray", "auto")


@pytest.mark.parametrize("flags, expected", [([], None), (["--async-scheduling"], True),
                                              (["--no-async-scheduling"], False)])
def test_async_scheduling_flag_reaches_the_engine(flags, expected, engine_kwargs):
    assert main(["generate", "--model", "tiny-llama", "-p", "x", *flags]) == 2
    assert engine_kwargs["async_scheduling"] is expected


@pytest.mark.parametrize("command, flags, named", [
    ("generate", ["--temperature", "-1"], "--temperature -1.0 is invalid: must be 0 (greedy)"),
    ("generate", ["--top-k", "-5"], "--top-k -5 is invalid: must be -1 (disabled) or"),
    ("generate", ["--top-p", "1.5"], "--top-p 1.5 is invalid: must be in (0, 1]"),
    ("generate", ["-n", "5000"], "-n 5000 is invalid: must be an integer from 1 to 4096"),
    ("generate", ["-n", "3", "--seed", str(2**64 - 2)],
     f"--seed {2**64 - 2} is invalid: must be None or an integer from -2**63 to 2**64 - 3"),
    ("chat", ["--temperature", "-0.5"], "--temperature -0.5 is invalid: must be 0 (greedy)"),
])
def test_sampling_flags_are_checked_before_the_model_loads(command, flags, named, no_model_load,
                                                          capsys):
    """Each is named by its flag; the error named the SamplingParams field
    ("SamplingParams.top_p=1.5"), which the command line has no such name for."""
    model = ["-m", "tiny-llama"] + (["-p", "x"] if command == "generate" else ["--message", "x"])
    assert main([command, *model, *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"shardline {command}: error: {named}") and "loading" not in err


@pytest.mark.parametrize("command, flag", [("demo", "--num-prompts"), ("demo", "--max-tokens"),
                                           ("generate", "--max-tokens"), ("generate", "-n"),
                                           ("chat", "--max-tokens")])
@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_counts_below_one_are_refused_by_flag(command, flag, value, no_model_load, capsys):
    extra = ["-p", "x"] if command == "generate" else []
    with pytest.raises(SystemExit) as done:
        main([command, "-m", "tiny-llama", *extra, flag, value])
    assert done.value.code == 2
    assert f"argument {flag}: {value!r} is invalid: must be an integer >= 1" in \
        capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["no-such-command"], ["demo", "--max-tokens", "0"],
                                  ["generate", "-m", "tiny-llama"], ["chat", "--no-such-flag"],
                                  ["bench", "--mode", "sideways"], ["serve", "--port", "http"],
                                  ["plan", "--nodes", "0"]])
def test_a_bad_command_line_is_one_line_naming_the_help(argv, no_model_load, capsys):
    """README promises one line for any error; argparse's own (a missing, unknown or bad
    flag) printed the command's usage first, 20 lines above the message."""
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    prog = " ".join(["shardline", *argv[:1]]) if argv[:1] != ["no-such-command"] else "shardline"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: "), err
    listed = "commands" if prog == "shardline" else "flags"
    assert err.endswith(f"({prog} --help lists the {listed})\n")


def test_version_flag_and_attribute_agree(capsys):
    import importlib.metadata

    import shardline

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.split() == ["shardline", shardline.__version__]
    assert shardline.__version__ == importlib.metadata.version("shardline")


@pytest.mark.parametrize("command, flag, default", [
    ("demo", "--max-model-len", "(default: 1024, or the model's limit if lower)"),
    ("chat", "--max-model-len", "(default: 4096, or the model's limit if lower)"),
    ("generate", "--max-num-seqs", "(default: the completions asked for, prompts x n, at most "
                                   "64)")])
def test_a_flag_whose_default_the_command_changes_says_so(command, flag, default, capsys):
    """demo and chat default --max-model-len to their own context, and generate caps
    --max-num-seqs, but those flags' help gave the engine's defaults (the model's limit;
    64)."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"{flag} {flag.lstrip('-').replace('-', '_').upper()} " in text
    described = text.split(f"{flag} {flag.lstrip('-').replace('-', '_').upper()} ")[-1]
    assert described.split(" --")[0].endswith(default), described[:300]


def test_a_required_model_flag_shows_no_default(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(required)" in text and "(default: None)" not in text


def test_a_model_directory_without_a_config_is_bad_input(tmp_path, capsys):
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert main(["generate", "-m", str(tmp_path), "-p", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"shardline generate: error: model directory '{tmp_path}' has no config.json"


_PARSE_ONLY = """
import contextlib, io, json, sys
from shardline.cli import main
runs = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
            code = "returned"
        except SystemExit as done:
            code = done.code
    runs.append([code, out.getvalue(), err.getvalue()])
heavy = sorted(name for name in sys.modules if name.split(".")[0] == "torch")
print(json.dumps([runs, heavy]))
"""
SUBCOMMANDS = ("demo", "generate", "chat", "bench", "serve", "plan")


def test_help_and_bad_flags_answer_without_importing_torch():
    """--help and argparse errors need only the parsers, and building them imports no
    torch: it alone takes seconds to load, which the user would wait for every time."""
    helps = [["--help"]] + [[command, "--help"] for command in SUBCOMMANDS]
    bad = [["generate", "--no-such-flag"], ["plan", "--nodes", "0"], ["no-such-command"]]
    done = subprocess.run([sys.executable, "-c", _PARSE_ONLY, json.dumps(helps + bad)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    runs, heavy = json.loads(done.stdout.strip().splitlines()[-1])
    assert heavy == []
    assert [code for code, _, _ in runs] == [0] * len(helps) + [2] * len(bad)
    top_help = runs[0][1]
    assert all(command in top_help for command in SUBCOMMANDS)
    assert all(f"usage: shardline {command}" in out
               for (_, out, _), command in zip(runs[1:], SUBCOMMANDS))
    assert all(err.strip() for _, _, err in runs[len(helps):])


_OPENMP = """
import os, sys
from shardline import cli
try:
    cli.main(["plan", "--help"])
except SystemExit:
    pass
print(os.environ.get("GOMP_SPINCOUNT"), os.environ.get("OMP_WAIT_POLICY"), "torch" in sys.modules)
"""


@pytest.mark.parametrize("chosen, expected", [
    ({}, ["10000", "None"]), ({"GOMP_SPINCOUNT": "5"}, ["5", "None"]),
    ({"OMP_WAIT_POLICY": "ACTIVE"}, ["None", "ACTIVE"])])
def test_commands_shorten_openmp_spinning_unless_the_user_chose(chosen, expected):
    """The spin count must be in the environment before torch loads OpenMP, and a user's
    own spin count or wait policy stays as it is."""
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    done = subprocess.run([sys.executable, "-c", _OPENMP], env={**env, **chosen},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.split()[-3:] == [*expected, "False"]


def test_python_dash_m_shardline_is_the_command():
    """`python -m shardline` said "No module named shardline.__main__", for users whose
    console script is not on PATH (a venv not activated)."""
    version = subprocess.run([sys.executable, "-m", "shardline", "--version"],
                             capture_output=True, text=True, timeout=120)
    assert version.returncode == 0, version.stderr
    assert version.stdout.startswith("shardline ")
    bad = subprocess.run([sys.executable, "-m", "shardline", "generate", "-m", "no/such/dir",
                          "-p", "x"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.startswith("shardline generate: error: --model 'no/such/dir' is not a "
                                 "preset, and no file or directory exists at that path;")


@pytest.mark.parametrize("given", [None, 3])
def test_generate_sizes_its_cache_for_the_completions_it_asks_for(given, rng, engine_kwargs):
    """It kept the engine's 64 sequences whatever it asked: SmolLM2 got a 4 GiB KV cache
    for one prompt (8.3 s and 5.1 GB resident; sized for one sequence, 3.7 s and 1.3 GB)."""
    prompts, n = rng.randint(1, 6), rng.randint(1, 4)
    flags = [] if given is None else ["--max-num-seqs", str(given)]
    assert main(["generate", "-m", "tiny-llama", *["-p", "x"] * prompts, "-n", str(n),
                 *flags]) == 2
    assert engine_kwargs["max_num_seqs"] == min(64 if given is None else given, prompts * n)


@pytest.mark.parametrize("command", ["demo", "generate", "chat", "bench"])
def test_a_bad_dtype_is_refused_by_its_flag_before_the_model_loads(command, rng, no_model_load,
                                                                    capsys):
    """--dtype took any string: the engine refused it after 'loading ...' was printed,
    naming the EngineArgs field (dtype=...), not the flag."""
    bad = rng.choice(["float64", "int8", "fp8", "bfloat", "Auto32"]) + str(rng.randint(0, 9))
    extra = {"generate": ["-p", "x"], "chat": ["--message", "x"]}.get(command, [])
    with pytest.raises(SystemExit) as caught:
        main([command, "-m", "tiny-llama", *extra, "--dtype", bad])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --dtype: {bad!r} is not a dtype: use auto, float32" in err
    assert "loading" not in err


@pytest.mark.parametrize("name", ["auto", "AUTO", "float32", "fp32", "BF16", "half"])
def test_every_dtype_name_the_engine_takes_passes_the_flag(name):
    from shardline.engine.cli_args import dtype_arg

    assert dtype_arg(name) == name


def test_a_layout_the_model_cannot_take_is_named_by_its_flag(capsys):
    """The engine names its options as LLM's keyword arguments (tensor_parallel_size=3);
    the command names them as the flags the user typed."""
    assert main(["generate", "-m", "tiny-llama", "-p", "x", "-tp", "3"]) == 2
    err = capsys.readouterr().err
    assert "--tensor-parallel-size=3 does not divide" in err
    assert "tensor_parallel_size" not in err


def test_engine_errors_name_every_engine_flag_and_nothing_else(rng, monkeypatch, capsys):
    size, layers = rng.randint(2, 9), [rng.randint(1, 5) for _ in range(rng.randint(2, 4))]
    message = (f"pipeline_parallel_size={size} and pipeline_stage_layers={layers} disagree; "
               f"SamplingParams.n={size} and top_p={size} are not engine options")

    def fail(*args, **kwargs):
        raise ValueError(message)
    monkeypatch.setattr(llm_module, "LLM", fail)
    assert main(["generate", "-m", "tiny-llama", "-p", "x"]) == 2
    err = capsys.readouterr().err
    assert (f"--pipeline-parallel-size={size} and --pipeline-stage-layers={layers} disagree; "
            f"SamplingParams.n={size} and top_p={size} are not engine options") in err
