"""`shardline bench` end to end on tiny-llama (offline and online, records and plot), and
the online runner's arrivals and Ctrl-C on a fake target."""

import asyncio
import json
import random
import statistics

import pytest

from shardline.benchmark.online import Counts, arrival_times, run_online
from shardline.benchmark.workload import Workload
from shardline.cli import main

COMMON = ["-m", "tiny-llama", "--device", "cpu", "--num-prompts", "6", "--prompt-len", "4,12",
          "--output-len", "2,6", "--no-progress", "--max-num-seqs", "8"]


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_results(results, num_prompts):
    assert results["finished_requests"] == results["requests"] == num_prompts
    assert not results["interrupted"]
    assert results["output_tokens_per_s"] == pytest.approx(
        results["output_tokens"] / results["elapsed_s"])
    assert results["total_tokens_per_s"] == pytest.approx(
        (results["input_tokens"] + results["output_tokens"]) / results["elapsed_s"])
    for key in ("ttft_s", "e2e_latency_s"):
        p = results[key]
        assert 0 <= p["p50"] <= p["p90"] <= p["p99"] <= results["elapsed_s"]
    assert results["ttft_s"]["p50"] <= results["e2e_latency_s"]["p99"]
    assert 0 < results["peak_kv_usage"] <= 1
    assert results["preemptions"] == 0


def test_offline_run_appends_a_record_and_draws_the_plot(tmp_path, capsys):
    out = tmp_path / "runs.jsonl"
    assert main(["bench", *COMMON, "--seed", "3", "--out", str(out)]) == 0
    [record] = records(out)
    assert record["mode"] == "offline" and record["target"] == "tiny-llama"
    assert record["layout"]["tensor_parallel_size"] == 1
    assert record["workload"]["num_prompts"] == 6 and record["workload"]["seed"] == 3
    assert {"torch", "python", "device", "git_revision"} <= set(record)
    results = record["results"]
    check_results(results, 6)
    assert results["output_tokens"] == record["workload"]["total_output_tokens"]
    assert out.with_suffix(".png").stat().st_size > 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["output_tokens"] == results["output_tokens"]


def refuse_constant(name):
    raise AssertionError(f"{name} is not strict JSON")


def printed_reports(text):
    """The JSON documents printed one after another, read strictly."""
    decoder = json.JSONDecoder(parse_constant=refuse_constant)
    reports, at = [], 0
    while text[at:].strip():
        report, at = decoder.raw_decode(text, at + len(text[at:]) - len(text[at:].lstrip()))
        reports.append(report)
    return reports


