"""
The wiring of the method (DDL.md §2-§4): which tensor feeds which map, where each piece is read,
how the model is initialized, where dropout acts, and which parameters are decayed.

test_delta_math.py checks the update equation on its own, test_model.py the model's behaviour;
the tests here check that the pieces are connected as §2-§4 say, each in a way that fails when
two plausible inputs (c and x_in, rotary and norm, one compressor and another, h and the write)
are swapped.
"""

import math

import pytest
import torch
import torch.nn as nn

from conftest import MODES, TINY_MODEL, all_logits, perturb, random_tokens, tiny_gpt
from ddl_gpt import Block, Compress, DeltaUpdate, GPT, GPTConfig, gate_statistics

VOCAB, T, D = TINY_MODEL["vocab_size"], TINY_MODEL["block_size"], TINY_MODEL["n_embd"]
EPS = 1e-5   # RMSNorm eps and the eps of k = h / sqrt(|h|^2 + eps^2), DDL.md §2 and §4


def rms_norm(x, gain):
    """RMSNorm over the last axis, written out: x / sqrt(mean(x^2) + eps) * gain."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * gain


def tables(model, length=T):
    return model.rope_cos[:length], model.rope_sin[:length]


def run_block(model, block, X):
    """One block on the state X, as GPT.forward runs it: X read by its compress, then its output state."""
    i = list(model.transformer.h).index(block)
    return block(X, block.compress(X), *tables(model), model.reads_after()[i])[0]


class Recorder:
    """Forward hooks that keep (name, inputs, output) of every call to the given modules, in order. Of a Block's
    output (X, x), the state X and what the next block reads of it, the state is kept."""

    def __init__(self, named_modules):
        self.calls = []
        self.hooks = [module.register_forward_hook(self._hook(name)) for name, module in named_modules]

    def _hook(self, name):
        def hook(module, inputs, output):
            self.calls.append((name, inputs, output[0] if isinstance(module, Block) else output))
        return hook

    def remove(self):
        for hook in self.hooks:
            hook.remove()

    def of(self, name):
        return [(inputs, output) for n, inputs, output in self.calls if n == name]


# --- §2: what the gate and the value read ------------------------------------------------------

def test_gate_reads_the_normalized_input_c_and_sigmoid_value_reads_the_raw_state_x_in():
    """beta = 2 sigmoid(w_b·c + b_b), one scalar per token (B, T); v = 4 sigmoid(W_v x_in + b_v)."""
    torch.manual_seed(0)
    update = DeltaUpdate(GPTConfig(n_embd=D, n_head=1, d_v=4)).eval()
    with torch.no_grad():
        update.gate_weight.normal_(0.0, 0.5)
        update.gate_bias.fill_(0.3)
        update.value_proj.weight.normal_(0.0, 0.5)
        update.value_proj.bias.normal_(0.0, 0.5)
    B, tokens = 2, 5
    x_in, c, h = 3 * torch.randn(B, tokens, D), torch.randn(B, tokens, D), torch.randn(B, tokens, D)
    with torch.no_grad():
        _, beta, v = update.coefficients(x_in, c, h)
    w_b, b_b = update.gate_weight.detach(), update.gate_bias.detach()
    W_v, b_v = update.value_proj.weight.detach(), update.value_proj.bias.detach()
    assert beta.shape == (B, tokens)
    torch.testing.assert_close(beta, 2 * torch.sigmoid(c @ w_b + b_b), rtol=0, atol=1e-6)
    torch.testing.assert_close(v, 4 * torch.sigmoid(x_in @ W_v.T + b_v), rtol=0, atol=1e-6)


def test_one_gate_per_token_scales_the_write_of_every_state_channel():
    """k^T(X_new - X)[j] = beta * (v[j] - k^T X[j]) for every channel j with the SAME beta (B, T)."""
    torch.manual_seed(1)
    update = DeltaUpdate(GPTConfig(n_embd=D, n_head=1, d_v=4)).eval()
    with torch.no_grad():
        update.gate_weight.normal_(0.0, 0.5)
        update.value_proj.weight.normal_(0.0, 0.5)
    X, x_in, c, h = torch.randn(2, 5, D, 4), torch.randn(2, 5, D), torch.randn(2, 5, D), torch.randn(2, 5, D)
    with torch.no_grad():
        k, beta, v = update.coefficients(x_in, c, h)
        X_new = update(X, x_in, c, h)
    reading = torch.einsum("btd,btdj->btj", k, X)
    change = torch.einsum("btd,btdj->btj", k, X_new - X)
    assert beta.shape == (2, 5)
    torch.testing.assert_close(change, beta[..., None] * (v - reading), rtol=0, atol=1e-5)


@pytest.mark.parametrize("value_map, value_is_scale_free", [("sigmoid", False), ("linear", True)])
@torch.no_grad()
def test_in_a_block_the_gate_ignores_the_scale_of_the_state_and_only_the_sigmoid_value_sees_it(
        value_map, value_is_scale_free):
    """c = RMSNorm(x_in) is scale-free, x_in is not. Scaling the state X by 5 leaves what the first
    write's gate (and linear value) read unchanged, but changes the sigmoid value's input x_in."""
    model = perturb(tiny_gpt(residual="delta", d_v=4, value_map=value_map)).eval()
    block = model.transformer.h[0]
    recorder = Recorder([("attn", block.update_attn)])
    X = torch.randn(2, T, D, 4, generator=torch.Generator().manual_seed(2))
    run_block(model, block, X)
    run_block(model, block, 5 * X)
    recorder.remove()
    (args, _), (args_scaled, _) = recorder.of("attn")
    k, beta, v = block.update_attn.coefficients(*args[1:])
    k_scaled, beta_scaled, v_scaled = block.update_attn.coefficients(*args_scaled[1:])
    torch.testing.assert_close(k_scaled, k, rtol=0, atol=1e-4)          # h = attn(c) is scale-free too
    torch.testing.assert_close(beta_scaled, beta, rtol=0, atol=1e-4)    # up to RMSNorm's eps
    if value_is_scale_free:
        torch.testing.assert_close(v_scaled, v, rtol=0, atol=1e-4)
    else:
        assert (v_scaled - v).abs().max() > 0.1


# --- §3: the compressors ------------------------------------------------------------------------

@torch.no_grad()
def test_compressor_is_the_learned_per_feature_mix_of_the_channels_not_their_mean():
    """x[i] = sum_j W[i, j] X[i, j] with W (d, d_v)."""
    compress = Compress(GPTConfig(n_embd=D, n_head=1, d_v=4))
    generator = torch.Generator().manual_seed(3)
    compress.mix.copy_(torch.randn(D, 4, generator=generator))
    X = torch.randn(2, 5, D, 4, generator=generator)
    expected = torch.stack([sum(compress.mix[i, j] * X[:, :, i, j] for j in range(4)) for i in range(D)], -1)
    torch.testing.assert_close(compress(X), expected, rtol=0, atol=1e-6)


@torch.no_grad()
def test_each_block_reads_the_state_through_its_own_compressor_before_attention_and_after_its_write():
    """Block i's compressor reads the block's input state, then the state after the attention write;
    the readout is a separate compressor that reads the last block's output (DDL.md §3)."""
    model = perturb(tiny_gpt(residual="delta", d_v=4)).eval()
    compressors = [(name, m) for name, m in model.named_modules() if isinstance(m, Compress)]
    others = [("expand", model.transformer.expand)]
    for i, block in enumerate(model.transformer.h):
        others += [(f"block{i}", block), (f"attn_write{i}", block.update_attn)]
    recorder = Recorder(compressors + others)
    model(random_tokens())
    recorder.remove()
    compressor_calls = [(name, inputs[0]) for name, inputs, _ in recorder.calls if name in dict(compressors)]
    n_layer = TINY_MODEL["n_layer"]
    assert [name for name, _ in compressor_calls] == (
        [f"transformer.h.{i}.compress" for i in range(n_layer) for _ in range(2)] + ["transformer.readout"])
    expected_inputs = []
    block_input = recorder.of("expand")[0][1]
    for i in range(n_layer):
        expected_inputs += [block_input, recorder.of(f"attn_write{i}")[0][1]]
        block_input = recorder.of(f"block{i}")[0][1]
    expected_inputs.append(block_input)
    for (name, seen), expected in zip(compressor_calls, expected_inputs):
        assert torch.equal(seen, expected), name
    # and they are distinct parameters: one mix per block and one for the readout
    mixes = [m.mix for _, m in compressors]
    assert len({id(mix) for mix in mixes}) == n_layer + 1


