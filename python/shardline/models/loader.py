"""Loading a Hugging Face model directory: config, model class, and lazily read weights.

Weights are read per tensor, as slices with positioned reads (see safetensors_slices: no
memory map), so each rank reads only its part and its memory grows by that part alone.
Every parameter must be filled from the checkpoint; a missing or mis-shaped tensor is an
error that names it.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import time
from dataclasses import dataclass

import torch
from torch import nn

from shardline.layers.cpu_gemm import pack_cpu_weights
from shardline.models.gguf import GGUFCheckpoint, is_gguf_dir
from shardline.models.hf_config import (check_config, check_token_ids, head_dim, max_positions,
                                        num_experts, num_kv_heads, read_json_object)
from shardline.models.registry import get_model_class, resolve_architecture
from shardline.models.safetensors_slices import SafetensorsFile, TensorSlice

logger = logging.getLogger(__name__)
PROGRESS_INTERVAL_S = 2.0   # how often a long load reports how far it is

INDEX_FILE = "model.safetensors.index.json"
# Weights are cast from these to the engine's dtype; other types (integers, FP8) are
# quantized data whose scales a plain cast would ignore.
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
PICKLED = (".bin", ".pt", ".pth")   # torch.save checkpoints, which are not read
LAYER_TENSOR = re.compile(r"model\.layers\.(\d+)\.")


@dataclass
class ModelInfo:
    """What the engine needs to know about a checkpoint without loading it.

    max_position_embeddings is the longest context served correctly (see
    hf_config.max_positions); num_experts is 0 for a dense model."""

    architecture: str
    vocab_size: int
    max_position_embeddings: int
    eos_token_ids: list[int]
    bos_token_id: int | None
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_size: int
    num_experts: int = 0


def _broken_link(path: str) -> ValueError | PermissionError:
    """Why the symbolic link `path` leads to no file: its target (or, through a chain of
    links, the last one's) does not exist, the links loop, or this user cannot reach it."""
    link = f"{path} is a symbolic link to {os.readlink(path)!r}"
    try:
        os.stat(path)
    except PermissionError:
        return PermissionError(f"{link}, which this user cannot reach")
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return ValueError(f"{link}: a loop of symbolic links")
    if os.path.islink(os.path.join(os.path.dirname(path), os.readlink(path))):
        return ValueError(f"{link}, whose chain of links ends at {os.path.realpath(path)!r}, "
                          "which does not exist")
    return ValueError(f"{link}, which does not exist")


def read_config(model_dir: str) -> dict:
    """config.json of `model_dir`, checked: a ValueError names the file and the field of a
    config the model could not be built from."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        if not os.access(model_dir, os.R_OK | os.X_OK):
            raise PermissionError(f"model directory {model_dir!r} cannot be read by this user "
                                  f"(mode {os.stat(model_dir).st_mode & 0o777:o})")
        if os.path.exists(path):
            raise ValueError(f"{path} is not a regular file")
        if os.path.islink(path):  # a Hugging Face cache whose blobs were deleted
            raise _broken_link(path)
        raise FileNotFoundError(f"model directory {model_dir!r} has no config.json")
    config = read_json_object(path)
    check_config(config, path, resolve_architecture(config))
    return config


def _as_list(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def read_model_info(model_dir: str) -> ModelInfo:
    """Architecture, sizes and special tokens (eos from config.json and generation_config.json)."""
    config = read_config(model_dir)
    architecture = resolve_architecture(config)
    eos = _as_list(config.get("eos_token_id"))
    bos = config.get("bos_token_id")
    gen_path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(gen_path):
        generation = read_json_object(gen_path)
        check_token_ids(generation, gen_path)
        eos += [t for t in _as_list(generation.get("eos_token_id")) if t not in eos]
        bos = generation.get("bos_token_id", bos)
    return ModelInfo(
        architecture=architecture,
        vocab_size=config["vocab_size"],
        max_position_embeddings=max_positions(config),
        eos_token_ids=eos,
        bos_token_id=bos,
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=num_kv_heads(config),
        head_dim=head_dim(config),
        hidden_size=config["hidden_size"],
        num_experts=num_experts(config),
    )


class CheckpointReader:
    """The tensors of one or many safetensors files, opened on first use, read lazily.

    `source` says where tensors are looked up, for errors: the index's weight_map, or the
    files themselves."""

    def __init__(self, model_dir: str):
        self._handles: dict[str, SafetensorsFile] = {}
        index = os.path.join(model_dir, INDEX_FILE)
        if os.path.isfile(index):
            weight_map = read_json_object(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index} has no weight_map object (tensor name -> file)")
            odd = next((n for n, f in weight_map.items() if not isinstance(f, str)), None)
            if odd is not None:
                raise ValueError(f"{index}: weight_map[{odd!r}]={weight_map[odd]!r} is not a "
                                 "file name")
            self.index = index
            self.source = f"the weight_map of {index}"
            self.file_of = {name: os.path.join(model_dir, f) for name, f in weight_map.items()}
            absent = sorted({f for f in weight_map.values()
                             if not os.path.isfile(os.path.join(model_dir, f))})
            if absent:
                raise FileNotFoundError(f"{index} names {absent[0]!r}, which is not in "
                                        f"{model_dir!r} ({len(absent)} file(s) missing)")
        else:
            self.index = None
            files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
            if not files:
                pickled = sorted(f for f in os.listdir(model_dir) if f.endswith(PICKLED))
                raise FileNotFoundError(
                    f"model directory {model_dir!r} has no *.safetensors" + (
                        f"; it has {pickled[0]}, a PyTorch pickle, which shardline does not "
                        "load: convert the checkpoint to safetensors" if pickled else ""))
            self.source = (os.path.join(model_dir, files[0]) if len(files) == 1 else
                           f"the {len(files)} files {', '.join(files)} of {model_dir}")
            self.file_of = {}
            try:
                for f in files:
                    path = os.path.join(model_dir, f)
                    self._handles[path] = SafetensorsFile(path)
                    for name in self._handles[path].keys():
                        if name in self.file_of:
                            raise ValueError(
                                f"tensor {name!r} is in both {self.file_of[name]} and {path}: "
                                f"remove the file that does not belong, or add a {INDEX_FILE}")
                        self.file_of[name] = path
            except BaseException:
                self.close()
                raise

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def get_slice(self, name: str) -> TensorSlice:
        path = self.file_of[name]
        if path not in self._handles:
            self._handles[path] = SafetensorsFile(path)
        if name not in self._handles[path]:
            raise ValueError(f"{self.index} maps tensor {name!r} to {os.path.basename(path)!r}"
                             ", which does not hold it: the index does not match the files")
        tensor = self._handles[path].get_slice(name)
        if tensor.dtype not in WEIGHT_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} is {tensor.dtype}, expected one of "
                             f"{', '.join(map(str, WEIGHT_DTYPES))}: quantized checkpoints "
                             "(integer or FP8 weights) are not supported")
        return tensor

    def path_of(self, name: str) -> str:
        """The file holding tensor `name`, for errors."""
        return self.file_of[name]

    def names(self) -> list[str]:
        return list(self.file_of)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


def load_weights(model: nn.Module, reader: CheckpointReader) -> None:
    """Fill every parameter through its module's weight_loader from the checkpoint,
    logging the progress of a load that takes more than a few seconds."""
    params = dict(model.named_parameters())
    sources = model.weight_sources()
    started = reported = time.monotonic()
    for done, (param_name, alternatives) in enumerate(sources.items()):
        now = time.monotonic()
        if now - reported >= PROGRESS_INTERVAL_S:
            logger.info("loading weights: %d of %d parameters (%.0f%%), %.1f s", done,
                        len(sources), 100 * done / len(sources), now - started)
            reported = now
        best = max(alternatives, key=lambda alt: sum(name in reader for name, _, _ in alt))
        missing = [name for name, _, _ in best if name not in reader]
        if missing:
            shape = list(params[param_name].shape)
            raise ValueError(f"checkpoint tensor {missing[0]!r} is missing from "
                             f"{reader.source} (needed for parameter {param_name!r} of shape "
                             f"{shape} on this rank)")
        module = model.get_submodule(param_name.rpartition(".")[0])
        for name, shard_id, expert_id in best:
            extra = {} if expert_id is None else {"expert_id": expert_id}
            tensor = reader.get_slice(name)
            try:
                module.weight_loader(params[param_name], tensor, name, shard_id, **extra)
            except ValueError as exc:   # a shape the layer cannot take: name the file too
                raise ValueError(f"{reader.path_of(name)}: {exc}") from exc
    if reported != started:
        logger.info("loaded %d parameters in %.1f s", len(sources), time.monotonic() - started)


def warn_of_layers_beyond_config(reader: CheckpointReader | GGUFCheckpoint,
                                 num_layers: int) -> None:
    """Log a warning if the checkpoint holds decoder layers past config.json's
    num_hidden_layers: they are not loaded, and the model served is cut short, which
    usually means the config is not the checkpoint's own."""
    beyond = sorted({int(m[1]) for name in reader.names()
                     if (m := LAYER_TENSOR.match(name)) and int(m[1]) >= num_layers})
    if beyond:
        logger.warning("%s holds decoder layers %s beyond config.json's num_hidden_layers=%d: "
                       "they are not loaded. Is config.json the checkpoint's own?",
                       reader.source, f"{beyond[0]}-{beyond[-1]}" if len(beyond) > 1
                       else beyond[0], num_layers)


def load_model(model_dir: str, dtype: torch.dtype, device: torch.device | str,
               max_position: int | None = None, layers: range | None = None) -> nn.Module:
    """Build the model of `model_dir` on `device` in `dtype` and load its weights: this
    rank's slices of them, and only the decoder `layers` of its pipeline stage if given.
    On the CPU, the fp32 linear weights are then packed for oneDNN (layers.cpu_gemm)."""
    config = read_config(model_dir)
    cls = get_model_class(resolve_architecture(config))
    max_position = max_position or max_positions(config)
    with torch.device(device):
        model = cls(config, dtype, max_position, layers)
    reader = GGUFCheckpoint(model_dir) if is_gguf_dir(model_dir) else CheckpointReader(model_dir)
    try:
        load_weights(model, reader)
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            warn_of_layers_beyond_config(reader, config["num_hidden_layers"])
    finally:
        reader.close()
    pack_cpu_weights(model)
    return model.eval()
