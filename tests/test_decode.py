"""The decode step's own paths against the general ones they stand in for."""

import pytest
import torch
import torch.nn.functional as F

from minifastv.llama import one_query_attention


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (8, 1)])
@pytest.mark.parametrize("masked", [False, True])
def test_one_query_attention_is_sdpa(heads, kv_heads, masked):
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    B, S, D = 3, 37, 16
    q = torch.randn(B, heads, 1, D, generator=g)
    k, v = (torch.randn(B, kv_heads, 50, D, generator=g)[:, :, :S] for _ in range(2))  # views, as the cache gives
    mask = None
    if masked:  # left padding: sample 1 lacks its first 5 keys, sample 2 its first 30
        mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
        mask[1, ..., :5] = mask[2, ..., :30] = False
    got = one_query_attention(q, k, v, mask)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=heads != kv_heads)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