# --- §4: rotary, then RMSNorm on queries and keys per head ---------------------------------------

@torch.no_grad()
def test_queries_and_keys_are_rotated_then_rms_normalized_per_head():
    """q = RMSNorm_hd(rotary(q)) * g_q (and the same for k); with non-uniform gains this differs from
    rotary(RMSNorm(q)), which would scale a rotated pair (i, i + hd/2) by the gains of the other index."""
    model = perturb(tiny_gpt(residual="add"))
    attn = model.transformer.h[0].attn.eval()
    generator = torch.Generator().manual_seed(4)
    attn.q_norm.weight.copy_(0.5 + torch.rand(attn.head_dim, generator=generator))
    attn.k_norm.weight.copy_(0.5 + torch.rand(attn.head_dim, generator=generator))
    x = torch.randn(2, T, D, generator=generator)

    nh, hd = attn.n_head, attn.head_dim
    q, k, v = (part.view(2, T, nh, hd).transpose(1, 2) for part in attn.c_attn(x).split(D, dim=2))
    angles = torch.arange(T)[:, None] * 10000.0 ** (-torch.arange(0, hd, 2) / hd)   # (T, hd/2)

    def rotate(z):
        z1, z2 = z[..., :hd // 2], z[..., hd // 2:]
        return torch.cat((z1 * angles.cos() - z2 * angles.sin(), z1 * angles.sin() + z2 * angles.cos()), -1)

    q, k = rms_norm(rotate(q), attn.q_norm.weight), rms_norm(rotate(k), attn.k_norm.weight)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(2, T, D)
    torch.testing.assert_close(attn(x, *tables(model)), attn.c_proj(y), rtol=0, atol=1e-5)


# --- §2-§4 all at once: the delta model is the equations ----------------------------------------

@torch.no_grad()
def reference_logits(model, idx):
    """DDL.md §2-§4 written out with einsums, reusing only the backbone's attention and MLP."""
    cfg, tr = model.config, model.transformer
    d_v, B = cfg.d_v, idx.size(0)
    emb = tr.wte.weight[idx]                                               # (B, T, d)
    if d_v > 1 and cfg.expand_conv:                                        # EC: tap 3 is the current token
        X = torch.zeros(B, T, D, d_v)
        for tap in range(4):
            lag = 3 - tap
            earlier = torch.cat((torch.zeros(B, lag, D), emb[:, :T - lag]), dim=1)   # token t - lag
            X += earlier[..., None] * tr.expand.weight[tap]
    else:
        X = emb[..., None].repeat(1, 1, 1, d_v)

    def read(X, compress):
        return X[..., 0] if d_v == 1 else torch.einsum("btdj,dj->btd", X, compress.mix)

    for block in tr.h:
        for norm, sublayer, update in ((block.ln_1, lambda c: block.attn(c, *tables(model)), block.update_attn),
                                       (block.ln_2, block.mlp, block.update_mlp)):
            x_in = read(X, block.compress)
            c = rms_norm(x_in, norm.weight)
            h = sublayer(c)
            k = h / torch.sqrt(h.pow(2).sum(-1, keepdim=True) + EPS ** 2)
            beta = 2 * torch.sigmoid(c @ update.gate_weight + update.gate_bias)
            v = 4 * torch.sigmoid(x_in @ update.value_proj.weight.T + update.value_proj.bias)
            if cfg.residual == "delta":
                v = v - torch.einsum("btd,btdj->btj", k, X)
            X = X + beta[..., None, None] * k[..., None] * v[..., None, :]
    x = rms_norm(read(X, tr.readout), tr.ln_f.weight)
    return x @ tr.wte.weight.T


@pytest.mark.parametrize("mode", [dict(residual="delta", d_v=4, expand_conv=True),
                                  dict(residual="delta", d_v=4, expand_conv=False),
                                  dict(residual="delta"), dict(residual="write")],
                         ids=["delta_dv4_ec", "delta_dv4_no_ec", "delta", "write"])
def test_model_computes_the_equations_of_sections_2_to_4_with_each_block_using_its_own_maps(mode):
    model = perturb(tiny_gpt(**mode)).eval()
    idx = random_tokens()
    with torch.no_grad():
        torch.testing.assert_close(all_logits(model, idx), reference_logits(model, idx), rtol=0, atol=1e-5)


# --- §3: identical channels reduce d_v = 4 to d_v = 1 -------------------------------------------

@pytest.mark.parametrize("expand_conv", [False, True], ids=["repeat", "ec_at_identity"])
def test_expanded_model_with_identical_channels_equals_the_single_channel_model(expand_conv):
    """Same weights, the 1-channel value map copied into each of the 4 rows, mixes that sum to 1 per
    feature (here non-uniform): the channels start equal, stay equal (same v, same k, same beta) and
    every compressed read equals any one channel, so the logits are those of the d_v = 1 model."""
    small = perturb(tiny_gpt(residual="delta")).eval()
    big = tiny_gpt(residual="delta", d_v=4, expand_conv=expand_conv).eval()
    state = small.state_dict()
    for name in state:
        if name.endswith("value_proj.weight"):
            state[name] = state[name].repeat(4, 1)
        elif name.endswith("value_proj.bias"):
            state[name] = state[name].repeat(4)
    missing, unexpected = big.load_state_dict(state, strict=False)
    assert unexpected == []
    assert all(name.endswith(".mix") or name == "transformer.expand.weight" for name in missing)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in big.named_parameters():
            if name.endswith(".mix"):
                weights = 0.5 + torch.rand(p.shape, generator=generator)
                p.copy_(weights / weights.sum(-1, keepdim=True))
    idx = random_tokens()
    with torch.no_grad():
        torch.testing.assert_close(all_logits(big, idx), all_logits(small, idx), rtol=0, atol=1e-5)


# --- §4: init -----------------------------------------------------------------------------------

def test_init_uses_the_authors_scales_and_starting_points():
    """s = 0.5/sqrt(d): c_attn, c_fc, value maps, gates N(0, s); c_proj N(0, s/sqrt(n_layer));
    wte N(0, 0.02) and tied to the LM head; gate bias logit(beta_init/2); value bias 0; gains 1;
    mixes 1/d_v. Checked at d = 256, where a std estimated from >= 2048 draws is within a few %."""
    d, n_layer, d_v, beta_init = 256, 4, 4, 0.5
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=512, n_layer=n_layer, n_head=4, n_embd=d,
                          d_v=d_v, beta_init=beta_init))
    s = 0.5 / math.sqrt(d)
    blocks = model.transformer.h
    updates = [u for b in blocks for u in (b.update_attn, b.update_mlp)]

    def check(tensors, std, rel):
        values = torch.cat([t.detach().flatten() for t in tensors])
        assert values.std().item() == pytest.approx(std, rel=rel)
        assert abs(values.mean().item()) < 5 * std / math.sqrt(values.numel())

    for block in blocks:
        check([block.attn.c_attn.weight], s, rel=0.03)
        check([block.mlp.c_fc.weight], s, rel=0.03)
        check([block.attn.c_proj.weight], s / math.sqrt(n_layer), rel=0.03)
        check([block.mlp.c_proj.weight], s / math.sqrt(n_layer), rel=0.03)
    check([u.value_proj.weight for u in updates], s, rel=0.05)       # 8 x 4 x 256 draws
    check([u.gate_weight for u in updates], s, rel=0.10)             # 8 x 256 draws
    check([model.transformer.wte.weight], 0.02, rel=0.03)
    assert model.lm_head.weight is model.transformer.wte.weight
    for u in updates:
        assert u.gate_bias.item() == pytest.approx(math.log(beta_init / (2 - beta_init)))
        assert torch.equal(u.value_proj.bias, torch.zeros(d_v))
    norms = [m for m in model.modules() if isinstance(m, nn.RMSNorm)]
    assert len(norms) == 4 * n_layer + 1                              # ln_1, ln_2, q_norm, k_norm; ln_f
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)
    mixes = [m.mix for m in model.modules() if isinstance(m, Compress)]
    assert len(mixes) == n_layer + 1
    assert all(torch.equal(mix, torch.full((d, d_v), 1 / d_v)) for mix in mixes)