def test_online_rate_sweep_records_one_run_per_rate(tmp_path, capsys):
    """In strict JSON: the rate inf was written as Infinity. A file of such records (as
    older runs wrote them) is still read and plotted."""
    out = tmp_path / "runs.jsonl"
    old = {"mode": "online", "target": "older", "layout": {"tensor_parallel_size": 1},
           "results": {"request_rate": float("inf"), "output_tokens_per_s": 5.0,
                       "e2e_latency_s": {"p50": 0.5}}}
    out.write_text(json.dumps(old) + "\n")
    capsys.readouterr()
    assert main(["bench", *COMMON, "--mode", "online", "--request-rate", "inf,40",
                 "--max-concurrency", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    lines = out.read_text().splitlines()
    assert json.loads(lines[0]) == old
    runs = [json.loads(line, parse_constant=refuse_constant) for line in lines[1:]]
    assert [r["results"]["request_rate"] for r in runs] == ["inf", 40.0]
    assert [r["results"]["max_concurrency"] for r in runs] == [2, 2]
    assert printed_reports(printed) == [{"mode": "online", **run["results"]} for run in runs]
    assert out.with_suffix(".png").stat().st_size > 0
    for run in runs:
        assert run["mode"] == "online"
        check_results(run["results"], 6)
        assert run["results"]["output_tokens"] == run["workload"]["total_output_tokens"]


@pytest.mark.parametrize("argv, message", [
    (["--request-rate", "0"], "every rate must be > 0"),
    (["--request-rate", "fast"], "is not a rate or a comma-separated list of rates"),
    (["--prompt-len", "9,3"], "need 1 <= LOW <= HIGH"),
    (["--request-timeout", "0"], "argument --request-timeout: '0' is invalid: must be a "
                                 "finite number of seconds > 0"),
    (["--request-timeout", "-2.5"], "'-2.5' is invalid: must be a finite number of seconds"),
    (["--request-timeout", "inf"], "'inf' is invalid: must be a finite number of seconds"),
    (["--request-timeout", "soon"], "'soon' is not a number of seconds"),
])
def test_bad_bench_values_exit_2_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["bench", *COMMON, *argv])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--prompt-len", "--output-len", "--request-rate"])
def test_negative_bench_values_are_named_not_taken_for_flags(flag, rng, capsys):
    """argparse took "-1,5" for an unknown option: "expected one argument"."""
    low, high = -rng.randint(1, 500), rng.randint(1, 500)
    value = f"{low},{high}" if rng.random() < 0.5 else f"{high},{low}"
    with pytest.raises(SystemExit) as exited:
        main(["bench", *COMMON, "--mode", "online", flag, value])
    assert exited.value.code == 2
    allowed = ("every rate must be > 0" if flag == "--request-rate"
               else "need 1 <= LOW <= HIGH")
    err = capsys.readouterr().err
    assert f"argument {flag}: '{value}' is invalid: " in err and allowed in err, err


def _bad_flag_cases(tmp_path):
    """(extra argv, the message's start) for each bench flag value that is wrong whatever
    the model; the files the cases need are written under tmp_path."""
    a_file = tmp_path / "a-file.txt"
    a_file.write_text("not a directory\n")
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("{not json\n")
    prompts = tmp_path / "prompts.jsonl"   # a --dataset file given as --out
    prompts.write_text('{"prompt": "hi"}\n')
    bad_dataset = tmp_path / "bad.jsonl"
    bad_dataset.write_text('{"prompt": "x", "max_tokens": 0}\n')
    good_dataset = tmp_path / "good.jsonl"
    good_dataset.write_text('{"prompt": [5, 6, 7], "max_tokens": 2}\n')
    return [
        (["--dataset", str(tmp_path / "missing.jsonl")],
         f"--dataset '{tmp_path / 'missing.jsonl'}' is not a file"),
        (["--dataset", str(bad_dataset)], f"{bad_dataset}:1: \"max_tokens\"=0"),
        (["--dataset", str(good_dataset), "--num-prompts", "5"],
         "--num-prompts shapes the synthetic workload"),
        (["--dataset", str(good_dataset), "--prompt-len", "2,3", "--output-len", "2,3"],
         "--prompt-len, --output-len shape the synthetic workload"),
        (["--out", str(tmp_path)], f"--out '{tmp_path}' is a directory"),
        (["--out", str(a_file / "runs.jsonl")], f"--out '{a_file / 'runs.jsonl'}' cannot be "
                                                f"written: '{a_file}' is not a writable"),
        (["--out", str(garbage)], f"--out '{garbage}' holds a line that is not a JSON record"),
        (["--out", str(prompts)], f"--out '{prompts}' holds a line that is not a JSON record "
                                  '(line 1 has no "mode" of "online" or "offline")'),
        (["--plot", str(tmp_path / "plot.txt")], "--plot '%s' is invalid: must be a .png"
                                                 % (tmp_path / "plot.txt")),
        (["--plot", str(tmp_path)], "--plot '%s' is invalid: must be a .png" % tmp_path),
        (["--mode", "offline", "--request-rate", "2"], "--request-rate 2.0 applies to --mode "
                                                       "online only"),
        (["--max-concurrency", "3"], "--max-concurrency 3 applies to --mode online only"),
        (["--mode", "online", "--request-timeout", "7.5"], "--request-timeout 7.5 applies to "
                                                           "--url only"),
        (["--mode", "online", "--url", "127.0.0.1:8000"], "--url '127.0.0.1:8000' is invalid: "
                                                          "must be an http:// or https://"),
        (["--mode", "online", "--url", "ftp://host/x"], "--url 'ftp://host/x' is invalid"),
    ]


def test_every_bad_bench_flag_fails_before_the_model_loads(tmp_path, no_model_load, capsys):
    """Each value is refused in one line naming the flag, with exit status 2, before any
    model or worker loads (the load raises if reached); nothing is written to --out."""
    out = tmp_path / "runs.jsonl"
    for argv, message in _bad_flag_cases(tmp_path):
        capsys.readouterr()
        args = ["bench", "-m", "tiny-llama", "--no-progress", "--out", str(out), *argv]
        assert main(args) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"shardline bench: error: {message}"), \
            (argv, err)
    assert not out.exists()
    # The same flags with good values get as far as the load.
    good = tmp_path / "good.jsonl"
    for argv in (["--dataset", str(good), "--plot", str(tmp_path / "new" / "plot.png")],
                 ["--mode", "online", "--request-rate", "2,inf", "--prompt-len", "1,400",
                  "--output-len", "1,112"]):
        assert main(["bench", "-m", "tiny-llama", "--out", str(out), *argv]) == 1
        assert "the model was loaded before the flags were checked" in \
            capsys.readouterr().err


