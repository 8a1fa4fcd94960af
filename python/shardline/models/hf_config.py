"""Reading the model hyperparameters out of a Hugging Face config.json dict.

Checkpoints on the hub and those written by recent transformers spell some settings
differently (`rope_theta` + `rope_scaling` vs. one `rope_parameters` dict); these helpers
accept both. An optional field that is null takes its default, as when it is absent.
"""

from __future__ import annotations

import json
import math

SUPPORTED_ACTIVATIONS = ("silu",)
# The RoPE scalings layers.rotary builds. Kept here, not there: the CLI reads configs
# (`shardline plan`) without loading torch, which the layers import.
SUPPORTED_ROPE_TYPES = ("default", "llama3")

# Sizes every supported architecture reads, and those its MoE layers add.
REQUIRED_SIZES = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "intermediate_size")
MOE_SIZES = {"MixtralForCausalLM": ("num_local_experts", "num_experts_per_tok"),
             "Qwen2MoeForCausalLM": ("num_experts", "num_experts_per_tok",
                                     "moe_intermediate_size")}
OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "max_position_embeddings",
                  "sliding_window", "decoder_sparse_step")
COUNTS = ("num_experts", "shared_expert_intermediate_size")  # 0: a dense layer, no shared expert
POSITIVE_REALS = ("rope_theta", "rms_norm_eps", "partial_rotary_factor")
FLAGS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window")
# What each RoPE scaling type reads from the rope_scaling dict, all positive numbers.
ROPE_SCALING_FIELDS = {"llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                  "original_max_position_embeddings")}


def read_json_object(path: str) -> dict:
    """The JSON object in the file `path`; a ValueError naming the file if it holds
    anything else."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def check_config(config: dict, source: str, architecture: str) -> None:
    """Raise a ValueError naming `source` (the config file), the field, its value and the
    rule, for a config.json whose sizes could not build the model: a missing or
    non-integer size, a head count that does not divide, a non-positive RoPE base. Checked
    when the config is read, so a bad file fails before any worker starts, not deep inside
    a layer's constructor."""
    def fail(field: str, rule: str) -> None:
        raise ValueError(f"{source}: {field}={config.get(field)!r} is invalid: {rule}")

    def is_int(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    for field in REQUIRED_SIZES + MOE_SIZES.get(architecture, ()):
        if config.get(field) is None:
            state = "null" if field in config else "missing"
            raise ValueError(f"{source}: {field} is {state} ({architecture} needs it)")
    for field in REQUIRED_SIZES + MOE_SIZES.get(architecture, ()) + OPTIONAL_SIZES + COUNTS:
        value, least = config.get(field), 0 if field in COUNTS else 1
        if value is not None and not (is_int(value) and value >= least):
            fail(field, f"it must be an integer >= {least}")

    def is_positive(value: object) -> bool:
        real = isinstance(value, (int, float)) and not isinstance(value, bool)
        return real and math.isfinite(value) and value > 0

    for field in POSITIVE_REALS:
        value = config.get(field)
        if value is not None and not is_positive(value):
            fail(field, "it must be a positive finite number")
    for field in FLAGS:
        if config.get(field) is not None and not isinstance(config[field], bool):
            fail(field, "it must be true or false")
    if config.get("hidden_act", "silu") not in SUPPORTED_ACTIVATIONS:
        fail("hidden_act", f"shardline supports {', '.join(SUPPORTED_ACTIVATIONS)}")
    _check_rope_scaling(config, fail, is_positive)
    if (config.get("partial_rotary_factor") or 1) > 1:
        fail("partial_rotary_factor", "it must be at most 1")
    heads, kv_heads = config["num_attention_heads"], num_kv_heads(config)
    if heads % kv_heads:
        fail("num_key_value_heads", f"it must divide num_attention_heads={heads}")
    if config.get("head_dim") is None and config["hidden_size"] % heads:
        fail("hidden_size", f"without head_dim it must be a multiple of "
                            f"num_attention_heads={heads}")
    if head_dim(config) % 2:
        fail("head_dim" if config.get("head_dim") else "hidden_size",
             f"the head size {head_dim(config)} must be even for rotary embeddings")
    rotary = int(head_dim(config) * (config.get("partial_rotary_factor") or 1.0))
    if rotary < 2 or rotary % 2:
        fail("partial_rotary_factor", f"it rotates {rotary} of the head's {head_dim(config)} "
                                      "dims, which must be even and at least 2")
    layers = config.get("mlp_only_layers")
    if layers is not None and not (isinstance(layers, list) and all(
            is_int(i) and 0 <= i < config["num_hidden_layers"] for i in layers)):
        fail("mlp_only_layers", f"it must be a list of layer indices below "
                                f"num_hidden_layers={config['num_hidden_layers']}")
    experts = num_experts(config)
    if architecture in MOE_SIZES and experts and config["num_experts_per_tok"] > experts:
        fail("num_experts_per_tok", f"it must be at most the {experts} experts")
    check_token_ids(config, source)


def check_token_ids(config: dict, source: str) -> None:
    """ValueError naming `source` (config.json or generation_config.json) if its
    eos_token_id is not a token id or a list of them, or its bos_token_id not a token id."""
    for field in ("eos_token_id", "bos_token_id"):
        value = config.get(field)
        ids = value if isinstance(value, list) and field == "eos_token_id" else [value]
        if value is not None and not all(isinstance(v, int) and not isinstance(v, bool)
                                         and v >= 0 for v in ids):
            raise ValueError(f"{source}: {field}={value!r} is invalid: it must be a token id "
                             "(an integer >= 0)"
                             + (" or a list of them" if field == "eos_token_id" else ""))


def _check_rope_scaling(config: dict, fail, is_positive) -> None:
    """rope_scaling and rope_parameters: objects (or null) of a supported RoPE type, with
    the fields that type reads."""
    for field in ("rope_scaling", "rope_parameters"):
        if config.get(field) is not None and not isinstance(config[field], dict):
            fail(field, "it must be an object (or null for plain RoPE)")
    field = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
    _, scaling = rope_settings(config)
    if scaling is None:
        return
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind not in SUPPORTED_ROPE_TYPES:
        fail(field, f"its type {kind!r} is not supported: use one of "
                    f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    bad = [f for f in ROPE_SCALING_FIELDS.get(kind, ()) if not is_positive(scaling.get(f))]
    if bad:
        fail(field, f"{kind} scaling needs {', '.join(bad)} as positive numbers")
    if kind == "llama3" and scaling["low_freq_factor"] == scaling["high_freq_factor"]:
        fail(field, "llama3 scaling needs low_freq_factor != high_freq_factor")


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
    theta = params.get("rope_theta") or config.get("rope_theta") or 10000.0
    scaling = config.get("rope_scaling") or params
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    return float(theta), (None if kind == "default" else scaling)


def max_positions(config: dict) -> int:
    """Positions the model serves correctly: max_position_embeddings, capped by a sliding
    attention window (not implemented here, so longer contexts are refused, not wrong)."""
    limit = config.get("max_position_embeddings") or 2048
    window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
    return min(limit, window) if window else limit
