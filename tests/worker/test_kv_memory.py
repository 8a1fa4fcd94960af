"""KV cache sizing: from the memory free after loading (GPU share, CPU MemAvailable budget),
explicit overrides, the capacity log line, and the dtype a worker runs in."""

import gc
import json
import logging
import random
import shutil

import pytest
import torch

from shardline.config import CacheConfig
from shardline.presets import resolve_model
from shardline.worker import kv_memory
from shardline.worker.kv_memory import cpu_budget, gpu_budget, kv_cache_budget, mem_available_bytes
from worker_driver import make_worker

GIB = 1 << 30


@pytest.fixture(autouse=True)
def _seed_random(fresh_seed):
    random.seed(fresh_seed)


def test_mem_available_is_read_from_meminfo(tmp_path):
    kib = random.randint(1, 1 << 30)
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal:       {2 * kib} kB\nMemFree:   1 kB\nMemAvailable:   {kib} kB\n")
    assert mem_available_bytes(str(meminfo)) == kib * 1024
    meminfo.write_text("MemTotal: 5 kB\n")
    with pytest.raises(RuntimeError, match="no MemAvailable.*kv_cache_memory_bytes"):
        mem_available_bytes(str(meminfo))


def test_cpu_budget_is_a_share_of_mem_available_capped(monkeypatch):
    available = random.randint(GIB, 64 * GIB)
    monkeypatch.setattr(kv_memory, "mem_available_bytes", lambda meminfo=None: available)
    ranks = random.randint(1, 4)
    share = int(kv_memory.CPU_FRACTION * available) // ranks
    assert cpu_budget(ranks, usable_bytes=1 << 60).num_bytes == min(share, kv_memory.CPU_CAP_BYTES)
    usable = random.randint(1, share)
    budget = cpu_budget(ranks, usable_bytes=usable)
    assert budget.num_bytes == min(usable, kv_memory.CPU_CAP_BYTES)
    assert "MemAvailable" in budget.origin


def test_gpu_budget_is_the_utilization_share_minus_memory_in_use(monkeypatch):
    total = random.randint(8, 192) * GIB
    in_use = random.randint(0, total // 2)
    cached = random.randint(1, GIB)   # held by torch's allocator, used by nothing
    free = {"bytes": total - in_use - cached}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], total))
    monkeypatch.setattr(torch.cuda, "empty_cache",
                        lambda: free.update(bytes=total - in_use))
    utilization = random.uniform(0.5, 1.0)
    expected = int(utilization * total) - in_use
    assert gpu_budget(torch.device("cuda", 0), utilization).num_bytes == expected
    cache = CacheConfig(gpu_memory_utilization=utilization)
    budget = kv_cache_budget(cache, torch.device("cuda", 0), 1, usable_bytes=1)
    assert budget.num_bytes == expected and "gpu_memory_utilization" in budget.origin
    explicit = CacheConfig(kv_cache_memory_bytes=12345, gpu_memory_utilization=utilization)
    assert kv_cache_budget(explicit, torch.device("cuda", 0), 1, 1).num_bytes == 12345
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (0, total))
    assert gpu_budget(torch.device("cuda", 0), utilization).num_bytes == 0


