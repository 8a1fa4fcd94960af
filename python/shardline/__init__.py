"""shardline: distributed LLM inference runtime."""

from shardline.engine.async_llm import AsyncLLM
from shardline.engine.llm import LLM
from shardline.engine.outputs import CompletionOutput, RequestOutput
from shardline.engine.sampling_params import SamplingParams

__all__ = ["LLM", "AsyncLLM", "SamplingParams", "RequestOutput", "CompletionOutput"]
