"""Llama-shaped bench models with random weights: their shapes, and checkpoints written
once from them (bench/e2e_decode.py decodes them, bench/startup.py starts them,
bench/start_shapes.py walks their kernel launches)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelShape:
    """The hyperparameters of a Llama-3 model with tied embeddings."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_position: int

    def hf_config(self, dtype: torch.dtype) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.hidden, "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim,
            "vocab_size": self.vocab, "max_position_embeddings": self.max_position,
            "rms_norm_eps": 1e-5, "hidden_act": "silu", "attention_bias": False,
            "tie_word_embeddings": True, "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            "bos_token_id": 1, "eos_token_id": 2,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Checkpoint tensors as Hugging Face's Llama names them (no lm_head: tied)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        shapes = {"model.embed_tokens.weight": (self.vocab, self.hidden),
                  "model.norm.weight": (self.hidden,)}
        for i in range(self.layers):
            p = f"model.layers.{i}"
            shapes.update({
                f"{p}.self_attn.q_proj.weight": (q, self.hidden),
                f"{p}.self_attn.k_proj.weight": (kv, self.hidden),
                f"{p}.self_attn.v_proj.weight": (kv, self.hidden),
                f"{p}.self_attn.o_proj.weight": (self.hidden, q),
                f"{p}.mlp.gate_proj.weight": (self.intermediate, self.hidden),
                f"{p}.mlp.up_proj.weight": (self.intermediate, self.hidden),
                f"{p}.mlp.down_proj.weight": (self.hidden, self.intermediate),
                f"{p}.input_layernorm.weight": (self.hidden,),
                f"{p}.post_attention_layernorm.weight": (self.hidden,),
            })
        return shapes

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return self.layers * 2 * self.kv_heads * self.head_dim * dtype.itemsize


LLAMA_3_2_1B = ModelShape(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8,
                          head_dim=64, vocab=128256, max_position=131072)
TINY = ModelShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, head_dim=16,
                  vocab=512, max_position=1024)


def checkpoint_path(shape: ModelShape, dtype: torch.dtype, device: torch.device) -> str:
    """Where checkpoint_dir keeps this model. The seeded weights differ with the device
    type that draws them (the CPU's and CUDA's generators differ), so it is in the name."""
    from shardline.presets import cache_root

    described = {"config": shape.hf_config(dtype), "drawn_on": torch.device(device).type}
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(cache_root(), "bench", f"llama-{shape.hidden}x{shape.layers}-{digest}")


def checkpoint_dir(shape: ModelShape, dtype: torch.dtype, device: torch.device) -> str:
    """A model directory with seeded random weights, written once and cached."""
    from shardline.presets import write_directory_once

    return write_directory_once(checkpoint_path(shape, dtype, device),
                                lambda out: write_checkpoint(shape, dtype, device, out))


def write_checkpoint(shape: ModelShape, dtype: torch.dtype, device: torch.device,
                     out_dir: str) -> None:
    """config.json and model.safetensors; weights ~ N(0, 1/fan_in), norms at 1, drawn on
    `device` (fast on a GPU) and stored in `dtype`."""
    from safetensors.torch import save_file
    gen = torch.Generator(device).manual_seed(0)
    tensors = {}
    for name, dims in shape.tensor_shapes().items():
        if len(dims) == 1:
            value = torch.ones(dims, device=device)
        else:
            value = torch.randn(dims, generator=gen, device=device) / dims[-1] ** 0.5
        tensors[name] = value.to(dtype).cpu()
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(shape.hf_config(dtype), f, indent=2)
