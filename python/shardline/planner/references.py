"""config.json fields of models planned on paper, too large to have on this machine.

Only the fields the planner reads. `deepseek-v3-sized` has DeepSeek-V3's sizes (61
layers, hidden 7168, 128 heads, 256 routed experts of 2048 columns with 8 chosen per
token, one shared expert, the first 3 layers dense with 18432 columns, vocab 129280) but
shardline's attention: grouped-query attention with 8 KV heads of 128 dimensions, in
place of DeepSeek's multi-head latent attention, which shardline does not implement.
Its precision is float8, as DeepSeek-V3's released weights are (the planner counts the
KV cache in float8 too); in bfloat16 its 675 B parameters would take 1.35 TB.
"""

from __future__ import annotations

REFERENCE_MODELS: dict[str, dict] = {
    "llama-3-70b": dict(architectures=["LlamaForCausalLM"], model_type="llama",
                        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                        vocab_size=128256, tie_word_embeddings=False, torch_dtype="bfloat16"),
    "llama-3-8b": dict(architectures=["LlamaForCausalLM"], model_type="llama",
                       hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       vocab_size=128256, tie_word_embeddings=False, torch_dtype="bfloat16"),
    "deepseek-v3-sized": dict(architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe",
                              hidden_size=7168, intermediate_size=18432, num_hidden_layers=61,
                              num_attention_heads=128, num_key_value_heads=8, head_dim=128,
                              vocab_size=129280, tie_word_embeddings=False,
                              num_experts=256, num_experts_per_tok=8,
                              moe_intermediate_size=2048, shared_expert_intermediate_size=2048,
                              first_k_dense_replace=3, torch_dtype="float8"),
}
