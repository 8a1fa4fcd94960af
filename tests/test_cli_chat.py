"""The `shardline chat` command: one message or a conversation over turns, within the
model's length and with a cache sized for one conversation."""

import pytest

from shardline.cli import main
from shardline.engine import llm as llm_module


def test_chat_answers_one_message(tiny_chat_model, capsys):
    assert main(["chat", "-m", tiny_chat_model, "--device", "cpu", "--message", "Hi there",
                 "--max-tokens", "4"]) == 0
    answer = capsys.readouterr().out.strip()
    assert answer and "\n" not in answer


def test_chat_keeps_the_conversation_across_turns(tiny_chat_model, monkeypatch, capsys):
    seen = []
    real_chat = llm_module.LLM.chat

    def spy(self, messages, *args, **kwargs):
        seen.append([dict(m) for m in messages])
        return real_chat(self, messages, *args, **kwargs)
    monkeypatch.setattr(llm_module.LLM, "chat", spy)
    turns = iter(["first question", "second question", ""])
    monkeypatch.setattr("builtins.input", lambda prompt: next(turns))
    assert main(["chat", "-m", tiny_chat_model, "--device", "cpu", "--system", "Be brief",
                 "--max-tokens", "3"]) == 0
    assert [m["role"] for m in seen[1]] == ["system", "user", "assistant", "user"]
    assert seen[1][1]["content"] == "first question" and seen[1][3]["content"] == "second question"
    assert capsys.readouterr().out.count("assistant: ") == 2


def test_chat_without_a_template_is_refused_before_the_model_loads(rng, no_model_load, capsys):
    """It was refused only once its weights had loaded, which for a large model is most of
    the time the command takes."""
    model = rng.choice(["tiny-llama", "tiny-qwen2", "tiny-mixtral", "small-llama"])
    assert main(["chat", "-m", model, "--device", "cpu", "--message", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        f"shardline chat: error: --model '{model}' has no chat template"), err


def test_chat_drops_a_turn_that_does_not_fit_and_goes_on(tiny_chat_model, rng, monkeypatch,
                                                         capsys):
    """A turn that made the conversation longer than --max-model-len ended the session
    (exit 2), and the conversation with it."""
    seen = []
    real_chat = llm_module.LLM.chat

    def spy(self, messages, *args, **kwargs):
        seen.append([m["content"] for m in messages])
        return real_chat(self, messages, *args, **kwargs)
    monkeypatch.setattr(llm_module.LLM, "chat", spy)
    # The third turn's prompt, "first" and a reply of 2 tokens before it, is 56 tokens at
    # most (one a byte; two reply bytes that complete no character come back as two U+FFFD,
    # 3 bytes each), and its reply needs 2 more: below 58 the third turn is dropped too.
    limit = rng.randint(58, 128)
    too_long = "".join(rng.choice("abcdefgh") for _ in range(3 * limit))
    turns = iter(["first", too_long, "third", ""])
    monkeypatch.setattr("builtins.input", lambda prompt: next(turns))
    assert main(["chat", "-m", tiny_chat_model, "--device", "cpu", "--max-tokens", "2",
                 "--max-model-len", str(limit)]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("assistant: ") == 2
    assert "this turn is dropped: prompt 0: prompt has" in captured.err
    assert f"longer than --max-model-len={limit}" in captured.err
    assert seen[-1][0] == "first" and seen[-1][-1] == "third" and too_long not in seen[-1]


@pytest.mark.parametrize("message", ["", "  "])
def test_chat_refuses_an_empty_message_before_the_model_loads(message, no_model_load, capsys):
    """It loaded the model, asked nothing and exited 0."""
    assert main(["chat", "-m", "tiny-llama", "--message", message]) == 2
    assert capsys.readouterr().err.startswith("shardline chat: error: --message is empty")


@pytest.mark.parametrize("flags, seqs", [([], 1), (["--max-num-seqs", "3"], 3)])
def test_chat_sizes_its_cache_for_one_conversation(flags, seqs, tiny_chat_model, engine_kwargs):
    """It kept the engine's 64 sequences: a 2.8 GiB KV cache for SmolLM2's one
    conversation (3.9 GB resident, 4.3 s to the answer; with 1: 0.9 GB, 3.0 s)."""
    assert main(["chat", "-m", tiny_chat_model, "--message", "hi", *flags]) == 2
    assert engine_kwargs["max_num_seqs"] == seqs
    assert engine_kwargs["max_model_len"] == 512   # tiny-llama's limit, below chat's 4096


def test_ctrl_c_at_the_prompt_ends_its_line_and_exits_130(tiny_chat_model, monkeypatch,
                                                         capsys):
    """The interrupt's message went on the prompt's own line ("you: shardline chat: ...")."""
    def interrupted(prompt):
        print(prompt, end="")
        raise KeyboardInterrupt
    monkeypatch.setattr("builtins.input", interrupted)
    assert main(["chat", "-m", tiny_chat_model, "--device", "cpu"]) == 130
    captured = capsys.readouterr()
    assert captured.out == "you: \n" and "shardline chat: interrupted" in captured.err


def test_a_message_too_long_for_the_model_names_the_flag(tiny_chat_model, rng, capsys):
    limit = rng.randint(16, 64)
    message = "".join(rng.choice("abcdefgh") for _ in range(3 * limit))
    assert main(["chat", "-m", tiny_chat_model, "--device", "cpu", "--message", message,
                 "--max-model-len", str(limit)]) == 2
    [error] = [line for line in capsys.readouterr().err.splitlines()
               if line.startswith("shardline chat: error:")]
    assert f"longer than --max-model-len={limit}" in error and "max_model_len" not in error
