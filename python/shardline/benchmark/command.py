"""`shardline bench`: offline or online runs on a model or against a server, recorded."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from shardline.benchmark.workload import Workload, load_jsonl, make_workload

DEFAULT_OUT = Path("shardline-bench.jsonl")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The harness's own flags (the engine and layout flags are the CLI's shared ones)."""
    parser.add_argument("--mode", choices=("offline", "online"), default="offline",
                        help="offline: every request at once, the engine stepped to the end; "
                             "online: Poisson arrivals at --request-rate, each request "
                             "streamed (default: %(default)s)")
    parser.add_argument("--request-rate", type=_rates, default=[4.0],
                        help="online: requests per second, or a comma-separated sweep such "
                             "as 1,2,4,inf (inf sends all at once) (default: 4)")
    parser.add_argument("--url", default=None,
                        help="online: an OpenAI-compatible server (e.g. http://127.0.0.1:8000, "
                             "from shardline serve) instead of an engine in this process; "
                             "--model is then the served model's name")
    parser.add_argument("--dataset", type=Path, default=None,
                        help='prompts from a JSONL file, one {"prompt": text or token ids, '
                             '"max_tokens": n} per line, instead of the synthetic workload')
    parser.add_argument("--num-prompts", type=int, default=64,
                        help="synthetic requests (default: %(default)s)")
    parser.add_argument("--prompt-len", type=_range, default=(16, 256),
                        help="synthetic prompt lengths in tokens, LOW,HIGH (default: 16,256)")
    parser.add_argument("--output-len", type=_range, default=(16, 128),
                        help="synthetic output lengths in tokens, LOW,HIGH (default: 16,128)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the synthetic workload and of the arrivals "
                             "(default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="JSONL file each run appends its record to (default: %(default)s)")
    parser.add_argument("--plot", type=Path, default=None,
                        help="PNG drawn from every record in --out (default: --out with .png)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _rates(text: str) -> list[float]:
    try:
        rates = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a rate or a comma-separated list of rates, e.g. 1,2,4,inf") from None
    if not all(rate > 0 for rate in rates):
        raise argparse.ArgumentTypeError(f"{text!r}: every rate must be > 0 (or inf)")
    return rates


def _range(text: str) -> tuple[int, int]:
    try:
        low, high = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LOW,HIGH, e.g. 16,256") from None
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= LOW <= HIGH")
    return low, high


def _workload(args: argparse.Namespace, vocab_size: int | None) -> Workload:
    if args.dataset is not None:
        return load_jsonl(args.dataset)
    if vocab_size is None:
        raise ValueError(f"--model {args.model!r} is not a preset or local checkpoint, so "
                         "its vocabulary for synthetic prompts is unknown: pass --dataset "
                         "FILE.jsonl, or the served model's preset or directory as --model")
    return make_workload(args.num_prompts, vocab_size, seed=args.seed,
                         prompt_len=args.prompt_len, output_len=args.output_len)


def _workload_settings(args: argparse.Namespace, workload: Workload) -> dict:
    return {"source": str(args.dataset) if args.dataset else "synthetic",
            "num_prompts": len(workload.prompts), "seed": args.seed,
            "prompt_len": list(args.prompt_len), "output_len": list(args.output_len),
            "total_output_tokens": workload.total_output_tokens}


def run_bench(args: argparse.Namespace, build_llm) -> int:
    """Run what the flags ask, append one record per run to --out, draw --plot, and print
    each run's summary. Ctrl-C keeps the runs (and the part of a run) measured so far."""
    from shardline.benchmark.report import (LAYOUT_KEYS, append_record, make_record, plot,
                                            read_records)

    if args.url is not None and args.mode != "online":
        raise ValueError("--url needs --mode online: an offline run steps an engine in this "
                         "process")
    progress = not args.no_progress
    layout = {key: getattr(args, key) for key in LAYOUT_KEYS}
    if args.url is not None:
        runs = _online_server(args, progress)
        target = args.url
    else:
        llm = build_llm(args)
        try:
            workload = _workload(args, llm.engine.vocab_size)
            runs = (_offline(llm, workload, progress) if args.mode == "offline"
                    else _online_engine(llm, workload, args, progress))
        finally:
            llm.shutdown()
        target = args.model
    for mode, summary, workload in runs:
        record = make_record(mode, target, layout, _workload_settings(args, workload), summary)
        append_record(args.out, record)
        print(json.dumps({"mode": mode, **summary}, indent=2))
    png = args.plot or args.out.with_suffix(".png")
    drawn = plot(read_records(args.out), png)
    print(f"records appended to {args.out}" + (f"; plot in {png}" if drawn else
                                               " (no plot: matplotlib is not installed)"),
          file=sys.stderr)
    return 130 if any(summary["interrupted"] for _, summary, _ in runs) else 0


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
        result = asyncio.run(run_online(target, workload, rate, args.seed, progress))
        result.preemptions = engine.stats.num_preemptions - before
        runs.append(("online", result.summary(), workload))
        if result.interrupted:
            break
    return runs


def _served_vocab_size(model: str) -> int | None:
    """The vocabulary of --model when it names a preset or a local checkpoint (so that
    synthetic token-id prompts can be sent to a server of that model), else None."""
    from shardline.models.loader import read_model_info
    from shardline.presets import resolve_model

    try:
        return read_model_info(resolve_model(model)).vocab_size
    except (OSError, ValueError):
        return None


def _online_server(args: argparse.Namespace, progress: bool) -> list:
    import httpx

    from shardline.benchmark.online import ServerTarget, run_online

    workload = _workload(args, _served_vocab_size(args.model))
    runs = []

    async def sweep() -> None:
        async with httpx.AsyncClient(timeout=None) as client:
            target = ServerTarget(args.url, args.model, client)
            for rate in args.request_rate:
                result = await run_online(target, workload, rate, args.seed, progress)
                runs.append(("online", result.summary(), workload))
                if result.interrupted:
                    return

    try:
        asyncio.run(sweep())
    except KeyboardInterrupt:
        pass
    return runs
