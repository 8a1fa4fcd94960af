"""`shardline bench`: offline or online runs on a model or against a server, recorded."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import urllib.parse
from pathlib import Path

from shardline.benchmark.workload import Workload, load_jsonl, make_workload
from shardline.engine.cli_args import positive_int

DEFAULT_OUT = Path("shardline-bench.jsonl")
DEFAULT_RATES = [4.0]
DEFAULT_NUM_PROMPTS = 64
DEFAULT_PROMPT_LEN = (16, 256)
DEFAULT_OUTPUT_LEN = (16, 128)
DEFAULT_REQUEST_TIMEOUT = 600.0
SYNTHETIC_FLAGS = (("--num-prompts", "num_prompts"), ("--prompt-len", "prompt_len"),
                   ("--output-len", "output_len"))


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The harness's own flags (the engine and layout flags are the CLI's shared ones)."""
    # argparse reads "-1" or "-1.5" as a value but "-1,5" or "-inf" as an unknown option,
    # so `--prompt-len -1,5` failed with "expected one argument"; reading every such word
    # as a value lets the flag's own check say what is wrong with it. (No bench option
    # looks like a negative number, so none is shadowed.)
    parser._negative_number_matcher = re.compile(r"^-(\d|\.\d|inf|nan)", re.IGNORECASE)
    parser.add_argument("--mode", choices=("offline", "online"), default="offline",
                        help="offline: every request at once, the engine stepped to the end; "
                             "online: Poisson arrivals at --request-rate, each request "
                             "streamed (default: %(default)s)")
    parser.add_argument("--request-rate", type=_rates, default=None,
                        help="online: requests per second, or a comma-separated sweep such "
                             "as 1,2,4,inf (inf sends all at once) (default: 4)")
    parser.add_argument("--max-concurrency", type=positive_int, default=None,
                        help="online: at most N requests in flight; a request that arrives "
                             "when N are waits for one to finish, and its latencies count "
                             "from when it is sent (default: no limit)")
    parser.add_argument("--url", default=None,
                        help="online: an OpenAI-compatible server (e.g. http://127.0.0.1:8000, "
                             "from shardline serve) instead of an engine in this process; "
                             "--model is then the served model's name")
    parser.add_argument("--request-timeout", type=_seconds, default=None, metavar="SECONDS",
                        help="--url: seconds the server may take to accept a connection or "
                             "to send its next data (the reply's headers, the next chunk) "
                             "before the request is recorded as failed (default: "
                             f"{DEFAULT_REQUEST_TIMEOUT:g})")
    parser.add_argument("--dataset", type=Path, default=None,
                        help='prompts from a JSONL file, one {"prompt": text or token ids, '
                             '"max_tokens": n} per line, instead of the synthetic workload')
    parser.add_argument("--num-prompts", type=positive_int, default=None,
                        help=f"synthetic requests (default: {DEFAULT_NUM_PROMPTS})")
    parser.add_argument("--prompt-len", type=_range, default=None,
                        help="synthetic prompt lengths in tokens, LOW,HIGH (default: "
                             "%d,%d)" % DEFAULT_PROMPT_LEN)
    parser.add_argument("--output-len", type=_range, default=None,
                        help="synthetic output lengths in tokens, LOW,HIGH (default: "
                             "%d,%d)" % DEFAULT_OUTPUT_LEN)
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the synthetic workload and, through a stream of "
                             "their own, of the online arrivals: the same seed sends the "
                             "same prompts at every --request-rate, and the arrivals are "
                             "independent of them (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="JSONL file each run appends its record to (default: %(default)s)")
    parser.add_argument("--plot", type=Path, default=None,
                        help="PNG drawn from every record in --out, a .png path (default: "
                             "--out with .png)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _rates(text: str) -> list[float]:
    try:
        rates = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a rate or a comma-separated list of rates, e.g. 1,2,4,inf") from None
    bad = [rate for rate in rates if not rate > 0]
    if bad:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: holds {bad[0]:g}, and every "
                                         "rate must be > 0 (or inf: all at once)")
    return rates


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: must be a finite number of "
                                         "seconds > 0")
    return seconds