# --- where dropout acts -------------------------------------------------------------------------

P = 0.5


def dropped_and_kept(change, clean):
    """Split an elementwise-dropped change into where it is exactly 0 and where it is clean / (1 - P)."""
    dropped = change == 0
    assert 0.35 < dropped.float().mean().item() < 0.65                 # about P of the elements
    torch.testing.assert_close(change[~dropped], clean[~dropped] / (1 - P), rtol=1e-4, atol=1e-5)
    return dropped


@torch.no_grad()
def test_delta_mode_dropout_thins_the_whole_write_element_by_element_and_leaves_h_whole():
    """X_new = X + dropout(beta k ⊗ (v - kᵀX)): where the mask drops an element the state is
    unchanged, elsewhere it moves by the write / (1 - p). Dropping elements of h instead would turn
    k and change every element of the state."""
    model = perturb(tiny_gpt(residual="delta", d_v=4, dropout=P))
    block = model.transformer.h[0].train()
    block.attn.dropout = 0.0            # attention dropout off, so that h = attn(c) can be recomputed
    recorder = Recorder([("attn", block.update_attn), ("mlp", block.update_mlp)])
    torch.manual_seed(6)
    run_block(model, block, torch.randn(2, T, D, 4))
    recorder.remove()
    for name, sublayer in (("attn", lambda c: block.attn(c, *tables(model))), ("mlp", block.mlp)):
        [((X, x_in, c, h), X_new)] = recorder.of(name)
        assert torch.equal(h, sublayer(c)), "the sublayer output reaches the update undropped"
        update = getattr(block, f"update_{name}").eval()
        clean = update(X, x_in, c, h) - X
        update.train()
        dropped = dropped_and_kept(X_new - X, clean)
        # the mask is drawn per element, not per token or per channel: both occur along every axis
        assert dropped.any(dim=2).all() and (~dropped).any(dim=2).all()


