"""What the planner needs to know about a model: its shapes, read from a config.json.

A model is named by a preset, a checkpoint directory, a config.json path, a GGUF file
(models/gguf.py indexes it into a config.json once) or one of the reference configs
(references.py: models too large to have here, described on paper). Nothing is loaded
but the config: the planner never touches weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shardline.models import hf_config
from shardline.planner.references import REFERENCE_MODELS

if TYPE_CHECKING:
    from shardline.models.loader import ModelInfo

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1}


@dataclass(frozen=True)
class ModelSpec:
    """Shapes of a decoder-only transformer, dense or MoE.

    `moe_layers` of the `num_layers` layers have routed experts (`num_experts`, each of
    `moe_intermediate` columns, `experts_per_token` chosen per token) plus an optional
    shared expert of `shared_intermediate` columns; the others have a dense MLP of
    `intermediate` columns. `dtype_bytes` is the size of one weight or KV element.
    """

    name: str
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tie_embeddings: bool = False
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate: int = 0
    shared_intermediate: int = 0
    moe_layers: int = 0
    dtype_bytes: int = 2

    @property
    def dense_layers(self) -> int:
        return self.num_layers - self.moe_layers

    def attention_params(self) -> int:
        """Q, K, V and O projections of one layer."""
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        return self.hidden * (2 * q + 2 * kv)

    def expert_params(self) -> int:
        """One routed expert (gate, up and down projections)."""
        return 3 * self.hidden * self.moe_intermediate

    def total_params(self) -> int:
        dense = self.dense_layers * 3 * self.hidden * self.intermediate
        moe = self.moe_layers * (self.num_experts * self.expert_params()
                                 + 3 * self.hidden * self.shared_intermediate
                                 + self.hidden * self.num_experts)
        embeddings = self.vocab * self.hidden * (1 if self.tie_embeddings else 2)
        return self.num_layers * self.attention_params() + dense + moe + embeddings

    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers, unsplit."""
        return 2 * self.num_layers * self.kv_heads * self.head_dim * self.dtype_bytes

    def model_info(self) -> ModelInfo:
        """The engine's description of the model, for its partition checks."""
        from shardline.models.loader import ModelInfo   # torch: only once a plan runs

        return ModelInfo(architecture=self.name, vocab_size=self.vocab,
                         max_position_embeddings=0, eos_token_ids=[], bos_token_id=None,
                         num_hidden_layers=self.num_layers, num_attention_heads=self.heads,
                         num_key_value_heads=self.kv_heads, head_dim=self.head_dim,
                         hidden_size=self.hidden, num_experts=self.num_experts)


def _count_moe_layers(config: dict, num_experts: int) -> int:
    """Layers with routed experts: all of them for Mixtral; for Qwen2-MoE every
    decoder_sparse_step-th layer not in mlp_only_layers; DeepSeek's first_k_dense_replace
    dense layers come first."""
    layers = config["num_hidden_layers"]
    if not num_experts:
        return 0
    step = config.get("decoder_sparse_step", 1) or 1
    dense_only = set(config.get("mlp_only_layers") or [])
    first_dense = config.get("first_k_dense_replace", 0)
    return sum(1 for i in range(layers)
               if i >= first_dense and i not in dense_only and (i + 1) % step == 0)


def spec_from_config(config: dict, name: str, dtype: str | None = None) -> ModelSpec:
    """A ModelSpec from a Hugging Face config.json dict; `dtype` overrides its
    torch_dtype (float32 when it names none)."""
    dtype = dtype or config.get("torch_dtype") or "float32"
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r} is not supported by the planner: use one of "
                         f"{', '.join(DTYPE_BYTES)}")
    experts = hf_config.num_experts(config)
    return ModelSpec(
        name=name, num_layers=config["num_hidden_layers"], hidden=config["hidden_size"],
        heads=config["num_attention_heads"], kv_heads=hf_config.num_kv_heads(config),
        head_dim=hf_config.head_dim(config), intermediate=config["intermediate_size"],
        vocab=config["vocab_size"], tie_embeddings=bool(config.get("tie_word_embeddings")),
        num_experts=experts, experts_per_token=config.get("num_experts_per_tok", 0),
        moe_intermediate=config.get("moe_intermediate_size") or config["intermediate_size"],
        shared_intermediate=config.get("shared_expert_intermediate_size", 0),
        moe_layers=_count_moe_layers(config, experts), dtype_bytes=DTYPE_BYTES[dtype])


def load_spec(source: str, dtype: str | None = None) -> ModelSpec:
    """The ModelSpec of a reference model, a preset, a GGUF file (the config shardline
    derives from its metadata, at its torch_dtype, not its quantized size), a checkpoint
    directory or a config.json file. A model preset (smollm2-135m-instruct) is fetched on
    first use, as the commands that run it do, for the config of its GGUF file."""
    from shardline.presets import MODEL_PRESETS, PRESETS, preset_names, resolve_model

    if source in REFERENCE_MODELS:
        return spec_from_config(REFERENCE_MODELS[source], source, dtype)
    if source in PRESETS:
        return spec_from_config(PRESETS[source], source, dtype)
    if source in MODEL_PRESETS:
        path = os.path.join(resolve_model(source), "config.json")
        return spec_from_config(hf_config.read_json_object(path), source, dtype)
    if source.endswith(".gguf") and os.path.isfile(source):
        from shardline.models.gguf import gguf_model_dir

        source = gguf_model_dir(source)
    path = os.path.join(source, "config.json") if os.path.isdir(source) else source
    if not os.path.isfile(path) or not path.endswith(".json"):
        raise ValueError(f"model={source!r} is not a reference model, a preset, a GGUF "
                         "file, a directory with config.json or a .json file: reference "
                         f"models are {', '.join(REFERENCE_MODELS)}; presets are "
                         f"{', '.join(preset_names())}")
    config = hf_config.read_json_object(path)
    hf_config.check_config(config, path, next(iter(config.get("architectures") or []), ""))
    return spec_from_config(config, os.path.basename(os.path.dirname(os.path.abspath(path))),
                            dtype)
