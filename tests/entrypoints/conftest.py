"""Fixtures of the entrypoint tests: a served engine per test module, and its client."""

import os

import pytest

from server_helpers import MODEL, TIMEOUT, running_app


@pytest.fixture(scope="module")
def server(tiny_chat_model):
    """(AsyncLLM, base URL) of a server running in a thread; shut down after the module.

    The tests ask the engine directly and then the server for the same greedy request and
    compare the texts. With prefix caching the second run finds the prompt's blocks cached
    and computes the rest apart, which moves logprobs by up to 4e-6 (tiny-llama, 10 of 15
    random prompts), enough to flip a greedy token at a near tie; without it both runs
    compute the same arithmetic, bit for bit."""
    # The kernels are not under test here: the torch reference keeps the steps fast.
    from shardline.engine.async_llm import AsyncLLM
    from shardline.entrypoints.app import build_app

    previous = os.environ.get("SHARDLINE_DISABLE_TRITON")
    os.environ["SHARDLINE_DISABLE_TRITON"] = "1"
    llm = AsyncLLM(tiny_chat_model, block_size=4, num_kv_blocks=256, max_model_len=512,
                   enable_prefix_caching=False)
    try:
        with running_app(build_app(llm, MODEL)) as url:
            yield llm, url
    finally:
        llm.shutdown()
        if previous is None:
            os.environ.pop("SHARDLINE_DISABLE_TRITON", None)
        else:
            os.environ["SHARDLINE_DISABLE_TRITON"] = previous


@pytest.fixture
def client(server):
    import openai

    return openai.OpenAI(base_url=server[1] + "/v1", api_key="unused", timeout=TIMEOUT,
                         max_retries=0)
