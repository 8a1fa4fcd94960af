"""The tokenizer and chat template of a GGUF file, rebuilt from its metadata.

GGUF stores the vocabulary as arrays (tokenizer.ggml.tokens, .token_type, .merges) and
the special token ids; this module turns them into a Hugging Face `tokenizers` object
(saved as tokenizer.json) and a tokenizer_config.json holding the chat template, so a
GGUF model is served through the same tokenizer path as a checkpoint directory.

Only byte-level BPE vocabularies (tokenizer.ggml.model 'gpt2', as Llama 3, Qwen2 and
SmolLM use) are rebuilt. The pre-tokenizer follows tokenizer.ggml.pre: 'smollm' splits
digits one by one ahead of the GPT-2 rules, as SmolLM's own tokenizer and llama.cpp do;
other values use the GPT-2 rules alone.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

CONTROL, USER_DEFINED = 3, 4   # tokenizer.ggml.token_type values of special tokens
SUPPORTED_MODELS = ("gpt2",)
_DIGIT_SPLITTING = ("smollm",)


def build_tokenizer(meta: dict) -> Tokenizer:
    """A byte-level BPE tokenizer equal to the one the GGUF metadata `meta` describes."""
    kind = meta.get("tokenizer.ggml.model")
    if kind not in SUPPORTED_MODELS:
        raise ValueError(f"GGUF tokenizer.ggml.model={kind!r} is not supported: shardline "
                         f"rebuilds {', '.join(SUPPORTED_MODELS)} (byte-level BPE) tokenizers")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if len(types) != len(tokens):
        raise ValueError(f"GGUF tokenizer.ggml.token_type has {len(types)} entries for the "
                         f"{len(tokens)} tokens of tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    vocab = {t: i for i, t in enumerate(tokens)}
    bad = next((m for m in merges if len(m) != 2 or not all(t in vocab for t in m)), None)
    if bad is not None:
        raise ValueError(f"GGUF tokenizer.ggml.merges holds {' '.join(bad)!r}, which is not two "
                         "tokens of tokenizer.ggml.tokens joined by a space")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if meta.get("tokenizer.ggml.pre") in _DIGIT_SPLITTING:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types) if kind == CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, kind in zip(tokens, types) if kind == USER_DEFINED])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        if not 0 <= bos < len(tokens):
            raise ValueError(f"GGUF tokenizer.ggml.bos_token_id={bos} is not one of the "
                             f"{len(tokens)} tokens of tokenizer.ggml.tokens")
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A {tokens[bos]} $B",
            special_tokens=[(tokens[bos], bos)])
    return tokenizer


def tokenizer_config(meta: dict) -> dict:
    """tokenizer_config.json fields: the chat template and the special tokens' text."""
    tokens = meta["tokenizer.ggml.tokens"]
    config: dict = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for field, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                       ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None and 0 <= token_id < len(tokens):
            config[field] = tokens[token_id]
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    return config
