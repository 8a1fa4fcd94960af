"""The Llama family: Llama 2/3, Mistral and Qwen2.

Pre-norm decoder layers of GQA attention with RoPE and a SiLU-gated MLP. Qwen2 adds a
bias to the q/k/v projections. The decoder layer takes its MLP from a factory so the MoE
models reuse everything else.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

from shardline.distributed.parallel_state import get_sp_group
from shardline.layers.attention import Attention, AttentionMetadata
from shardline.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from shardline.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear,
                                     RowParallelLinear)
from shardline.layers.norm import RMSNorm
from shardline.layers.rotary import RotaryEmbedding
from shardline.layers.sequence_parallel import (gather_tokens, split_tokens,
                                                ulysses_attention)
from shardline.models.hf_config import head_dim, num_kv_heads, rope_settings

WeightSources = dict[str, list[list[tuple[str, object, int | None]]]]


def rotary_embedding(config: dict, max_position: int) -> RotaryEmbedding:
    """The model's RoPE, one module whose cos/sin table (max_position x rotary dim, in
    fp32) every layer shares: a table per layer cost Llama 3.1 8B 2 GiB."""
    theta, scaling = rope_settings(config)
    dim = head_dim(config)
    rotary_dim = int(dim * (config.get("partial_rotary_factor") or 1.0))
    return RotaryEmbedding(dim, rotary_dim, max_position, theta, scaling)


class LlamaAttention(nn.Module):
    def __init__(self, config: dict, dtype: torch.dtype, rotary_emb: RotaryEmbedding,
                 qkv_bias: bool, o_bias: bool):
        super().__init__()
        hidden, heads = config["hidden_size"], config["num_attention_heads"]
        dim = head_dim(config)
        self.qkv_proj = QKVParallelLinear(hidden, dim, heads, num_kv_heads(config), qkv_bias, dtype)
        self.o_proj = RowParallelLinear(heads * dim, hidden, o_bias, dtype)
        self.rotary_emb = rotary_emb
        self.head_dim = dim
        self.q_size = self.qkv_proj.num_heads * dim
        self.kv_size = self.qkv_proj.num_kv_heads * dim
        # Under sequence parallelism attention runs on 1/SP of this rank's heads (a KV head
        # fewer than SP ranks share is kept whole by each of them).
        self.sp = get_sp_group().size
        self.attn = Attention(self.qkv_proj.num_heads // self.sp, dim,
                              max(1, self.qkv_proj.num_kv_heads // self.sp), dim ** -0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata,
                residual: torch.Tensor, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(attention + residual), attention + residual), the attention block's output
        added to the residual stream and normed for the MLP."""
        if self.sp > 1:
            q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = q.reshape(q.shape[0], -1, self.head_dim)
            k = k.reshape(k.shape[0], -1, self.head_dim)
            v = v.reshape(v.shape[0], -1, self.head_dim)
            q, k = self.rotary_emb(positions, q, k)
            context = ulysses_attention(self.attn, q, k, v, meta)
        else:
            context = self.attn.forward_projected(x, self.qkv_proj, self.rotary_emb, positions,
                                                  meta)
        return self.o_proj.forward_and_norm(context, residual, norm)


class LlamaMLP(nn.Module):
    """down(SiLU(gate(x)) * up(x)), the gate and up projections merged into one layer whose
    GEMM applies the SiLU-multiply in its epilogue; `bias` as Llama's `mlp_bias`."""

    def __init__(self, hidden_size: int, intermediate_size: int, dtype: torch.dtype,
                 bias: bool = False):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size, intermediate_size], bias=bias, dtype=dtype)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias,
                                           dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj.silu_mul(x))

    def forward_and_norm(self, x: torch.Tensor, residual: torch.Tensor, norm: RMSNorm
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(mlp(x) + residual), mlp(x) + residual), the norm fused where it can be."""
        return self.down_proj.forward_and_norm(self.gate_up_proj.silu_mul(x), residual, norm)


class DecoderLayer(nn.Module):
    """Attention and MLP blocks, each pre-normed.

    Each norm is applied at the end of the block before it, fused with that block's
    output projection and residual add (see RowParallelLinear.forward_and_norm): so a layer
    takes its input already normed by its `input_layernorm`, and normalizes its output
    with the next layer's (or the final) norm when the caller passes it.
    """

    def __init__(self, config: dict, dtype: torch.dtype, rotary_emb: RotaryEmbedding,
                 mlp: nn.Module, mlp_name: str, qkv_bias: bool, o_bias: bool):
        super().__init__()
        self.self_attn = LlamaAttention(config, dtype, rotary_emb, qkv_bias, o_bias)
        self.mlp_name = mlp_name
        setattr(self, mlp_name, mlp)
        eps = config.get("rms_norm_eps") or 1e-6
        self.input_layernorm = RMSNorm(config["hidden_size"], eps, dtype)
        self.post_attention_layernorm = RMSNorm(config["hidden_size"], eps, dtype)

    def forward(self, positions: torch.Tensor, normed: torch.Tensor, residual: torch.Tensor,
                meta: AttentionMetadata, next_norm: RMSNorm | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """`normed` = input_layernorm(`residual`) -> (next_norm(out), out) for the layer's
        residual stream out; without `next_norm`, (MLP output, residual) not yet added."""
        hidden, residual = self.self_attn(positions, normed, meta, residual,
                                          self.post_attention_layernorm)
        mlp = getattr(self, self.mlp_name)
        if next_norm is None:
            return mlp(hidden), residual
        return mlp.forward_and_norm(hidden, residual, next_norm)

    def norm_input(self, hidden: torch.Tensor, residual: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first layer of a stage: (input_layernorm(h), h) for h = hidden + residual,
        from the embedding (no residual yet) or from the previous stage."""
        if residual is None:
            return self.input_layernorm(hidden), hidden
        return self.input_layernorm(hidden, residual)


