"""Ctrl-C during an offline `shardline bench` run keeps what was measured."""

import json

from shardline.cli import main
from shardline.engine.llm_engine import LLMEngine


def test_ctrl_c_inside_a_step_keeps_the_finished_requests(tmp_path, rng, monkeypatch, capsys):
    """A Ctrl-C lands inside a step (where the run spends its time), which leaves the LLM
    dead; aborting the unfinished requests then raised EngineDeadError, so the command
    exited 1 and recorded nothing of what it had measured."""
    short, long = rng.randint(2, 4), rng.randint(40, 60)
    count = rng.randint(3, 6)
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text("".join(
        json.dumps({"prompt": "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(3, 20))),
                    "max_tokens": short if i == 0 else long}) + "\n" for i in range(count)))
    step = LLMEngine.step
    finished = []

    def step_then_ctrl_c(engine):
        if finished:
            raise KeyboardInterrupt
        outputs = step(engine)
        finished.extend(out for out in outputs if out.finished)
        return outputs
    monkeypatch.setattr(LLMEngine, "step", step_then_ctrl_c)
    out = tmp_path / "runs.jsonl"
    code = main(["bench", "-m", "tiny-llama", "--device", "cpu", "--dataset", str(dataset),
                 "--no-progress", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 130, captured.err
    assert "error" not in captured.err
    [record] = [json.loads(line) for line in out.read_text().splitlines()]
    results = record["results"]
    assert results["interrupted"]
    assert results["requests"] == count
    assert results["finished_requests"] == len(finished) == 1
    assert results["output_tokens"] >= short
    assert json.loads(captured.out)["interrupted"]
