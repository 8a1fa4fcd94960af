"""`shardline serve`'s other routes: Prometheus metrics, the model list and health.
"""

import asyncio
import math
import re

import pytest

fastapi = pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra (uvicorn) is not installed")
openai = pytest.importorskip("openai", reason="the openai client (test extra) is not installed")
httpx = pytest.importorskip("httpx", reason="httpx (test extra) is not installed")

from server_helpers import MODEL, TIMEOUT, random_text  # noqa: E402


SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$')


def parse_prometheus(text):
    """{(name, labels): value}; fails on any line that is not a comment or a sample."""
    samples, types = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
            continue
        if line.startswith("# HELP ") or not line:
            continue
        match = SAMPLE.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        samples[(match.group(1), match.group(2) or "")] = float(match.group(3))
    for name, _ in samples:
        base = re.sub(r"_(sum|count)$", "", name)
        assert name in types or base in types, f"{name} has no TYPE line"
    return samples, types


def test_metrics_endpoint_is_prometheus_text(server, client):
    llm, url = server
    client.completions.create(model=MODEL, prompt="count me", max_tokens=3)
    reply = httpx.get(url + "/metrics", timeout=TIMEOUT)
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    samples, types = parse_prometheus(reply.text)
    metrics = asyncio.run(llm.metrics())
    assert samples[("shardline_kv_blocks_total", "")] == llm.engine.kv.num_blocks
    assert samples[("shardline_num_requests_running", "")] == 0
    assert samples[("shardline_steps_total", "")] == metrics["num_steps"] > 0
    assert samples[("shardline_generation_tokens_total", "")] == \
        metrics["generation_tokens_total"] >= 3
    assert samples[("shardline_step_time_seconds_count", "")] == metrics["num_steps"]
    assert types["shardline_step_time_seconds"] == "summary"
    p50 = samples[("shardline_step_time_seconds", '{quantile="0.5"}')]
    assert 0 < p50 <= samples[("shardline_step_time_seconds", '{quantile="0.99"}')]
    assert not math.isnan(samples[("shardline_prefix_cache_hit_rate", "")])


def test_models_and_health(server, client, rng):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL) == models.data[0]
    other = MODEL + "-" + random_text(rng).replace(" ", "")
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve(other)
    assert caught.value.body["param"] == "model" and other in caught.value.body["message"]
    reply = httpx.get(server[1] + "/health", timeout=TIMEOUT)
    assert reply.status_code == 200 and reply.json() == {"status": "ok"}
    probe = httpx.head(server[1] + "/health", timeout=TIMEOUT)
    assert probe.status_code == 200 and probe.content == b""


def test_per_rank_step_times_render_as_one_labelled_summary():
    from shardline.entrypoints.prometheus import render

    stats = {"count": 7, "sum": 0.7, "mean": 0.1, "p50": 0.1, "p90": 0.2, "p99": 0.3,
             "max": 0.3}
    metrics = {"num_requests_running": 1, "num_requests_waiting": 0, "kv_blocks_used": 3,
               "kv_blocks_total": 8, "kv_usage": 0.375, "prefix_cache_hit_rate": None,
               "generation_tokens_per_s": 1.5, "computed_tokens_per_s": 2.5,
               "num_preemptions": 0, "num_steps": 7, "generation_tokens_total": 7,
               "computed_tokens_total": 20,
               "finished_completions": {"stop": 1, "length": 2, "abort": 3},
               "step_time_s": stats,
               "step_time_per_rank_s": [dict(stats, rank=0), dict(stats, rank=1, p99=0.5)]}
    samples, types = parse_prometheus(render(metrics))
    assert types["shardline_rank_step_time_seconds"] == "summary"
    assert samples[("shardline_rank_step_time_seconds", '{rank="1",quantile="0.99"}')] == 0.5
    assert samples[("shardline_rank_step_time_seconds_count", '{rank="0"}')] == 7
    assert samples[("shardline_finished_completions_total", '{reason="abort"}')] == 3
    assert math.isnan(samples[("shardline_prefix_cache_hit_rate", "")])