class IntermediateTensors(NamedTuple):
    """What one pipeline stage hands the next: the hidden states and the residual, [T, H]."""

    hidden: torch.Tensor
    residual: torch.Tensor


class CausalLM(nn.Module):
    """Embedding, decoder layers, final norm and LM head; subclasses choose the layers.

    Under pipeline parallelism a model holds only its stage's `layers` (the other layers
    are empty placeholders, so parameter names keep the checkpoint's indices); the first
    stage also holds the embedding, the last the final norm and the LM head.
    """

    def __init__(self, config: dict, dtype: torch.dtype, max_position: int,
                 make_layer: Callable[[int], DecoderLayer], layers: range | None = None):
        super().__init__()
        vocab, hidden = config["vocab_size"], config["hidden_size"]
        num_layers = config["num_hidden_layers"]
        self.config = config
        self.layer_range = range(num_layers) if layers is None else layers
        self.is_first_stage = self.layer_range.start == 0
        self.is_last_stage = self.layer_range.stop == num_layers
        self.model = nn.Module()
        self.model.embed_tokens = (VocabParallelEmbedding(vocab, hidden, dtype)
                                   if self.is_first_stage else None)
        self.model.layers = nn.ModuleList(make_layer(i) if i in self.layer_range else nn.Identity()
                                          for i in range(num_layers))
        self.model.norm = None
        self.lm_head = None
        if self.is_last_stage:
            self.model.norm = RMSNorm(hidden, config.get("rms_norm_eps") or 1e-6, dtype)
            self.lm_head = ParallelLMHead(vocab, hidden, dtype)
            if config.get("tie_word_embeddings", False) and self.is_first_stage:
                self.lm_head.weight = self.model.embed_tokens.weight

    def attention_layers(self) -> list[Attention]:
        return [self.model.layers[i].self_attn.attn for i in self.layer_range]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata, intermediate: IntermediateTensors | None = None
                ) -> torch.Tensor | IntermediateTensors:
        """Flat token batch [T] -> final hidden states [T, H]; K/V go to the paged cache.

        A stage after the first starts from the previous stage's `intermediate`; a stage
        before the last returns its own IntermediateTensors instead of hidden states.
        Under sequence parallelism the layers see only this rank's share of the tokens
        (and so do the IntermediateTensors); the last stage returns all of them on SP rank
        0 and None on the other SP ranks.
        """
        num_tokens = positions.shape[0]
        positions = split_tokens(positions)
        if self.is_first_stage:
            hidden, residual = self.model.embed_tokens(split_tokens(input_ids)), None
        else:
            hidden, residual = intermediate
        layers = self.model.layers
        hidden, residual = layers[self.layer_range.start].norm_input(hidden, residual)
        for i in self.layer_range:
            next_norm = (layers[i + 1].input_layernorm if i + 1 in self.layer_range
                         else self.model.norm)
            hidden, residual = layers[i](positions, hidden, residual, meta, next_norm)
        if not self.is_last_stage:
            return IntermediateTensors(hidden, residual)
        return gather_tokens(hidden, num_tokens)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def weight_sources(self) -> WeightSources:
        """For each parameter, alternative lists of (checkpoint tensor, shard, expert) that
        fill it; the loader picks the alternative the checkpoint holds most of and reports
        its missing tensors."""
        sources: WeightSources = {}
        for name, _ in self.named_parameters():
            prefix, _, leaf = name.rpartition(".")
            module = prefix.rpartition(".")[2]
            if module == "qkv_proj":
                base = prefix[:-len("qkv_proj")]
                sources[name] = [[(f"{base}{p}_proj.{leaf}", p, None) for p in "qkv"]]
            elif module == "gate_up_proj":
                base = prefix[:-len("gate_up_proj")]
                sources[name] = [[(f"{base}gate_proj.{leaf}", 0, None),
                                  (f"{base}up_proj.{leaf}", 1, None)]]
            elif name == "lm_head.weight" and self.config.get("tie_word_embeddings", False):
                # A last stage without the embedding reads the tied matrix under its name.
                sources[name] = [[(name, None, None)],
                                 [("model.embed_tokens.weight", None, None)]]
            else:
                sources[name] = self.expert_sources(name) or [[(name, None, None)]]
        return sources

    def expert_sources(self, name: str) -> list[list[tuple[str, object, int | None]]]:
        """Checkpoint sources of stacked expert weights; none in a dense model."""
        return []


class LlamaForCausalLM(CausalLM):
    """Llama 2/3 and Mistral (attention_bias applies to q/k/v and o), Qwen2 (q/k/v bias)."""

    qkv_bias_always = False

    def __init__(self, config: dict, dtype: torch.dtype, max_position: int,
                 layers: range | None = None):
        qkv_bias = self.qkv_bias_always or config.get("attention_bias", False)
        o_bias = config.get("attention_bias", False) and not self.qkv_bias_always
        rotary = rotary_embedding(config, max_position)

        def make_layer(i: int) -> DecoderLayer:
            mlp = LlamaMLP(config["hidden_size"], config["intermediate_size"], dtype,
                           config.get("mlp_bias", False))
            return DecoderLayer(config, dtype, rotary, mlp, "mlp", qkv_bias, o_bias)

        super().__init__(config, dtype, max_position, make_layer, layers)


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias_always = True