@torch.no_grad()
def test_additive_mode_dropout_acts_on_the_sublayer_output():
    """x <- x + dropout(h): where the mask drops an element the stream is unchanged, elsewhere it
    moves by h / (1 - p)."""
    model = perturb(tiny_gpt(residual="add", dropout=P))
    block = model.transformer.h[0].train()
    block.attn.dropout = 0.0
    recorder = Recorder([("attn", block.attn), ("mlp", block.mlp), ("ln_2", block.ln_2)])
    torch.manual_seed(7)
    X = torch.randn(2, T, D, 1)
    X_out = run_block(model, block, X)
    recorder.remove()
    [(_, h_attn)], [(_, h_mlp)], [((x_mid,), _)] = recorder.of("attn"), recorder.of("mlp"), recorder.of("ln_2")
    dropped_and_kept(x_mid - X[..., 0], h_attn)
    dropped_and_kept(X_out[..., 0] - x_mid, h_mlp)


@torch.no_grad()
def test_attention_dropout_acts_in_train_mode_only():
    model = perturb(tiny_gpt(residual="delta", dropout=P))
    attn = model.transformer.h[0].attn
    x = torch.randn(2, T, D, generator=torch.Generator().manual_seed(8))
    attn.dropout = 0.0
    undropped = attn(x, *tables(model))
    attn.dropout = P
    assert torch.equal(attn.eval()(x, *tables(model)), undropped)
    torch.manual_seed(9)
    assert not torch.allclose(attn.train()(x, *tables(model)), undropped)


