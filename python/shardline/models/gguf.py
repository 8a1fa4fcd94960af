"""Serving a GGUF file (llama.cpp's format) through the checkpoint-directory path.

Parsing a GGUF header with the `gguf` package takes seconds (it walks the vocabulary
token by token), too long to repeat in every worker. So a GGUF file is indexed once into
a companion directory in shardline's cache: config.json, generation_config.json,
tokenizer.json and tokenizer_config.json (with the chat template) built from the file's
metadata, and gguf_tensors.json, the Hugging Face name, type, shape and file offset of
every tensor. `resolve_model("model.gguf")` returns that directory; the engine reads it
like any checkpoint directory, and `load_model` reads its weights through
`GGUFCheckpoint`, straight from the GGUF file.

Supported: the Llama architecture (general.architecture 'llama', which also covers
Mistral), with tensors of the types in gguf_quants. Anything else is an error naming
the architecture, tensor or type, raised while indexing, before any worker starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import TYPE_CHECKING

import torch

from shardline.models.gguf_quants import check_type, dequantize, tensor_nbytes
from shardline.models.gguf_tokenizer import build_tokenizer, tokenizer_config
from shardline.presets import cache_root, write_directory_once

if TYPE_CHECKING:
    import gguf

log = logging.getLogger("shardline")

GGUF_INDEX = "gguf_tensors.json"
INDEX_VERSION = 2   # part of the cache key: bump when what the index holds changes
ARCHITECTURES = {"llama": "LlamaForCausalLM"}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_CHUNK = 1 << 30   # bytes per pread call


def is_gguf_path(path: str) -> bool:
    return path.endswith(".gguf") and os.path.isfile(path)


def is_gguf_dir(model_dir: str) -> bool:
    """Whether `model_dir` is the companion directory of a GGUF file."""
    return os.path.isfile(os.path.join(model_dir, GGUF_INDEX))


def hf_tensor_name(name: str) -> str:
    """The Hugging Face name of a GGUF tensor, e.g. blk.3.attn_q.weight ->
    model.layers.3.self_attn.q_proj.weight; ValueError for a tensor with no counterpart."""
    base, _, leaf = name.rpartition(".")
    parts = base.split(".")
    if len(parts) == 1 and parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{leaf}"
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{leaf}"
    raise ValueError(f"GGUF tensor {name!r} has no counterpart in shardline's Llama model: "
                     "the file needs a feature shardline does not support")


def gguf_model_dir(path: str) -> str:
    """The companion directory of the GGUF file at `path`, built on first use.

    Keyed by the file's real path, size and modification time, so a changed file is
    indexed anew."""
    path = os.path.realpath(path)
    stat = os.stat(path)
    key = json.dumps([INDEX_VERSION, path, stat.st_size, stat.st_mtime_ns])
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    stem = os.path.basename(path).removesuffix(".gguf")
    target = os.path.join(cache_root(), "gguf", f"{stem}-{digest}")
    return write_directory_once(target, lambda out: _write_companion(path, out))


def _write_companion(path: str, out_dir: str) -> None:
    import gguf

    start = time.perf_counter()
    log.info("indexing GGUF file %s (once; kept in %s)", path, os.path.dirname(out_dir))
    try:
        reader = gguf.GGUFReader(path)
        meta = {name: field.contents() for name, field in reader.fields.items()
                if not name.startswith("GGUF.")}
    except Exception as exc:   # the gguf package's own: a bare ValueError, IndexError, ...
        raise ValueError(f"{path} ({os.path.getsize(path)} bytes) is not a readable GGUF "
                         f"file, or is cut short: {type(exc).__name__}: {exc}") from exc
    try:
        _write_index(path, reader, meta, out_dir)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    log.info("indexed %d tensors of %s in %.1f s", len(reader.tensors), os.path.basename(path),
             time.perf_counter() - start)


def _write_index(path: str, reader: "gguf.GGUFReader", meta: dict, out_dir: str) -> None:
    """The companion directory's files from the parsed file; a ValueError names the tensor
    or metadata key shardline cannot serve."""
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        check_type(t.tensor_type.name, shape, t.name)
        tensors[hf_tensor_name(t.name)] = dict(
            gguf_name=t.name, type=t.tensor_type.name, shape=list(shape),
            offset=int(t.data_offset), nbytes=tensor_nbytes(t.tensor_type.name, shape))
    config = model_config(meta, tensors)
    for name, entry in tensors.items():
        if ".self_attn.q_proj." in name or ".self_attn.k_proj." in name:
            entry["rotary_head_dim"] = config["head_dim"]
    _write_json(os.path.join(out_dir, GGUF_INDEX),
                {"file": path, "size": os.path.getsize(path), "tensors": tensors})
    _write_json(os.path.join(out_dir, "config.json"), config)
    _write_json(os.path.join(out_dir, "generation_config.json"),
                {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]})
    if "tokenizer.ggml.tokens" in meta:
        build_tokenizer(meta).save(os.path.join(out_dir, "tokenizer.json"))
        _write_json(os.path.join(out_dir, "tokenizer_config.json"), tokenizer_config(meta))


def model_config(meta: dict, tensors: dict[str, dict]) -> dict:
    """A Hugging Face config.json dict from the GGUF metadata and the tensor index."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"GGUF general.architecture={arch!r} is not supported: shardline "
                         f"loads {', '.join(ARCHITECTURES)}")

    def get(key: str, default: object = KeyError) -> object:
        value = meta.get(f"{arch}.{key}", default)
        if value is KeyError:
            raise ValueError(f"GGUF file has no {arch}.{key}, which a {arch} model needs")
        if isinstance(value, list):
            raise ValueError(f"GGUF {arch}.{key}={value!r} varies by layer, which shardline "
                             "does not support")
        return value

    scaling = get("rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(f"GGUF {arch}.rope.scaling.type={scaling!r} is not supported: "
                         "shardline loads GGUF files with plain RoPE")
    hidden, heads = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", hidden // heads)
    embed = tensors.get("model.embed_tokens.weight")
    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
           if meta.get(k) is not None]
    config = dict(
        architectures=[ARCHITECTURES[arch]], model_type=arch,
        vocab_size=get("vocab_size", embed["shape"][0] if embed else KeyError),
        hidden_size=hidden, intermediate_size=get("feed_forward_length"),
        num_hidden_layers=get("block_count"), num_attention_heads=heads,
        num_key_value_heads=get("attention.head_count_kv", heads), head_dim=head_dim,
        max_position_embeddings=get("context_length"),
        rms_norm_eps=get("attention.layer_norm_rms_epsilon"),
        rope_theta=get("rope.freq_base", 10000.0), hidden_act="silu",
        tie_word_embeddings="lm_head.weight" not in tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=sorted(set(eos)), torch_dtype=_torch_dtype(tensors))
    rotary = get("rope.dimension_count", head_dim)
    if rotary != head_dim:
        config["partial_rotary_factor"] = rotary / head_dim
    return config


