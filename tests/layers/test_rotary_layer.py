import pytest
import torch

from shardline.layers.rotary import RotaryEmbedding, llama3_inv_freq


def test_rotation_keeps_norms_and_position_zero():
    rope = RotaryEmbedding(16, 16, 64, 10000.0)
    q, k = torch.randn(5, 3, 16), torch.randn(5, 1, 16)
    positions = torch.tensor([0, 1, 7, 30, 63])
    rq, rk = rope(positions, q, k)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(rq[0], q[0])
    # Attention scores depend only on the distance between query and key positions.
    def score(q_pos: int, k_pos: int) -> torch.Tensor:
        rq = rope(torch.tensor([q_pos]), q[:1], k[:1])[0][0, 0]
        rk = rope(torch.tensor([k_pos]), q[:1], k[:1])[1][0, 0]
        return rq @ rk
    torch.testing.assert_close(score(3, 1), score(10, 8), rtol=1e-4, atol=1e-4)

def test_llama3_scaling_slows_only_long_wavelengths():
    inv = 1.0 / (500000.0 ** (torch.arange(0, 32, 2).float() / 32))
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)
    scaled = llama3_inv_freq(inv, scaling)
    wavelen = 2 * torch.pi / inv
    assert torch.equal(scaled[wavelen < 16], inv[wavelen < 16])
    torch.testing.assert_close(scaled[wavelen > 64], inv[wavelen > 64] / 8)


def test_unsupported_rope_type_is_named():
    with pytest.raises(ValueError, match="rope_type='yarn' is not supported.*llama3"):
        RotaryEmbedding(16, 16, 64, 10000.0, {"rope_type": "yarn", "factor": 2.0})
