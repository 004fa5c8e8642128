"""
The GPT around the delta update: causality, the expanded state, the additive baseline, trainability,
parameter accounting, configuration checks, precision and generation (DDL.md §2-§4 and §6).
"""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import MODES, TINY_MODEL, all_logits, perturb, random_tokens, tiny_gpt
from ddl_gpt import GPTConfig
from generate import generate

each_mode = pytest.mark.parametrize("mode", list(MODES.values()), ids=list(MODES))
VOCAB, T = TINY_MODEL["vocab_size"], TINY_MODEL["block_size"]


@pytest.mark.parametrize("mode", [dict(residual="add"), dict(residual="delta"),
                                  dict(residual="delta", d_v=4, expand_conv=True)],
                         ids=["add", "delta", "delta_dv4_expand_conv"])
def test_logits_at_position_t_do_not_depend_on_later_tokens(mode):
    model = perturb(tiny_gpt(**mode)).eval()
    t = 7
    idx = random_tokens()
    changed = idx.clone()
    changed[:, t + 1:] = (idx[:, t + 1:] + 1) % VOCAB
    before, after = all_logits(model, idx), all_logits(model, changed)
    torch.testing.assert_close(after[:, :t + 1], before[:, :t + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, t + 1], before[:, t + 1])  # the changed tokens are read at all


def test_expansion_convolution_at_init_repeats_the_embedding_over_d_v_channels():
    model = tiny_gpt(residual="delta", d_v=4, expand_conv=True)
    embedding = model.transformer.wte(random_tokens())                # (B, T, d)
    state = model.transformer.expand(embedding)                       # (B, T, d, d_v)
    assert torch.equal(state, embedding[..., None].expand(*embedding.shape, 4))


def test_expansion_convolution_reads_the_current_and_three_previous_tokens_only():
    expand = perturb(tiny_gpt(residual="delta", d_v=4, expand_conv=True)).transformer.expand
    embedding = torch.randn(1, T, TINY_MODEL["n_embd"])
    t = 5
    moved = embedding.clone()
    moved[:, t] += 1.0
    with torch.no_grad():
        differs = (expand(moved) != expand(embedding)).flatten(2).any(-1)[0]   # (T,): which positions changed
    assert differs.tolist() == [t <= position <= t + 3 for position in range(T)]


def test_additive_mode_is_an_ordinary_pre_norm_gpt():
    """x = wte(idx); per block x += attn(ln_1(x)), x += mlp(ln_2(x)); logits = lm_head(ln_f(x))."""
    model = perturb(tiny_gpt(residual="add")).eval()
    idx = random_tokens()
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    with torch.no_grad():
        x = model.transformer.wte(idx)
        for block in model.transformer.h:
            x = x + block.attn(block.ln_1(x), cos, sin)
            x = x + block.mlp(block.ln_2(x))
        reference = model.lm_head(model.transformer.ln_f(x))
        torch.testing.assert_close(all_logits(model, idx), reference, rtol=0, atol=1e-5)


@each_mode
def test_initial_loss_is_close_to_log_vocab_size(mode):
    idx = random_tokens(batch=8)
    _, loss = tiny_gpt(**mode)(idx, random_tokens(batch=8, seed=1))
    assert abs(loss.item() - math.log(VOCAB)) < 0.2


