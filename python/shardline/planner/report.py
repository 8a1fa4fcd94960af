"""A plan as a table for people and as a dict for machines (`shardline plan --json`)."""

from __future__ import annotations

from dataclasses import asdict

from shardline.planner.ranking import Estimate, Plan

MB = 1e6


def estimate_dict(e: Estimate) -> dict:
    comm = e.comm
    return {
        "layout": e.layout.name, **asdict(e.layout), "ep": e.layout.ep,
        "throughput_tokens_per_s": e.throughput, "ttft_s": e.ttft_s, "tpot_s": e.tpot_s,
        "request_latency_s": e.latency_s, "concurrency_per_replica": e.concurrency,
        "memory_per_device": {"weights_bytes": e.memory.weights_bytes,
                              "activation_bytes": e.memory.activation_bytes,
                              "kv_bytes_per_token": e.memory.kv_bytes_per_token,
                              "kv_capacity_tokens": e.memory.kv_capacity_tokens},
        "decode_step": {"time_s": e.decode.time_s, "compute_s": e.decode.compute_s,
                        "host_s": e.decode.host_s,
                        "memory_bound": e.decode.memory_bound,
                        "intranode_bytes": comm.intranode_bytes,
                        "internode_bytes": comm.internode_bytes,
                        "intranode_time_s": comm.intranode_time_s,
                        "internode_time_s": comm.internode_time_s},
        "prefill_step": {"time_s": e.prefill.time_s, "compute_s": e.prefill.compute_s,
                         "host_s": e.prefill.host_s,
                         "comm_time_s": e.prefill.comm.time_s},
    }


def plan_dict(p: Plan) -> dict:
    return {
        "model": {**asdict(p.model), "total_params": p.model.total_params()},
        "cluster": p.cluster.to_dict(), "workload": asdict(p.workload),
        "objective": p.objective, "pick": p.ranked[0].layout.name,
        "explanation": p.explanation,
        "layouts": [estimate_dict(e) for e in p.ranked],
        "rejected": [{"layout": r.layout.name, "reason": r.reason} for r in p.rejected],
    }


def render(p: Plan, top: int) -> str:
    """The header, the first `top` layouts and the explanation of the pick."""
    m, c, w = p.model, p.cluster, p.workload
    lines = [
        f"model {m.name}: {m.total_params() / 1e9:.2f} B parameters, {m.num_layers} layers, "
        f"{m.heads} heads / {m.kv_heads} KV heads"
        + (f", {m.num_experts} experts top-{m.experts_per_token}" if m.num_experts else ""),
        f"cluster: {c.nodes} node(s) x {c.devices_per_node} {c.device.name} "
        f"({c.device.memory_bytes / 1e9:.0f} GB); {c.intranode.name} "
        f"{c.intranode.bandwidth / 1e9:.3g} GB/s {c.intranode.latency_s * 1e6:.3g} us, "
        f"{c.internode.name} {c.internode.bandwidth / 1e9:.3g} GB/s "
        f"{c.internode.latency_s * 1e6:.3g} us",
        f"workload: batch {w.batch}, prompt {w.prompt_len}, output {w.output_len} tokens; "
        f"ranked by {p.objective}",
        "",
        f"{'#':>3} {'layout':<22} {'tok/s':>9} {'TTFT ms':>9} {'TPOT ms':>8} "
        f"{'weights GB':>10} {'KV tokens':>10} {'intra MB':>9} {'ms':>6} "
        f"{'inter MB':>9} {'ms':>6}",
    ]
    for i, e in enumerate(p.ranked[:top], 1):
        comm = e.comm
        lines.append(
            f"{i:>3} {e.layout.name:<22} {e.throughput:9.1f} {e.ttft_s * 1e3:9.1f} "
            f"{e.tpot_s * 1e3:8.2f} {e.memory.weights_bytes / 1e9:10.2f} "
            f"{e.memory.kv_capacity_tokens:10d} {comm.intranode_bytes / MB:9.2f} "
            f"{comm.intranode_time_s * 1e3:6.2f} {comm.internode_bytes / MB:9.2f} "
            f"{comm.internode_time_s * 1e3:6.2f}")
    if len(p.ranked) > top:
        lines.append(f"    ... {len(p.ranked) - top} more valid layouts (--top)")
    lines += ["", "communication: bytes one device sends per decode step and their time",
              f"{len(p.rejected)} layouts refused (--json lists each with its reason)", "",
              f"pick: {p.ranked[0].layout.name}: {p.explanation}"]
    return "\n".join(lines)
