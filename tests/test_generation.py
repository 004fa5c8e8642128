"""
Generation with the KV cache (GPT.forward_cached, GPT.stream) against the uncached reference (GPT.forward),
in every residual mode.
"""

import pytest
import torch

from conftest import TINY_MODEL, tiny_gpt
from ddl_gpt import KVCache

GENERATION_MODES = {
    "add": dict(residual="add"),
    "delta": dict(residual="delta"),
    "delta_dv4_expand_conv": dict(residual="delta", d_v=4, expand_conv=True),
    "delta_dv4_no_expand_conv": dict(residual="delta", d_v=4, expand_conv=False),
    "write": dict(residual="write"),
}
each_mode = pytest.mark.parametrize("mode", list(GENERATION_MODES.values()), ids=list(GENERATION_MODES))
VOCAB = TINY_MODEL["vocab_size"]


def trained_like_gpt(block_size=32, **mode):
    """A tiny GPT in eval mode with every parameter moved off its init (identity-started pieces such as
    the EC convolution and the compressor mixes included), so that no path is trivially the identity."""
    model = tiny_gpt(block_size=block_size, **mode).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def prompt(batch=2, length=5, seed=0):
    return torch.randint(VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))  # (B, T)


@each_mode
@torch.no_grad()
def test_each_cached_step_gives_the_logits_of_a_full_forward_pass(mode):
    model = trained_like_gpt(**mode)
    idx = prompt(length=24)
    cache = KVCache()
    cached = [model.forward_cached(idx[:, :2], cache)]  # 2 tokens: the EC's first taps fall before the start
    cached += [model.forward_cached(idx[:, t:t + 1], cache) for t in range(2, 24)]
    reference = [model(idx[:, :t + 1])[0] for t in range(1, 24)]
    torch.testing.assert_close(torch.cat(cached, 1), torch.cat(reference, 1), rtol=0, atol=1e-5)


@each_mode
@torch.no_grad()
def test_cached_and_uncached_greedy_generation_pick_the_same_tokens(mode):
    model, idx = trained_like_gpt(**mode), prompt()
    cached = model.generate(idx, max_new_tokens=20, temperature=0)
    assert torch.equal(cached, model.generate(idx, max_new_tokens=20, temperature=0, use_cache=False))
    assert cached[:, 5:].unique().numel() > 1   # the model does not just repeat one token


@each_mode
@torch.no_grad()
def test_generation_past_block_size_matches_the_uncached_reference_that_crops_the_context(mode):
    model, idx = trained_like_gpt(block_size=16, **mode), prompt(length=10)
    cached = model.generate(idx, max_new_tokens=20, top_k=1)   # 30 tokens > block_size: the cache refills
    assert torch.equal(cached, model.generate(idx, max_new_tokens=20, top_k=1, use_cache=False))


@torch.no_grad()
def test_a_cache_extended_by_several_tokens_at_once_matches_forward():
    model, idx = trained_like_gpt(residual="delta", d_v=4), prompt(length=12)
    cache = KVCache()
    model.forward_cached(idx[:, :5], cache)
    torch.testing.assert_close(model.forward_cached(idx[:, 5:], cache), model(idx)[0], rtol=0, atol=1e-5)


@torch.no_grad()
def test_temperature_zero_takes_the_likeliest_token():
    model, idx = trained_like_gpt(), prompt()
    torch.manual_seed(0)
    assert torch.equal(model.generate(idx, max_new_tokens=10, temperature=0),
                       model.generate(idx, max_new_tokens=10, top_k=1))