def _range(text: str) -> tuple[int, int]:
    try:
        low, high = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LOW,HIGH, e.g. 16,256") from None
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid: need 1 <= LOW <= HIGH "
                                         "(tokens), e.g. 16,256")
    return low, high


def check_bench_args(args: argparse.Namespace) -> Workload | None:
    """Refuse, before any model or worker loads, every bench flag value that is wrong
    whatever the model: combinations the run would ignore, a --url that is no HTTP URL,
    a --dataset that does not parse, --out/--plot paths that could not be written at the
    end, synthetic lengths beyond --max-model-len (or the model's positions). Fills in the
    defaults of the flags that apply; returns the --dataset workload, or None."""
    from shardline.benchmark.report import read_records

    if args.url is not None:
        if args.mode != "online":
            raise ValueError("--url needs --mode online: an offline run steps an engine in "
                             "this process")
        url = urllib.parse.urlsplit(args.url)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise ValueError(f"--url {args.url!r} is invalid: must be an http:// or https:// "
                             "URL with a host, e.g. http://127.0.0.1:8000")
    elif args.request_timeout is not None:
        raise ValueError(f"--request-timeout {args.request_timeout:g} applies to --url only: "
                         "it bounds the waits for a server's answer")
    if args.mode == "offline" and args.request_rate is not None:
        raise ValueError(f"--request-rate {','.join(map(str, args.request_rate))} applies to "
                         "--mode online only: an offline run submits every request at once")
    if args.mode == "offline" and args.max_concurrency is not None:
        raise ValueError(f"--max-concurrency {args.max_concurrency} applies to --mode online "
                         "only: an offline run submits every request at once")
    args.request_rate = args.request_rate or DEFAULT_RATES
    _check_output_path("--out", args.out)
    if args.out.is_file():
        try:
            read_records(args.out)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"--out {str(args.out)!r} holds a line that is not a JSON record "
                             f"({exc}): the plot reads every record in it; name another "
                             "file") from None
    if args.plot is not None:
        _check_output_path("--plot", args.plot, ".png")
    if args.dataset is not None:
        given = [flag for flag, key in SYNTHETIC_FLAGS if getattr(args, key) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} {'shapes' if len(given) == 1 else 'shape'} "
                             f"the synthetic workload, which --dataset {str(args.dataset)!r} "
                             "replaces: drop one or the other")
        if not args.dataset.is_file():
            raise FileNotFoundError(f"--dataset {str(args.dataset)!r} is not a file: must be "
                                    "a JSONL file of prompts")
        dataset = load_jsonl(args.dataset)
        if args.url is None:
            _check_dataset_fits(args, dataset)
        return dataset
    args.num_prompts = args.num_prompts or DEFAULT_NUM_PROMPTS
    args.prompt_len = args.prompt_len or DEFAULT_PROMPT_LEN
    args.output_len = args.output_len or DEFAULT_OUTPUT_LEN
    if args.url is None:
        _check_lengths_fit(args)
    return None


def _check_output_path(flag: str, path: Path, suffix: str | None = None) -> None:
    """`path` can be created or appended to: not a directory, below a writable directory
    (the nearest one that exists: the missing ones are made), with `suffix` if given."""
    if suffix is not None and path.suffix.lower() != suffix:
        raise ValueError(f"{flag} {str(path)!r} is invalid: must be a {suffix} file path")
    if path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a directory: must be a file path")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{flag} {str(path)!r} is not writable")
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {str(path)!r} cannot be written: {str(parent)!r} is not a "
                         "writable directory")


def _length_limit(args: argparse.Namespace) -> tuple[int, str] | None:
    """The most tokens a request may hold, and what sets it: --max-model-len, else the
    model's positions (None when --model is not a preset or local checkpoint)."""
    if args.max_model_len is not None:
        return args.max_model_len, "--max-model-len"
    info = _model_info(args.model)
    if info is None:
        return None
    return info.max_position_embeddings, f"the positions of --model {args.model!r}"


