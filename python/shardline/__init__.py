"""shardline: distributed LLM inference runtime.

The public names are imported on first use, so a worker process or a tool that needs only
`shardline.ipc` or `shardline.kernels` does not load the engine, torch or tokenizers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "LLM": "shardline.engine.llm",
    "AsyncLLM": "shardline.engine.async_llm",
    "SamplingParams": "shardline.sampling_params",
    "TextPrompt": "shardline.engine.prompts",
    "TokensPrompt": "shardline.engine.prompts",
    "RequestOutput": "shardline.engine.outputs",
    "CompletionOutput": "shardline.engine.outputs",
    "EngineArgs": "shardline.engine.engine_args",
    "EngineDeadError": "shardline.executor.base",
}

# Spelled out, not list(_EXPORTS), so that type checkers see the re-exports; a test keeps
# the two equal.
__all__ = ["LLM", "AsyncLLM", "SamplingParams", "TextPrompt", "TokensPrompt", "RequestOutput",
           "CompletionOutput", "EngineArgs", "EngineDeadError"]

if TYPE_CHECKING:
    from shardline.engine.async_llm import AsyncLLM
    from shardline.engine.engine_args import EngineArgs
    from shardline.engine.llm import LLM
    from shardline.engine.outputs import CompletionOutput, RequestOutput
    from shardline.engine.prompts import TextPrompt, TokensPrompt
    from shardline.executor.base import EngineDeadError
    from shardline.sampling_params import SamplingParams


def __getattr__(name: str) -> Any:
    if name == "__version__":   # the installed distribution's, read on first use
        from importlib.metadata import PackageNotFoundError, version
        try:
            globals()[name] = version("shardline")
        except PackageNotFoundError:
            # An AttributeError, so that getattr(shardline, "__version__", None) works.
            raise AttributeError("shardline.__version__ is unknown: this shardline is a "
                                 "source tree that is not installed (pip install -e .)") from None
        return globals()[name]
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'shardline' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | {"__version__"})