@each_mode
def test_every_mode_overfits_one_fixed_batch(mode):
    model = tiny_gpt(**mode)
    idx, targets = random_tokens(batch=4), random_tokens(batch=4, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(50):
        _, loss = model(idx, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert model(idx, targets)[1].item() < 0.3   # from ln(65) = 4.17


@each_mode
def test_eval_mode_is_deterministic_with_dropout_and_train_mode_is_not(mode):
    model = tiny_gpt(dropout=0.2, **mode)
    idx = random_tokens()
    model.eval()
    assert torch.equal(all_logits(model, idx), all_logits(model, idx))
    model.train()
    assert not torch.equal(all_logits(model, idx), all_logits(model, idx))


@pytest.mark.parametrize("residual, d_v, expand_conv", [("delta", 1, True), ("write", 1, True),
                                                        ("delta", 4, True), ("delta", 4, False)])
def test_parameter_overhead_over_the_additive_model_matches_the_formula(residual, d_v, expand_conv):
    d, n_layer = TINY_MODEL["n_embd"], TINY_MODEL["n_layer"]
    expanded = d_v > 1
    per_block = 2 * (d + 1) + 2 * d_v * (d + 1) + expanded * d * d_v   # 2 gates, 2 value maps, 1 compressor
    expected = n_layer * per_block + expanded * d * d_v + (expanded and expand_conv) * 4 * d * d_v
    overhead = (tiny_gpt(residual=residual, d_v=d_v, expand_conv=expand_conv).num_params()
                - tiny_gpt(residual="add").num_params())
    assert overhead == expected


@pytest.mark.parametrize("settings, message", [
    (dict(residual="add", d_v=4), "residual='add'"),
    (dict(residual="sum"), "residual='sum'"),
    (dict(beta_init=0.0), "beta_init"),
    (dict(beta_init=2.0), "beta_init"),
    (dict(value_map="tanh"), "value_map='tanh'"),
    (dict(d_v=0), "d_v"),
    (dict(n_embd=30, n_head=4), "n_head"),
], ids=["add_with_expanded_state", "unknown_residual", "beta_init_0", "beta_init_2", "unknown_value_map",
        "d_v_0", "odd_head_size"])
def test_config_rejects_invalid_settings_with_a_message(settings, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**TINY_MODEL | settings)


@each_mode
def test_residual_state_and_loss_stay_float32_under_bf16_autocast(mode):
    model = tiny_gpt(**mode)
    state_dtypes = []
    for block in model.transformer.h:
        block.register_forward_hook(lambda module, inputs, output: state_dtypes.append(output[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(random_tokens(), random_tokens(seed=1))
    assert state_dtypes == [torch.float32] * TINY_MODEL["n_layer"]
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())


def generated(model, idx, max_new_tokens, **settings):
    """The prompt idx (B, T) followed by generate's new tokens: (B, T + max_new_tokens)."""
    steps = list(generate(model, idx, max_new_tokens, **settings))           # max_new_tokens lists of B ids
    new = torch.tensor(steps, dtype=torch.long).T.reshape(idx.size(0), max_new_tokens)  # (B, n)
    return torch.cat((idx, new), dim=1)


@torch.no_grad()
def test_generate_extends_an_expanded_state_model_by_max_new_tokens():
    idx = random_tokens(batch=3, length=5)
    out = generated(tiny_gpt(residual="delta", d_v=4).eval(), idx, 7)
    assert out.shape == (3, 12)
    assert torch.equal(out[:, :5], idx)


@torch.no_grad()
def test_generate_crops_a_context_longer_than_block_size_to_its_last_block_size_tokens():
    model = perturb(tiny_gpt()).eval()
    long = random_tokens(batch=2, length=T + 4)
    out = generated(model, long, 3, top_k=1)              # top_k=1: greedy, deterministic
    cropped = generated(model, long[:, -T:], 3, top_k=1)
    assert out.shape == (2, T + 7)
    assert torch.equal(out[:, -3:], cropped[:, -3:])


@torch.no_grad()
def test_vocab_limit_keeps_sampled_ids_below_the_limit():
    model, idx, limit = tiny_gpt().eval(), random_tokens(batch=8, length=4), 5
    limited = generated(model, idx, 20, vocab_limit=limit)[:, 4:]
    unlimited = generated(model, idx, 20)[:, 4:]
    assert (limited < limit).all()
    assert (unlimited >= limit).any()   # without the limit, the nearly uniform model samples above it


def test_forward_refuses_a_sequence_longer_than_block_size():
    with pytest.raises(ValueError, match="block_size"):
        tiny_gpt()(random_tokens(length=T + 1))


def test_greedy_sampling_follows_the_argmax_of_the_logits():
    model, idx = perturb(tiny_gpt()).eval(), random_tokens(batch=4, length=6)
    with torch.no_grad():
        next_ids = generated(model, idx, 1, top_k=1)[:, -1]
        assert torch.equal(next_ids, F.softmax(model(idx)[0][:, -1], dim=-1).argmax(-1))
