"""The joint read's partial attentions: each fast path equals the portable reference, and merging partials by their
log-sum-exp equals one attention over all their keys."""

import pytest
import torch

from attention_duplex import attention_with_lse, cpu_flash_attention_with_lse, merge_attentions


def random_attention(seed: int, heads: int = 6, kv_heads: int = 2, queries: int = 5, keys: int = 11):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(2, heads, queries, 16, generator=generator)
    key, value = (torch.randn(2, kv_heads, keys, 16, generator=generator) for _ in range(2))
    visible = torch.rand(2, 1, queries, keys, generator=generator) > 0.4
    visible[0, 0, 1] = False  # a query that sees nothing: zeros and -inf, never NaN
    return query, key, value, visible


@pytest.mark.parametrize("masked", [True, False])
def test_cpu_flash_read_equals_the_reference(masked):
    query, key, value, visible = random_attention(0)
    visible = visible if masked else None
    with torch.no_grad():
        out, lse = cpu_flash_attention_with_lse(query, key, value, visible, 0.25)
        ref_out, ref_lse = attention_with_lse(query, key, value, visible, 0.25)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=0)
    if masked:
        assert torch.equal(out[0, :, 1], torch.zeros_like(out[0, :, 1])) and torch.isinf(lse[0, :, 1]).all()


def test_partials_merged_by_their_log_sum_exp_equal_one_attention():
    query, key, value, visible = random_attention(1)
    whole, _ = attention_with_lse(query, key, value, visible, 0.25)
    parts = [attention_with_lse(query, key[:, :, s], value[:, :, s], visible[..., s], 0.25) for s in
             (slice(0, 4), slice(4, 9), slice(9, 11))]  # fmt: skip
    torch.testing.assert_close(merge_attentions(parts), whole, atol=1e-6, rtol=0)