def test_worker_sizes_the_cache_from_free_memory_and_logs_tokens(monkeypatch, caplog):
    monkeypatch.setenv("SHARDLINE_DEVICE", "cpu")
    worker = make_worker("tiny-llama", block_size=8, num_blocks=4)
    worker.config.cache.num_blocks = None
    block_bytes = worker.model_runner.kv_block_bytes()
    blocks = random.randint(2, 500)
    available = int(2 * blocks * block_bytes / kv_memory.CPU_FRACTION) + random.randrange(
        block_bytes)
    monkeypatch.setattr(kv_memory, "mem_available_bytes", lambda meminfo=None: available)
    worker.config.parallel.data_parallel_size = 2   # two ranks share the machine's memory
    with caplog.at_level(logging.INFO, logger="shardline"):
        assert worker.determine_num_kv_blocks() == blocks
    assert f"{blocks} blocks x 8 tokens = {blocks * 8} tokens" in caplog.text
    monkeypatch.setattr(kv_memory, "mem_available_bytes", lambda meminfo=None: 1 << 50)
    runner = worker.model_runner
    assert worker.determine_num_kv_blocks() == (worker.config.scheduler.max_num_seqs
                                                * -(-runner.max_model_len // 8))
    monkeypatch.setattr(kv_memory, "mem_available_bytes", lambda meminfo=None: block_bytes)
    with pytest.raises(ValueError, match="no memory is left for the KV cache.*MemAvailable"):
        worker.determine_num_kv_blocks()
    worker.config.cache.kv_cache_memory_bytes = 3 * block_bytes
    assert worker.determine_num_kv_blocks() == 3


def bf16_checkpoint(tmp_path) -> str:
    """tiny-llama whose config.json declares torch_dtype bfloat16."""
    model_dir = tmp_path / "bf16-llama"
    shutil.copytree(resolve_model("tiny-llama"), model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["torch_dtype"] = "bfloat16"
    (model_dir / "config.json").write_text(json.dumps(config))
    return str(model_dir)


def test_auto_dtype_is_float32_on_cpu_whatever_the_checkpoint_says(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDLINE_DEVICE", "cpu")
    worker = make_worker(bf16_checkpoint(tmp_path), dtype="auto")
    assert worker.model_runner.dtype == torch.float32
    for attn in worker.model_runner.model.attention_layers():
        assert attn.k_cache.dtype == attn.v_cache.dtype == torch.float32
    assert make_worker(bf16_checkpoint(tmp_path / "b"), dtype="bf16").model_runner.dtype \
        == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_worker_takes_checkpoint_dtype_and_sizes_kv_from_free_memory(tmp_path, caplog,
                                                                          monkeypatch):
    monkeypatch.delenv("SHARDLINE_DEVICE", raising=False)
    worker = make_worker(bf16_checkpoint(tmp_path), dtype="auto", num_blocks=4)
    worker.config.cache.num_blocks = None
    worker.config.cache.gpu_memory_utilization = 0.5
    assert worker.model_runner.dtype == torch.bfloat16
    garbage = torch.empty(1 << 28, dtype=torch.uint8, device=worker.device)
    del garbage   # cached by torch's allocator, yet free for the KV cache
    cached = torch.cuda.memory_reserved(worker.device) - torch.cuda.memory_allocated(worker.device)
    assert cached >= 1 << 28
    free, total = torch.cuda.mem_get_info(worker.device)
    with caplog.at_level(logging.INFO, logger="shardline"):
        blocks = worker.determine_num_kv_blocks()
    in_use = total - free - cached
    expected = (int(0.5 * total) - in_use) // worker.model_runner.kv_block_bytes()
    assert abs(blocks - expected) <= expected // 100 + 1
    assert f"= {blocks * worker.config.cache.block_size} tokens" in caplog.text


def _huge_pages_allowed() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def _anon_huge_kib(address: int) -> int:
    """AnonHugePages of the mapping of this process that holds `address`."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(part, 16) for part in head.split("-"))
                inside = start <= address < end
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_cpu_kv_cache_is_zeroed_writable_and_outlives_its_maker(dtype):
    shape = (random.randint(1, 300), 16, random.randint(1, 4), 64)
    cache = kv_memory.allocate_kv_cache(shape, dtype, torch.device("cpu"))
    assert cache.shape == shape and cache.dtype == dtype and cache.is_contiguous()
    assert cache.eq(0).all()
    values = torch.randn(shape).to(dtype)
    cache.copy_(values)
    gc.collect()  # the mapping lives as long as the tensor, not the function's locals
    assert torch.equal(cache, values)
    assert kv_memory.allocate_kv_cache((0, 16, 2, 64), dtype, torch.device("cpu")).numel() == 0


@pytest.mark.skipif(not _huge_pages_allowed(), reason="transparent huge pages are off")
def test_a_cpu_kv_cache_is_backed_by_huge_pages():
    """Decode attention reads the cache in scattered blocks; on 2 MiB pages they rarely
    miss the TLB."""
    blocks = random.randint(64, 128)  # 16-32 MiB
    cache = kv_memory.allocate_kv_cache((blocks, 16, 4, 1024), torch.float32,
                                        torch.device("cpu"))
    cache.fill_(1.0)
    # At least one: where memory is too fragmented for more, Linux falls back to 4 KiB pages.
    assert _anon_huge_kib(cache.data_ptr()) >= 2048


def test_anonymous_memory_asked_for_small_pages_gets_no_huge_ones():
    """What the bench compares the cache against: 4 KiB pages even where transparent huge
    pages are 'always'."""
    blocks = random.randint(64, 128)  # 16-32 MiB
    tensor = kv_memory.anonymous_tensor((blocks, 16, 4, 1024), torch.float32, huge_pages=False)
    assert tensor.eq(0).all()
    tensor.fill_(1.0)
    assert _anon_huge_kib(tensor.data_ptr()) == 0


def test_a_small_cap_is_shown_in_mib(rng, monkeypatch):
    """The cap of a tiny model's cache (max_num_seqs sequences of max_model_len) read
    'capped at 0.00 GiB'."""
    monkeypatch.setattr(kv_memory, "mem_available_bytes", lambda meminfo=None: 8 * GIB)
    usable = rng.randint(1, 1000) << 20
    budget = cpu_budget(1, usable)
    assert f"capped at {usable / (1 << 20):.2f} MiB" in budget.origin
    assert "MemAvailable 8.00 GiB" in budget.origin