def _check_lengths_fit(args: argparse.Namespace) -> None:
    """Each synthetic request's prompt plus output must fit in --max-model-len (or, without
    it, the model's positions): a longer prompt is refused by the engine, a longer output
    cut short, and the run would not measure the workload it records."""
    limit = _length_limit(args)
    if limit is None:
        return
    limit, where = limit
    longest = args.prompt_len[1] + args.output_len[1]
    if longest > limit:
        raise ValueError(f"--prompt-len {args.prompt_len[0]},{args.prompt_len[1]} with "
                         f"--output-len {args.output_len[0]},{args.output_len[1]} makes "
                         f"requests of up to {longest} tokens, more than {where}={limit}: "
                         "lower their HIGH values")


def _check_dataset_fits(args: argparse.Namespace, dataset: Workload) -> None:
    """Each --dataset request's token ids must be in the vocabulary, and its prompt plus
    max_tokens must fit, as synthetic ones must; text prompts are counted with the model's
    tokenizer, which loads without the weights."""
    from shardline.engine.tokenizer import Tokenizer
    from shardline.presets import resolve_model

    info = _model_info(args.model)
    if info is not None:
        for prompt, origin in zip(dataset.prompts, dataset.origins):
            if isinstance(prompt, str):
                continue
            bad = [t for t in prompt if not 0 <= t < info.vocab_size]
            if bad:
                raise ValueError(f"{origin}: token id {bad[0]} is outside the vocabulary "
                                 f"[0, {info.vocab_size}) of --model {args.model!r}")
    limit = _length_limit(args)
    if limit is None:
        return
    limit, where = limit
    tokenizer = None
    if any(isinstance(prompt, str) for prompt in dataset.prompts):
        tokenizer = Tokenizer.from_model_dir(resolve_model(args.model))
    for prompt, max_tokens, origin in zip(dataset.prompts, dataset.max_tokens,
                                          dataset.origins):
        if isinstance(prompt, str):
            if tokenizer is None:
                continue
            prompt = tokenizer.encode(prompt)
        if len(prompt) + max_tokens > limit:
            raise ValueError(f"{origin}: its prompt of {len(prompt)} tokens and max_tokens="
                             f"{max_tokens} make {len(prompt) + max_tokens} tokens, more than "
                             f"{where}={limit}: shorten the prompt or lower max_tokens")


def _workload(args: argparse.Namespace, dataset: Workload | None,
              vocab_size: int | None) -> Workload:
    if dataset is not None:
        return dataset
    if vocab_size is None:
        raise ValueError(f"--model {args.model!r} is not a preset or local checkpoint, so "
                         "its vocabulary for synthetic prompts is unknown: pass --dataset "
                         "FILE.jsonl, or the served model's preset or directory as --model")
    return make_workload(args.num_prompts, vocab_size, seed=args.seed,
                         prompt_len=args.prompt_len, output_len=args.output_len)


def _workload_settings(args: argparse.Namespace, workload: Workload) -> dict:
    synthetic = args.dataset is None
    return {"source": "synthetic" if synthetic else str(args.dataset),
            "num_prompts": len(workload.prompts), "seed": args.seed,
            "prompt_len": list(args.prompt_len) if synthetic else None,
            "output_len": list(args.output_len) if synthetic else None,
            "total_output_tokens": workload.total_output_tokens}


