"""Reading the model hyperparameters out of a Hugging Face config.json dict.

Checkpoints on the hub and those written by recent transformers spell some settings
differently (`rope_theta` + `rope_scaling` vs. one `rope_parameters` dict); these helpers
accept both.
"""

from __future__ import annotations

SUPPORTED_ACTIVATIONS = ("silu",)


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def num_kv_heads(config: dict) -> int:
    return config.get("num_key_value_heads") or config["num_attention_heads"]


def num_experts(config: dict) -> int:
    """Routed experts per MoE layer (Mixtral's num_local_experts, Qwen2-MoE's
    num_experts); 0 for a dense model."""
    return config.get("num_local_experts") or config.get("num_experts") or 0


def rope_settings(config: dict) -> tuple[float, dict | None]:
    """(rope theta, scaling dict or None for plain RoPE)."""
    params = config.get("rope_parameters") or {}
    theta = params.get("rope_theta", config.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling") or params
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    return float(theta), (None if kind == "default" else scaling)


def max_positions(config: dict) -> int:
    """Positions the model serves correctly: max_position_embeddings, capped by a sliding
    attention window (not implemented here, so longer contexts are refused, not wrong)."""
    limit = config.get("max_position_embeddings", 2048)
    window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
    return min(limit, window) if window else limit


def check_activation(config: dict) -> None:
    act = config.get("hidden_act", "silu")
    if act not in SUPPORTED_ACTIVATIONS:
        raise ValueError(f"hidden_act={act!r} is not supported: use one of "
                         f"{', '.join(SUPPORTED_ACTIVATIONS)}")
