"""Model classes by the `architectures` name of a Hugging Face config.json."""

from __future__ import annotations

from torch import nn

from shardline.models.llama import LlamaForCausalLM, Qwen2ForCausalLM
from shardline.models.mixtral import MixtralForCausalLM, Qwen2MoeForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
}


def resolve_architecture(config: dict) -> str:
    """The first supported name in config["architectures"]; ValueError listing supported."""
    names = config.get("architectures") or []
    if not isinstance(names, list):
        raise ValueError(f"architectures={names!r} is invalid: it must be a list of model "
                         f"class names, such as {[next(iter(MODEL_REGISTRY))]}")
    for name in names:
        if name in MODEL_REGISTRY:
            return name
    raise ValueError(f"architectures={names!r} is not supported: use one of "
                     f"{', '.join(MODEL_REGISTRY)}")


def get_model_class(architecture: str) -> type[nn.Module]:
    if architecture not in MODEL_REGISTRY:
        raise ValueError(f"architecture={architecture!r} is not supported: use one of "
                         f"{', '.join(MODEL_REGISTRY)}")
    return MODEL_REGISTRY[architecture]
