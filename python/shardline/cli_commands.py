"""What each `shardline` command does once its flags are parsed (cli.py parses them): demo,
generate, chat, bench and serve; plan lives with the planner (planner/command.py).
Engine options arrive as flags and reach `LLM` as its keyword arguments; an engine error
that names an option names it as the flag the user typed."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Iterator

from shardline.engine.cli_args import engine_kwargs, name_by_flags
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
    with _named_by_flags(args):
        return LLM(**engine_kwargs(args))


@contextlib.contextmanager
def _named_by_flags(args: argparse.Namespace) -> Iterator[None]:
    """A ValueError raised inside names the engine options it cites as this command's
    flags (`--max-model-len=512`, not `max_model_len=512`)."""
    try:
        yield
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
            _say(f"asking {_count(len(questions), 'question')}, up to {args.max_tokens} "
                 "tokens each ...")
            outputs = llm.chat([[{"role": "user", "content": q}] for q in questions],
                               chat_params)
            for question, out in zip(questions, outputs):
                print(f"Q: {question}\nA: {out.outputs[0].text.strip()}\n")
            note = ""
        else:
            _say(f"completing {_count(args.num_prompts, 'prompt')}, {args.max_tokens} tokens "
                 "each ...")
            outputs = llm.generate(demo_prompts(args.num_prompts), dataclasses.replace(
                chat_params, ignore_eos=True))
            for out in outputs:
                print(f"prompt: {out.prompt!r}\n  -> {out.outputs[0].text!r}")
            note = " (preset weights are random: the text is noise)"
        elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"{_count(len(outputs), 'request')}, {tokens} output tokens in {elapsed:.2f} s: "
          f"{tokens / elapsed:.1f} tokens/s{note}")
    return 0


def _count(n: int, noun: str) -> str:
    """'1 request', '3 requests'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


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
    with _build_llm(args) as llm, _named_by_flags(args):
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
    with _demo_llm(args, CHAT_CONTEXT) as llm, _named_by_flags(args):
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
                _say(f"shardline chat: this turn is dropped: "
                     f"{name_by_flags(str(exc), args.engine_flags)} (the conversation so far "
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
    except KeyboardInterrupt:
        print()  # end the prompt's line, so that what follows starts a line of its own
        raise


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
    if args.model_arg is not None and args.model is not None and args.model_arg != args.model:
        raise ValueError(f"MODEL {args.model_arg!r} and --model {args.model!r} name different "
                         "models: give one of them")
    args.model = args.model_arg or args.model or DEFAULT_MODEL
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise ValueError(f"--served-model-name {args.served_model_name!r} is invalid: must be "
                         "a name clients can send as the model, not empty")
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