def _torch_dtype(tensors: dict[str, dict]) -> str:
    """The dtype "auto" runs a GPU in: the matrices' own float type, else bfloat16."""
    types = {e["type"] for e in tensors.values() if len(e["shape"]) == 2}
    return {frozenset({"F32"}): "float32", frozenset({"F16"}): "float16"}.get(
        frozenset(types), "bfloat16")


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def unpermute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of q/k rows for its rotary layout.

    llama.cpp rotates interleaved pairs (rows 2i, 2i+1 of a head), Hugging Face models the
    two halves (rows i, i + head_dim/2); converting to GGUF interleaves each head's
    halves. Taking the even rows of each head, then the odd ones, restores the halves."""
    rows = weight.shape[0]
    return (weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).transpose(1, 2)
            .reshape(weight.shape))


class GGUFCheckpoint:
    """The tensors of a GGUF file under their Hugging Face names, read as the loader asks:
    `get_slice(name)[index]` reads and dequantizes only the rows that `index` selects.

    A tensor parallel rank thus dequantizes only its rows of a column-parallel matrix
    (q/k/v, gate/up, the vocabulary of the embedding and LM head). A slice of columns (o
    and down projections) dequantizes whole rows, then keeps its columns: such a rank
    briefly holds one whole tensor in float32, fine for the small models served from
    GGUF here.
    """

    def __init__(self, model_dir: str):
        with open(os.path.join(model_dir, GGUF_INDEX)) as f:
            index = json.load(f)
        self.path, self.tensors = index["file"], index["tensors"]
        self.source = self.path   # where tensors are looked up, for errors
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        size = os.fstat(self._fd).st_size
        if size != index["size"]:
            os.close(self._fd)
            raise ValueError(f"{self.path} has {size} bytes, but {model_dir} indexed it with "
                             f"{index['size']}: it changed; resolve the .gguf path again")

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get_slice(self, name: str) -> "GGUFTensor":
        return GGUFTensor(self, self.tensors[name])

    def path_of(self, name: str) -> str:
        """The file holding tensor `name`, for errors: the GGUF file."""
        return self.path

    def names(self) -> list[str]:
        return list(self.tensors)

    def read(self, entry: dict, offset: int, nbytes: int) -> torch.Tensor:
        """`nbytes` bytes of a tensor's data from `offset` into it, as a uint8 tensor."""
        raw = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(raw.numpy())
        for done in range(0, nbytes, _CHUNK):
            part = view[done:done + _CHUNK]
            if os.preadv(self._fd, [part], entry["offset"] + offset + done) != len(part):
                raise OSError(f"{self.path}: tensor {entry['gguf_name']!r} is cut short "
                              "(was the file truncated?)")
        return raw

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class GGUFTensor:
    """One tensor of a GGUFCheckpoint: `get_shape()`, and indexing with basic slices as
    for TensorSlice, which returns the selected values in float32."""

    def __init__(self, checkpoint: GGUFCheckpoint, entry: dict):
        self.checkpoint, self.entry = checkpoint, entry
        self.shape = tuple(entry["shape"])

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, index: object) -> torch.Tensor:
        index = () if index is Ellipsis else index if isinstance(index, tuple) else (index,)
        rows = index[0] if index else slice(None)
        start, stop, step = rows.indices(self.shape[0])
        head_dim = self.entry.get("rotary_head_dim")
        # Rows are read alone only in whole heads of q/k, whose rows are reordered per head.
        if len(self.shape) == 1 or step != 1 or (head_dim and (start % head_dim
                                                               or stop % head_dim)):
            start, stop, rest = 0, self.shape[0], index
        else:
            rest = (slice(None), *index[1:])
        row_bytes = self.entry["nbytes"] // self.shape[0]
        raw = self.checkpoint.read(self.entry, start * row_bytes, (stop - start) * row_bytes)
        value = dequantize(raw, self.entry["type"], (stop - start, *self.shape[1:]))
        if head_dim:
            value = unpermute_rotary(value, (stop - start) // head_dim)
        return value[rest]