def run_bench(args: argparse.Namespace, build_llm) -> int:
    """Check the flags, run what they ask, append one record per run to --out, draw --plot,
    and print each run's summary. Ctrl-C keeps the runs (and the part of a run) measured
    so far. A run whose every request failed is not recorded: its first error is printed,
    a sweep stops there, and the exit status is 1."""
    from shardline.benchmark.report import (LAYOUT_KEYS, append_record, make_record, plot,
                                            read_records, to_json)

    dataset = check_bench_args(args)
    progress = not args.no_progress
    layout = {key: getattr(args, key) for key in LAYOUT_KEYS}
    if args.url is not None:
        runs = _online_server(args, dataset, progress)
        target = args.url
    else:
        llm = build_llm(args)
        try:
            workload = _workload(args, dataset, llm.engine.vocab_size)
            runs = (_offline(llm, workload, progress) if args.mode == "offline"
                    else _online_engine(llm, workload, args, progress))
        finally:
            llm.shutdown()
        target = args.model
    failed_runs = []
    for mode, summary, workload in runs:
        if summary["failed_requests"] == summary["requests"]:
            failed_runs.append(summary)
            continue
        record = make_record(mode, target, layout, _workload_settings(args, workload), summary)
        append_record(args.out, record)
        print(to_json({"mode": mode, **summary}, indent=2))
        if summary["failed_requests"]:
            print(f"shardline bench: {_run_name(summary)}: {summary['failed_requests']} of "
                  f"{summary['requests']} requests failed (their errors under \"errors\"); "
                  "the tokens, rates and latencies are those of the others", file=sys.stderr)
    if len(failed_runs) < len(runs):
        png = args.plot or args.out.with_suffix(".png")
        drawn = plot(read_records(args.out), png)
        print(f"records appended to {args.out}" + (f"; plot in {png}" if drawn else
                                                   " (no plot: matplotlib is not installed; "
                                                   "pip install matplotlib)"),
              file=sys.stderr)
    for summary in failed_runs:
        print(f"shardline bench: error: {_run_name(summary)}: every one of its "
              f"{summary['requests']} requests failed, so it is not recorded; the first "
              f"error: {summary['errors'][0]['error']}", file=sys.stderr)
    if failed_runs:
        return 1
    return 130 if any(summary["interrupted"] for _, summary, _ in runs) else 0


def _run_name(summary: dict) -> str:
    rate = summary.get("request_rate")
    return "the offline run" if rate is None else f"the online run at {rate:g} requests/s"


def _offline(llm, workload: Workload, progress: bool) -> list:
    from shardline.benchmark.offline import run_offline

    return [("offline", run_offline(llm, workload, progress).summary(), workload)]


def _online_engine(llm, workload: Workload, args: argparse.Namespace, progress: bool) -> list:
    from shardline.benchmark.online import EngineTarget, run_online
    from shardline.engine.async_llm import AsyncLLM

    engine = llm.engine
    async_llm = AsyncLLM.from_engine(engine)
    target = EngineTarget(async_llm)
    runs = []
    for rate in args.request_rate:
        before = engine.stats.num_preemptions
        result = asyncio.run(run_online(target, workload, rate, args.seed, progress,
                                        args.max_concurrency))
        result.preemptions = engine.stats.num_preemptions - before
        runs.append(("online", result.summary(), workload))
        if result.interrupted or result.all_failed:
            break
    return runs


def _model_info(model: str):
    """The ModelInfo (vocabulary, positions) of --model when it names a preset or a local
    checkpoint, read from its config without loading weights; else None."""
    from shardline.models.loader import read_model_info
    from shardline.presets import resolve_model

    try:
        return read_model_info(resolve_model(model))
    except (OSError, ValueError, KeyError):
        return None


def _online_server(args: argparse.Namespace, dataset: Workload | None, progress: bool) -> list:
    import httpx

    from shardline.benchmark.online import ServerTarget, run_online

    info = _model_info(args.model) if dataset is None else None
    workload = _workload(args, dataset, None if info is None else info.vocab_size)
    runs = []

    async def sweep() -> None:
        # No connection cap (httpx's default is 100): past it, requests sent all at once
        # would wait inside the client, and that wait would count as server latency.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(limits=limits) as client:
            target = ServerTarget(args.url, args.model, client,
                                  args.request_timeout or DEFAULT_REQUEST_TIMEOUT)
            for rate in args.request_rate:
                result = await run_online(target, workload, rate, args.seed, progress,
                                          args.max_concurrency)
                runs.append(("online", result.summary(), workload))
                if result.interrupted or result.all_failed:
                    return

    try:
        asyncio.run(sweep())
    except KeyboardInterrupt:
        pass
    return runs
