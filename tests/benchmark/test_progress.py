"""The bench's progress bar shows at once, and an offline run's moves with its tokens."""

import io
import itertools
import re
from types import SimpleNamespace

from shardline.benchmark import offline, progress
from shardline.benchmark.progress import ProgressBar
from shardline.benchmark.workload import Workload
from shardline.engine.llm import LLM


def drawn_states(text: str) -> list[tuple[int, int]]:
    return [(int(done), int(total)) for done, total in re.findall(r"\] (\d+)/(\d+) ", text)]


def test_the_bar_shows_before_anything_is_done(rng):
    """It drew on the first update only, so a run showed nothing until then."""
    stream = io.StringIO()
    total = rng.randint(1, 10_000)
    ProgressBar(total, "requests", stream=stream)
    assert drawn_states(stream.getvalue()) == [(0, total)]
    quiet = io.StringIO()
    ProgressBar(total, "requests", enabled=False, stream=quiet).close()
    assert quiet.getvalue() == ""


def test_an_offline_run_counts_output_tokens_as_they_come(rng, monkeypatch, capsys):
    """It counted finished requests: requests of one length all finish in the last step, so
    the bar sat at 0 until the end (small-llama, 200 prompts: nothing for 10 s and more).
    The bar's clock ticks a second a reading here, so that every update draws."""
    monkeypatch.setenv("SHARDLINE_DISABLE_TRITON", "1")
    ticks = itertools.count()
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=lambda: next(ticks)))
    count, length = rng.randint(2, 5), rng.randint(12, 24)
    workload = Workload([[rng.randrange(8, 300) for _ in range(rng.randint(1, 12))]
                         for _ in range(count)], [length] * count)
    with LLM("tiny-llama", device="cpu", num_kv_blocks=256) as llm:
        result = offline.run_offline(llm, workload, progress=True)
    assert result.summary()["finished_requests"] == count
    err = capsys.readouterr().err
    assert "output tokens [" in err
    states = drawn_states(err)
    total = count * length
    assert states[0] == (0, total) and states[-1] == (total, total)
    partial = {done for done, _ in states if 0 < done < total}
    assert len(partial) >= length - 2   # about one state per decode step


def test_the_time_left_shows_once_a_tenth_is_done(rng, monkeypatch):
    """From the first few units (an offline run's first tokens, after its prompts' prefill)
    it promised '19378s left' for a run of minutes."""
    ticks = itertools.count()
    monkeypatch.setattr(progress, "time", SimpleNamespace(monotonic=lambda: next(ticks)))
    stream = io.StringIO()
    total = rng.randint(100, 10_000)
    bar = ProgressBar(total, "output tokens", stream=stream, interval=0)
    early = rng.randint(1, total // 10 - 1)
    bar.update(early)
    assert stream.getvalue().endswith(f"{early}/{total} {early / 1:.1f}/s --   ")
    done, elapsed = total // 10 + 1, 2
    bar.update(done - early)
    assert stream.getvalue().endswith(f"{done}/{total} {done / elapsed:.1f}/s "
                                      f"{(total - done) / (done / elapsed):.0f}s left   ")