@pytest.mark.parametrize("max_model_len", [None, 40])
def test_synthetic_lengths_beyond_the_model_length_fail_before_loading(
        max_model_len, rng, no_model_load, capsys):
    limit = max_model_len or 512   # tiny-llama's max_position_embeddings
    prompt_high = rng.randrange(1, limit)
    output_high = limit - prompt_high + rng.randint(1, 8)
    where = "--max-model-len" if max_model_len else "the positions of --model 'tiny-llama'"
    argv = [*COMMON, "--prompt-len", f"1,{prompt_high}", "--output-len", f"1,{output_high}"]
    argv += [] if max_model_len is None else ["--max-model-len", str(max_model_len)]
    assert main(["bench", *argv]) == 2
    assert (f"makes requests of up to {prompt_high + output_high} tokens, more than "
            f"{where}={limit}") in capsys.readouterr().err


@pytest.mark.parametrize("as_text", [False, True], ids=["token-ids", "text"])
def test_dataset_requests_beyond_the_model_length_fail_before_loading(
        as_text, tmp_path, rng, no_model_load, capsys):
    """Counted like the synthetic ones; text with the model's tokenizer (tiny-llama's: a
    token per byte)."""
    limit = rng.randint(20, 60)
    max_tokens = rng.randint(1, 10)
    length = limit - max_tokens + rng.randint(1, 5)   # prompt tokens, one over at least
    long = "x" * length if as_text else [rng.randrange(8, 200) for _ in range(length)]
    dataset = tmp_path / "d.jsonl"
    dataset.write_text(json.dumps({"prompt": "fine", "max_tokens": 2}) + "\n\n"
                       + json.dumps({"prompt": long, "max_tokens": max_tokens}) + "\n")
    assert main(["bench", "-m", "tiny-llama", "--dataset", str(dataset), "--max-model-len",
                 str(limit), "--out", str(tmp_path / "runs.jsonl")]) == 2
    assert (f"{dataset}:3: its prompt of {length} tokens and max_tokens={max_tokens} make "
            f"{length + max_tokens} tokens, more than --max-model-len={limit}") in \
        capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--num-prompts", "--max-num-seqs", "--max-num-batched-tokens",
                                  "--block-size", "--max-model-len", "-tp", "-pp", "-dp", "-sp",
                                  "--max-concurrency"])
def test_bench_counts_below_one_are_argparse_errors(flag, no_model_load, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["bench", *COMMON, flag, "0"])
    assert exited.value.code == 2
    assert "'0' is invalid: must be an integer >= 1" in capsys.readouterr().err


def test_url_without_online_mode_is_refused_in_one_line(capsys):
    assert main(["bench", *COMMON, "--url", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["shardline bench: error: --url needs --mode online: an offline run steps "
                   "an engine in this process"]


def test_poisson_arrivals_have_the_asked_rate():
    seed = random.randrange(1 << 30)
    times = arrival_times(4000, 25.0, seed)
    gaps = [b - a for a, b in zip([0.0] + times, times)]
    assert all(g > 0 for g in gaps)
    assert statistics.fmean(gaps) == pytest.approx(1 / 25.0, rel=0.1), seed
    assert arrival_times(3, float("inf"), seed) == [0.0, 0.0, 0.0]


class SlowTarget:
    """Each request yields one token per 10 ms; the first two finish fast."""

    async def stream(self, request_id, prompt, max_tokens):
        slow = not request_id.endswith(("-0", "-1"))
        for count in range(1, max_tokens + 1):
            await asyncio.sleep(0.01 if slow else 0)
            yield Counts(count, len(prompt))

    def kv_usage(self):
        return None


def test_cancelling_an_online_run_keeps_what_was_measured():
    workload = Workload([[1, 2, 3]] * 6, [2, 2, 500, 500, 500, 500])

    async def cut_short():
        run = asyncio.ensure_future(run_online(SlowTarget(), workload, float("inf")))
        await asyncio.sleep(0.3)
        run.cancel()
        return await run

    result = asyncio.run(cut_short())
    summary = result.summary()
    assert summary["interrupted"] and summary["finished_requests"] == 2
    assert summary["requests"] == 6 and summary["input_tokens"] == 6
    assert 4 <= summary["output_tokens"] < 4 + 4 * 500


def test_dataset_token_ids_outside_the_vocabulary_fail_before_loading(
        tmp_path, rng, no_model_load, capsys):
    """They reached the engine, whose error named neither the file nor the line."""
    bad = rng.randint(320, 5000)   # tiny-llama's vocabulary is 320 tokens
    dataset = tmp_path / "d.jsonl"
    dataset.write_text(json.dumps({"prompt": [5, 6], "max_tokens": 2}) + "\n"
                       + json.dumps({"prompt": [7, bad], "max_tokens": 2}) + "\n")
    assert main(["bench", "-m", "tiny-llama", "--dataset", str(dataset),
                 "--out", str(tmp_path / "runs.jsonl")]) == 2
    assert (f"{dataset}:2: token id {bad} is outside the vocabulary [0, 320) of --model "
            "'tiny-llama'") in capsys.readouterr().err
