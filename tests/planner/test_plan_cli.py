"""`shardline plan`: a table or JSON on stdout; bad values exit 2 with one line."""

import json
import multiprocessing
import os
import re
import shlex
import time

import pytest

from launcher import FORKS_ON_PURPOSE
from shardline.cli import main
from shardline.planner import command, profile
from shardline.planner.cluster import DeviceSpec, Link, profile_cluster


def test_table_lists_layouts_and_explains_the_pick(capsys):
    assert main(["plan", "-m", "llama-3-70b", "--nodes", "2", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "2 node(s) x 8 H100" in out and "NVLink 450 GB/s" in out
    rows = [line for line in out.splitlines() if line[:3].strip().isdigit()]
    assert len(rows) == 3
    assert "more valid layouts" in out
    pick = out.splitlines()[-1]
    assert pick.startswith("pick: ") and rows[0].split()[1] in pick


def test_the_header_rounds_the_links_and_the_pick_counts_its_devices(rng, capsys):
    """A profile's links printed as "2.36363 GB/s 183.969 us", and a pick of one device
    per replica as "each replica's 1 devices hold the model"."""
    bandwidth, latency = rng.uniform(1, 9.99), rng.uniform(100, 999)
    assert main(["plan", "-m", "small-llama", "--intranode-bandwidth-gbs", repr(bandwidth),
                 "--intranode-latency-us", repr(latency)]) == 0
    out = capsys.readouterr().out
    shown = re.search(r"NVLink (\S+) GB/s (\S+) us,", out).groups()
    for text, value in zip(shown, (bandwidth, latency)):
        assert len(text.replace(".", "")) <= 3 and float(text) == float(f"{value:.3g}"), out
    pick = out.splitlines()[-1]
    assert pick.startswith("pick: DP8: ") and "in each replica one device holds the model" in pick


def test_json_output(capsys):
    assert main(["plan", "-m", "small-llama", "--gpus-per-node", "4", "--batch", "16",
                 "--prompt-len", "64", "--output-len", "32", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["pick"] == data["layouts"][0]["layout"]
    tps = [x["throughput_tokens_per_s"] for x in data["layouts"]]
    assert tps == sorted(tps, reverse=True)
    names = {x["layout"] for x in data["layouts"]}
    assert "TP4" in names and "TP8" not in names
    assert {r["layout"] for r in data["rejected"]}.isdisjoint(names)
    first = data["layouts"][0]
    assert {"intranode_bytes", "internode_bytes", "intranode_time_s", "internode_time_s"} <= set(
        first["decode_step"])
    assert first["memory_per_device"]["kv_capacity_tokens"] > 0


def test_overrides_reach_the_cluster(capsys):
    assert main(["plan", "-m", "llama-3-8b", "--nodes", "2", "--gpus-per-node", "2",
                 "--gpu-memory-gb", "40", "--internode-bandwidth-gbs", "5",
                 "--internode-latency-us", "30", "--json"]) == 0
    cluster = json.loads(capsys.readouterr().out)["cluster"]
    assert cluster["device"]["memory_bytes"] == 40e9
    assert cluster["internode"]["bandwidth"] == 5e9
    assert cluster["internode"]["latency_s"] == pytest.approx(30e-6)
    assert cluster["intranode"]["name"] == "NVLink"


@pytest.mark.parametrize("argv,expected", [
    (["--nodes", "0"], "argument --nodes: 0 is invalid: must be >= 1"),
    (["--batch", "many"], "argument --batch: 'many' is not an integer"),
    (["--gpu-memory-gb", "-3"], "argument --gpu-memory-gb: -3 is invalid: must be > 0"),
    (["--gpu", "tpu"], "argument --gpu: invalid choice: 'tpu'"),
    (["--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization 1.5 is invalid"),
    (["-m", "no-such-model"], "model='no-such-model' is not a reference model"),
    (["--gpus-per-node", "1"], "no layout of llama-3-70b fits 1 devices of 80 GB"),
    (["--profile-file", "/nonexistent/profile.json"], "does not exist"),
])
def test_bad_values_exit_2_with_one_line(capsys, argv, expected):
    if "-m" not in argv:
        argv = ["-m", "llama-3-70b", *argv]
    assert _exit_code(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err


def _exit_code(argv: list[str]) -> int:
    """main's return value, or the code argparse exits with on a bad argument."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@pytest.mark.parametrize("text, expected", [
    ("{oops", "is not valid JSON"),
    (json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                 "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100}),
     "intermediate_size is missing"),
    (json.dumps({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 3, "vocab_size": 100}),
     "num_key_value_heads=3 is invalid: it must divide num_attention_heads=4"),
])
def test_a_bad_config_file_exits_2_naming_it(tmp_path, capsys, text, expected):
    path = tmp_path / "config.json"
    path.write_text(text)
    assert _exit_code(["plan", "-m", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and expected in err, err


def test_missing_model_is_an_error(capsys):
    assert main(["plan"]) == 2
    assert "--model is required" in capsys.readouterr().err


def test_profile_written_then_used(tmp_path, monkeypatch, capsys):
    device = DeviceSpec("CPU", 8e9, flops=5e10, memory_bandwidth=1e10, shared_by_ranks=True,
                        layer_host_s=1e-4)
    monkeypatch.setattr(profile, "measure_device", lambda: device)
    monkeypatch.setattr(profile, "measure_links", lambda: (Link(5e-6, 2e9, "shared memory"),
                                                           Link(2e-3, 5e8, "gloo")))
    monkeypatch.setattr(profile, "measure_core_sharing", lambda link: 7e-4)
    path = tmp_path / "profile.json"
    assert main(["plan", "--profile", "--profile-file", str(path)]) == 0
    printed = capsys.readouterr()
    assert [line.split(" ")[1] for line in printed.err.splitlines()] == ["1/3", "2/3", "3/3"]
    written, next_step = printed.out.strip().split("; plan with it: ")
    assert written == f"profile written to {path}"
    argv = shlex.split(next_step.replace("MODEL", "small-llama"))
    assert argv[:2] == ["shardline", "plan"]
    assert main([*argv[1:], "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["cluster"]["device"]["flops"] == 5e10
    assert data["cluster"]["device"]["shared_core_collective_s"] == 7e-4
    assert data["cluster"]["intranode"]["name"] == "shared memory"
    assert data["cluster"]["devices_per_node"] == profile.os.cpu_count()


def test_two_rank_fit_recovers_alpha_and_beta():
    alpha, beta = 7e-6, 3e9
    small, large = profile.SIZES
    link = profile._fit_two_rank_all_reduce(2 * alpha + small / beta, 2 * alpha + large / beta,
                                            "x")
    assert link.latency_s == pytest.approx(alpha) and link.bandwidth == pytest.approx(beta)
    in_layer = profile._fit_two_rank_all_reduce(2 * alpha + small / beta,
                                                2 * alpha + large / beta, "x", 2 * 1e-3)
    assert in_layer.latency_s == pytest.approx(1e-3 - small / beta / 2)
    assert in_layer.bandwidth == pytest.approx(beta)


@FORKS_ON_PURPOSE
def test_a_measuring_process_that_dies_fails_the_profile_at_once():
    ctx = multiprocessing.get_context("fork")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"measuring x failed: process 1 exited with code 3"):
        profile._spawn(ctx, lambda i, results: os._exit(3) if i else time.sleep(60), 2, 1,
                       (), "measuring x")
    assert time.monotonic() - start < 15


def test_core_sharing_is_measured_by_two_ranks_per_core():
    # The real measurement (a few seconds): ranks spawn, pin to the cores, all-reduce
    # between half layers; what a call costs beyond a free link is a sane time.
    cost = profile.measure_core_sharing(Link(0.0, 1e12, "free"))
    assert 0.0 <= cost < 0.05


def test_default_profile_path_is_in_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("SHARDLINE_CACHE", str(tmp_path))
    assert command.default_profile_path() == str(tmp_path / "profile.json")


def test_model_from_a_config_json_or_a_gguf_file(tmp_path, monkeypatch, capsys):
    from shardline.models import gguf
    from shardline.presets import PRESETS

    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps(dict(PRESETS["small-llama"],
                                                            num_attention_heads=12)))
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"GGUF")
    monkeypatch.setattr(gguf, "gguf_model_dir", lambda path: str(checkpoint))
    for source in (str(checkpoint), str(checkpoint / "config.json"), str(weights)):
        assert main(["plan", "-m", source, "--gpus-per-node", "8", "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["model"]["heads"] == 12
        names = {x["layout"] for x in data["layouts"]}
        assert "DP2xTP4" in names and names.isdisjoint({"TP8", "SP8"})


def test_the_model_preset_is_planned_from_its_gguf_config(tmp_path, monkeypatch, rng, capsys):
    """`plan -m smollm2-135m-instruct`, the demo's model, was refused as "not a reference
    model, a preset, ..." by an error whose list of presets left it out."""
    from shardline import presets
    from shardline.models import gguf
    from shardline.presets import PRESETS

    heads = rng.choice([3, 6, 9, 12])
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps(dict(
        PRESETS["small-llama"], num_attention_heads=heads, num_key_value_heads=3,
        torch_dtype="bfloat16")))
    weights = tmp_path / "SmolLM2.gguf"
    weights.write_bytes(b"GGUF")
    monkeypatch.setattr(presets, "fetch_model_preset", lambda name: str(weights))
    monkeypatch.setattr(gguf, "gguf_model_dir", lambda path: str(checkpoint))
    assert main(["plan", "-m", "smollm2-135m-instruct", "--json"]) == 0
    model = json.loads(capsys.readouterr().out)["model"]
    assert (model["name"], model["heads"], model["kv_heads"]) == (
        "smollm2-135m-instruct", heads, 3)


def test_an_unknown_model_error_lists_every_preset(capsys):
    from shardline.presets import preset_names

    assert main(["plan", "-m", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in preset_names()), err


def test_a_profile_without_the_host_constants_is_refused(tmp_path):
    old = {"device": {"name": "CPU", "memory_bytes": 8e9, "flops": 1e10,
                      "memory_bandwidth": 5e9, "op_overhead_s": 2e-5, "shared_by_ranks": True,
                      "cores": 2, "flops_per_core": 8e9},
           "intranode": {"latency_s": 1e-5, "bandwidth": 1e9, "name": "shared memory"},
           "devices_per_node": 2}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"lacks the device constants bandwidth_per_core, "
                       r"attention_bandwidth, step_host_s, .*shardline plan --profile"):
        profile_cluster(str(path), nodes=1, devices_per_node=None)