@torch.no_grad()
def test_dropout_at_h_drops_elements_of_h_and_then_writes_the_dropped_h_whole():
    """dropout_at="h": in training the update writes exactly what evaluation writes for the dropped h (the
    same mask, drawn from the same seed), and that mask drops about P of h's elements."""
    model = perturb(tiny_gpt(residual="delta", d_v=4, dropout=P, dropout_at="h"))
    update = model.transformer.h[0].update_attn
    generator = torch.Generator().manual_seed(10)
    X, x_in, c, h = (torch.randn(shape, generator=generator) for shape in ((2, T, D, 4), (2, T, D), (2, T, D), (2, T, D)))
    torch.manual_seed(11)
    written = update.train()(X, x_in, c, h)
    torch.manual_seed(11)
    h_dropped = nn.functional.dropout(h, P, training=True)
    assert 0.35 < (h_dropped == 0).float().mean().item() < 0.65
    torch.testing.assert_close(written, update.eval()(X, x_in, c, h_dropped), rtol=0, atol=1e-6)
    assert not torch.allclose(written, update(X, x_in, c, h))   # so h was dropped, not passed whole


# --- what gate_statistics reports, and the state's storage -------------------------------------

@pytest.mark.parametrize("mode", ["delta", "write", "delta_dv4"])
@torch.no_grad()
def test_gate_statistics_are_each_updates_own_coefficients_with_the_state_read_before_its_write(mode):
    """Per layer, [attention, MLP]: beta's mean and std, and mean |v - kᵀX| with X the state the update
    received (before its write), recomputed from that update's own inputs; state_rms after each block."""
    model = perturb(tiny_gpt(**MODES[mode])).eval()
    blocks = model.transformer.h
    recorder = Recorder([(f"{i}.{name}", getattr(block, f"update_{name}")) for i, block in enumerate(blocks)
                         for name in ("attn", "mlp")] + [(f"{i}.block", block) for i, block in enumerate(blocks)])
    idx = random_tokens()
    model(idx)
    recorder.remove()
    stats = gate_statistics(model, idx)
    for i, block in enumerate(blocks):
        for j, name in enumerate(("attn", "mlp")):
            [((X, x_in, c, h), _)] = recorder.of(f"{i}.{name}")
            k, beta, v = getattr(block, f"update_{name}").coefficients(x_in, c, h)
            rewrite = (v - torch.einsum("btd,btdj->btj", k, X.float())).abs().mean()
            assert stats["beta_mean"][i][j] == pytest.approx(beta.mean().item(), abs=1e-6)
            assert stats["beta_std"][i][j] == pytest.approx(beta.std().item(), abs=1e-6)
            assert stats["rewrite"][i][j] == pytest.approx(rewrite.item(), abs=1e-6)
        [(_, state)] = recorder.of(f"{i}.block")
        assert stats["state_rms"][i] == pytest.approx(state.float().pow(2).mean().sqrt().item(), abs=1e-6)


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", list(MODES))
def test_every_blocks_output_state_is_stored_in_the_dtype_state_dtype_asks_for(mode, state_dtype):
    """The cast to state_dtype happens at each write, not once at the readout: the state that every block
    passes on, in training and in evaluation, is stored as asked."""
    model = tiny_gpt(**MODES[mode], state_dtype=state_dtype)
    blocks = list(model.transformer.h)
    recorder = Recorder([(str(i), block) for i, block in enumerate(blocks)])
    idx = random_tokens()
    model.train()(idx, idx)
    with torch.no_grad():
        model.eval()(idx)
    recorder.remove()
    for i in range(len(blocks)):
        assert [output.dtype for _, output in recorder.of(str(i))] == [getattr(torch, state_dtype)] * 2


