"""GGUF files: dequantization of every supported type against the gguf package's own,
a tiny Llama written with the gguf writer against transformers loading the same file, and
unsupported types, architectures and tensors refused by name."""

from __future__ import annotations

import re
import warnings
from typing import Callable

import gguf
import numpy as np
import pytest
import torch
import transformers

from shardline.models.gguf import GGUFCheckpoint, gguf_model_dir, hf_tensor_name
from shardline.models.gguf_quants import SUPPORTED_TYPES
from shardline.models.gguf_tokenizer import build_tokenizer
from shardline.presets import resolve_model
from worker_driver import WorkerDriver, make_worker

TINY = dict(hidden=64, inter=96, layers=2, heads=4, kv_heads=2, vocab=96)
# GGUF tensor kind -> type it is stored in, so one small model covers every supported type
TYPES = {"token_embd": "Q8_0", "output": "Q4_0", "attn_q": "Q4_1", "attn_k": "Q4_0",
         "attn_v": "Q8_0", "attn_output": "F16", "ffn_gate": "BF16", "ffn_up": "Q4_1",
         "ffn_down": "F32", "attn_norm": "F32", "ffn_norm": "F32", "output_norm": "F32"}


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Companion directories of the files written here go to the test's own cache."""
    monkeypatch.setenv("SHARDLINE_CACHE", str(tmp_path / "cache"))


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """How llama.cpp's converter stores q/k rows: each head's two halves interleaved."""
    return (w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2)
            .reshape(w.shape))


def encode(values: np.ndarray, type_name: str) -> np.ndarray:
    if type_name == "F32":
        return values.astype(np.float32)
    if type_name == "F16":
        return values.astype(np.float16)
    return gguf.quants.quantize(values, gguf.GGMLQuantizationType[type_name])


def reference(data: np.ndarray, type_name: str) -> np.ndarray:
    """The gguf package's own dequantization of stored `data`."""
    if type_name in ("F32", "F16"):
        return data.astype(np.float32)
    return gguf.quants.dequantize(data, gguf.GGMLQuantizationType[type_name])


