import pytest
import torch

from shardline.kernels import reference
from shardline.layers.attention import torch_paged_attention

BLOCK, HQ, HK, D = 4, 4, 2, 8


def _paged_setup(seq_lens, q_lens, num_blocks=64):
    k_cache = torch.randn(num_blocks, BLOCK, HK, D)
    v_cache = torch.randn(num_blocks, BLOCK, HK, D)
    max_blocks = max(-(-s // BLOCK) for s in seq_lens) + 1
    perm = torch.randperm(num_blocks)
    tables = perm[:len(seq_lens) * max_blocks].view(len(seq_lens), max_blocks).int()
    qsl = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)), dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), HQ, D)
    return q, k_cache, v_cache, tables, qsl, torch.tensor(seq_lens, dtype=torch.int32)


@pytest.mark.parametrize("seq_lens,q_lens", [
    ([7, 13, 1], [7, 13, 1]),          # whole prompts
    ([9, 20, 5, 6], [3, 8, 1, 1]),     # chunks after a cached prefix, and decodes
])
def test_prefill_matches_reference(seq_lens, q_lens):
    q, kc, vc, tables, qsl, lens = _paged_setup(seq_lens, q_lens)
    ours = torch_paged_attention(q, kc, vc, tables, qsl, lens, 0.3)
    ref = reference.paged_prefill_attention(q, kc, vc, tables, qsl, lens, 0.3)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_decode_matches_reference():
    seq_lens = [int(x) for x in torch.randint(1, 30, (6,))]
    q, kc, vc, tables, qsl, lens = _paged_setup(seq_lens, [1] * 6)
    ours = torch_paged_attention(q, kc, vc, tables, qsl, lens, 0.3)
    ref = reference.paged_decode_attention(q, kc, vc, tables, lens, 0.3)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