# --- causality at every position ----------------------------------------------------------------

@pytest.mark.parametrize("mode", list(MODES.values()) + [dict(residual="delta", d_v=4, expand_conv=False)],
                         ids=list(MODES) + ["delta_dv4_no_ec"])
@torch.no_grad()
def test_changing_token_t_changes_no_logit_before_t_and_the_logits_at_t(mode):
    """For every t at once: sequence 0 is the original, sequence t + 1 has token t changed. (atol 1e-5:
    rows of one batch may round differently by an ulp; a real leak moves logits by far more.)"""
    model = perturb(tiny_gpt(**mode)).eval()
    base = random_tokens(batch=1)
    variants = base.repeat(T + 1, 1)
    for t in range(T):
        variants[t + 1, t] = (base[0, t] + 1) % VOCAB
    logits = all_logits(model, variants)
    for t in range(T):
        torch.testing.assert_close(logits[t + 1, :t], logits[0, :t], rtol=0, atol=1e-5,
                                   msg=lambda m, t=t: f"changing token {t} moved an earlier logit: {m}")
        assert not torch.allclose(logits[t + 1, t], logits[0, t]), t


# --- weight decay -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [dict(residual="add"), dict(residual="delta", d_v=4, expand_conv=True)],
                         ids=["add", "delta_dv4_ec"])
def test_weight_decay_falls_on_exactly_the_weight_matrices_and_every_parameter_is_in_one_group(mode):
    model = tiny_gpt(**mode)
    optimizer = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95),
                                           device_type="cpu")
    decay_of = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert id(p) not in decay_of, "a parameter is in two groups"
            decay_of[id(p)] = group["weight_decay"]
    named = dict(model.named_parameters())          # the tied LM head appears once, as wte
    assert set(decay_of) == {id(p) for p in named.values()}
    matrices = ("c_attn.weight", "c_proj.weight", "c_fc.weight", "value_proj.weight", "wte.weight")
    decayed = {name for name, p in named.items() if decay_of[id(p)] == 0.1}
    assert decayed == {name for name in named if name.endswith(matrices)}
    assert all(decay_of[id(p)] == 0.0 for name, p in named.items() if name not in decayed)