def write_tiny_llama(path: str, rng: np.random.Generator, types: dict[str, str] = TYPES,
                     arch: str = "llama", extra: dict[str, np.ndarray] | None = None,
                     metadata: Callable[[gguf.GGUFWriter], None] | None = None
                     ) -> dict[str, np.ndarray]:
    """Write a random tiny Llama GGUF, with more `metadata` written by that function if
    given; returns the stored data of each tensor by name."""
    c = TINY
    dim = c["hidden"] // c["heads"]
    writer = gguf.GGUFWriter(path, arch)
    if metadata:
        metadata(writer)
    writer.add_block_count(c["layers"])
    writer.add_context_length(256)
    writer.add_embedding_length(c["hidden"])
    writer.add_feed_forward_length(c["inter"])
    writer.add_head_count(c["heads"])
    writer.add_head_count_kv(c["kv_heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(c["vocab"])
    shapes = {"token_embd.weight": (c["vocab"], c["hidden"]),
              "output.weight": (c["vocab"], c["hidden"]), "output_norm.weight": (c["hidden"],)}
    for i in range(c["layers"]):
        for kind, shape in (("attn_q", (c["hidden"], c["hidden"])),
                            ("attn_k", (c["kv_heads"] * dim, c["hidden"])),
                            ("attn_v", (c["kv_heads"] * dim, c["hidden"])),
                            ("attn_output", (c["hidden"], c["hidden"])),
                            ("ffn_gate", (c["inter"], c["hidden"])),
                            ("ffn_up", (c["inter"], c["hidden"])),
                            ("ffn_down", (c["hidden"], c["inter"])),
                            ("attn_norm", (c["hidden"],)), ("ffn_norm", (c["hidden"],))):
            shapes[f"blk.{i}.{kind}.weight"] = shape
    stored = {}
    for name, shape in shapes.items():
        kind = name.split(".")[-2]
        if kind.endswith("norm"):
            values = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            values = rng.standard_normal(shape) / shape[-1] ** 0.5
        if kind in ("attn_q", "attn_k"):
            values = llama_cpp_permute(values, c["heads"] if kind == "attn_q" else c["kv_heads"])
        stored[name] = encode(values.astype(np.float32), types[kind])
    for name, data in {**stored, **(extra or {})}.items():
        type_name = types.get(name.split(".")[-2], "F32")
        writer.add_tensor(name, data, raw_dtype=None if type_name in ("F32", "F16")
                          else gguf.GGMLQuantizationType[type_name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def test_every_type_dequantizes_as_the_gguf_package_does(tmp_path, fresh_seed):
    rng = np.random.default_rng(fresh_seed)
    path = str(tmp_path / "tiny.gguf")
    stored = write_tiny_llama(path, rng)
    assert set(TYPES.values()) == set(SUPPORTED_TYPES)
    checkpoint = GGUFCheckpoint(gguf_model_dir(path))
    try:
        for name, data in stored.items():
            kind = name.split(".")[-2]
            if kind in ("attn_q", "attn_k"):
                continue   # un-permuted on load: checked against transformers below
            got = checkpoint.get_slice(hf_tensor_name(name))[...]
            expected = reference(data, TYPES[kind]).reshape(got.shape)
            assert got.dtype == torch.float32
            assert torch.equal(got, torch.from_numpy(expected)), name
    finally:
        checkpoint.close()


def test_slices_equal_the_slices_of_the_whole_tensor(tmp_path, fresh_seed):
    """A rank reads only its rows (whole heads of q/k, reordered per head); other slices
    are cut from whole rows."""
    rng = np.random.default_rng(fresh_seed)
    path = str(tmp_path / "tiny.gguf")
    stored = write_tiny_llama(path, rng)
    head_dim = TINY["hidden"] // TINY["heads"]
    checkpoint = GGUFCheckpoint(gguf_model_dir(path))
    try:
        for name in stored:
            tensor = checkpoint.get_slice(hf_tensor_name(name))
            whole = tensor[...]
            rows = whole.shape[0]
            cuts = [(0, rows), (head_dim, min(rows, 3 * head_dim))]
            cuts.append(tuple(sorted(int(x) for x in rng.choice(rows + 1, 2, replace=False))))
            for start, stop in cuts:
                assert torch.equal(tensor[start:stop], whole[start:stop]), (name, start, stop)
            if whole.dim() == 2:
                cols = whole.shape[1]
                assert torch.equal(tensor[:, cols // 4:cols // 2], whole[:, cols // 4:cols // 2])
    finally:
        checkpoint.close()


def test_tiny_llama_matches_transformers_loading_the_same_file(tmp_path, fresh_seed):
    rng = np.random.default_rng(fresh_seed)
    path = str(tmp_path / "tiny.gguf")
    write_tiny_llama(path, rng)
    model_dir = resolve_model(path)
    prompts = [rng.integers(0, TINY["vocab"], int(n)).tolist() for n in rng.integers(3, 20, 3)]
    logits = WorkerDriver(make_worker(model_dir)).prompt_logits(prompts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32).eval()
    for prompt, ours in zip(prompts, logits):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0]
        rel = (ours - ref).abs().max() / ref.abs().max()
        assert rel < 1e-4, f"relative error {rel:.2e}"


def test_unsupported_type_is_named(tmp_path, fresh_seed):
    rng = np.random.default_rng(fresh_seed)
    path = str(tmp_path / "q5.gguf")
    write_tiny_llama(path, rng, {**TYPES, "ffn_up": "Q5_0"})
    with pytest.raises(ValueError, match=r"'blk\.0\.ffn_up\.weight' has type Q5_0.*Q4_1"):
        resolve_model(path)


def test_unsupported_architecture_is_named(tmp_path, fresh_seed):
    path = str(tmp_path / "gemma.gguf")
    write_tiny_llama(path, np.random.default_rng(fresh_seed), arch="gemma")
    with pytest.raises(ValueError, match="architecture='gemma' is not supported.*llama"):
        resolve_model(path)


def test_unknown_tensor_is_named(tmp_path, fresh_seed):
    path = str(tmp_path / "extra.gguf")
    write_tiny_llama(path, np.random.default_rng(fresh_seed),
                     extra={"rope_freqs.weight": np.ones(8, np.float32)})
    with pytest.raises(ValueError, match="'rope_freqs.weight' has no counterpart"):
        resolve_model(path)


def _with_tokenizer(bos: int = 0, merges: list[str] | None = None,
                    types: list[int] | None = None) -> Callable[[gguf.GGUFWriter], None]:
    def add(writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list([f"t{i}" for i in range(TINY["vocab"])])
        writer.add_bos_token_id(bos)
        writer.add_add_bos_token(True)
        if merges:
            writer.add_token_merges(merges)
        if types:
            writer.add_token_types(types)
    return add


@pytest.mark.parametrize("case, error", [
    ("type", r"tensor 'blk\.\d\.ffn_up\.weight' has type Q5_0"),
    ("architecture", "general.architecture='gemma' is not supported"),
    ("tensor", "tensor 'rope_freqs.weight' has no counterpart"),
    ("bos", r"tokenizer.ggml.bos_token_id=\d+ is not one of the 96 tokens"),
    ("merge without a space", "tokenizer.ggml.merges holds 't1t2', which is not two tokens"),
    ("merge of unknown tokens", "tokenizer.ggml.merges holds 't1 zz', which is not two tokens"),
    ("token types short", "tokenizer.ggml.token_type has 95 entries for the 96 tokens"),
])
def test_what_a_gguf_file_holds_but_shardline_cannot_serve_names_the_file(
        tmp_path, fresh_seed, case, error):
    """Refusals of a readable file name it too (the bos id out of the vocabulary was a
    bare IndexError, a bad merge the tokenizers package's TypeError or Exception, and token
    types fewer than the tokens were cut to the shorter)."""
    rng = np.random.default_rng(fresh_seed)
    path = str(tmp_path / f"{case}.gguf")
    write_tiny_llama(path, rng, types={**TYPES, "ffn_up": "Q5_0"} if case == "type" else TYPES,
                     arch="gemma" if case == "architecture" else "llama",
                     extra={"rope_freqs.weight": np.ones(8, np.float32)} if case == "tensor"
                     else None,
                     metadata=_tokenizer_case(case, rng))
    with pytest.raises(ValueError, match=f"^{re.escape(path)}: (GGUF )?{error}"):
        resolve_model(path)


def _tokenizer_case(case: str, rng: np.random.Generator
                    ) -> Callable[[gguf.GGUFWriter], None] | None:
    if case == "bos":
        return _with_tokenizer(bos=TINY["vocab"] + int(rng.integers(1000)))
    if case.startswith("merge"):
        return _with_tokenizer(merges=["t1t2" if "space" in case else "t1 zz"])
    if case == "token types short":
        return _with_tokenizer(types=[1] * (TINY["vocab"] - 1))
    return None


def _type_offset(path: str, tensor: str) -> int:
    """Where the type id of `tensor`'s info is in the GGUF file: after its name (length and
    bytes), its dimension count and its dimensions."""
    info = next(t for t in gguf.GGUFReader(path).tensors if t.name == tensor).field
    return info.offset + 8 + len(tensor.encode()) + 4 + 8 * int(info.parts[2][0])


@pytest.mark.parametrize("damage", ["cut", "garbage", "empty", "unknown type"])
def test_an_unreadable_gguf_file_is_named(tmp_path, fresh_seed, damage):
    """A GGUF cut short, not a GGUF, empty, or holding a type id the gguf package does not
    know: one ValueError naming the file, not the parser's bare error."""
    rng = np.random.default_rng(fresh_seed)
    path = tmp_path / "broken.gguf"
    write_tiny_llama(str(path), rng)
    data = bytearray(path.read_bytes())
    if damage == "cut":
        data = data[:int(rng.integers(1, len(data)))]
    elif damage == "garbage":
        data = bytearray(rng.bytes(len(data)))
    elif damage == "empty":
        data = bytearray()
    else:
        at = _type_offset(str(path), f"blk.{rng.integers(TINY['layers'])}.ffn_up.weight")
        data[at:at + 4] = (200 + int(rng.integers(1000))).to_bytes(4, "little")
    path.write_bytes(data)
    print("file of", len(data), "bytes")
    with pytest.raises(ValueError, match=f"{re.escape(str(path))} \\({len(data)} bytes\\) is "
                                         "not a readable GGUF file, or is cut short: "):
        resolve_model(str(path))


def _vocab_meta(pre: str) -> dict:
    tokens = ["<s>", "<|im_end|>", "1", "2", "12", "Ġ", "a", "b", "ab", "<tool>"]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": [3, 3] + [1] * 7 + [4],
            "tokenizer.ggml.merges": ["a b", "1 2"], "tokenizer.ggml.bos_token_id": 0,
            "tokenizer.ggml.add_bos_token": True}


def test_tokenizer_from_metadata():
    """Control tokens are special (whole, skipped in decoding), user-defined ones whole but
    kept; 'smollm' splits digits one by one as SmolLM's tokenizer does; BOS as asked."""
    text = "12 ab<|im_end|><tool>"
    smollm = build_tokenizer(_vocab_meta("smollm"))
    ids = smollm.encode(text).ids
    assert ids == [0, 2, 3, 5, 8, 1, 9]
    assert smollm.decode(ids) == "12 ab<tool>"
    assert smollm.decode(ids, skip_special_tokens=False) == "<s>" + text
    assert build_tokenizer(_vocab_meta("gpt2")).encode(text).ids == [0, 4, 5, 8, 1, 9]
    with pytest.raises(ValueError, match="tokenizer.ggml.model='llama' is not supported"):
        build_tokenizer({**_vocab_meta("gpt2"), "tokenizer.ggml.model": "llama"})
