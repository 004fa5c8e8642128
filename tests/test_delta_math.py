"""
The delta update on its own (DDL.md §1, §3 and §6):

    X <- X + beta * k ⊗ (v - kᵀX),   k = h / |h|,   for d_v = 1:  x <- x + beta * (v - k·x) * k

Each test fixes the gate beta and the target v (gate weights 0, gate bias logit(beta / 2); a linear
value map with weight 0 and bias v) and checks one property that follows from the equation on paper.
"""

import math

import pytest
import torch

from ddl_gpt import DeltaUpdate, GPTConfig

D = 8        # width of the stream
TOKENS = 5   # independent tokens per check, each with its own state and direction

both_state_widths = pytest.mark.parametrize("d_v", [1, 4])


def logit(p):
    return -math.inf if p == 0 else math.inf if p == 1 else math.log(p / (1 - p))


def delta_update(beta, v, residual="delta", dropout=0.0):
    """A DeltaUpdate whose gate is the constant `beta` and whose target is the constant vector `v` (d_v,)."""
    v = torch.as_tensor(v, dtype=torch.float32).reshape(-1)
    update = DeltaUpdate(GPTConfig(n_embd=D, n_head=1, d_v=len(v), residual=residual, value_map="linear",
                                   dropout=dropout))
    with torch.no_grad():
        update.gate_weight.zero_()
        update.gate_bias.fill_(logit(beta / 2))
        update.value_proj.weight.zero_()
        update.value_proj.bias.copy_(v)
    return update.eval()


def random_state(d_v, seed=0):
    """States X (TOKENS, D, d_v), sublayer outputs h (TOKENS, D) and their unit directions k."""
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(TOKENS, D, d_v, generator=generator)
    h = 3 * torch.randn(TOKENS, D, generator=generator)
    return X, h, h / h.norm(dim=-1, keepdim=True)


def apply(update, X, h, c=None, x_in=None):
    """X (N, D, d_v) after `update` writes the sublayer output h (N, D); c and x_in default to noise."""
    noise = torch.randn(X.shape[0], D)
    c = noise if c is None else c
    x_in = noise if x_in is None else x_in
    return update(X[None], x_in[None], c[None], h[None])[0]


def along(k, X):
    """kᵀX per token: (N, d_v)."""
    return torch.einsum("nd,ndv->nv", k, X)


def orthogonal_part(k, X):
    """(I - kkᵀ) X per token: (N, D, d_v)."""
    return X - k[:, :, None] * along(k, X)[:, None, :]


@both_state_widths
def test_beta_zero_leaves_the_state_bit_identical(d_v):
    X, h, _ = random_state(d_v)
    assert torch.equal(apply(delta_update(0.0, torch.randn(d_v)), X, h), X)


@both_state_widths
def test_beta_one_overwrites_the_component_along_k_with_v(d_v):
    X, h, k = random_state(d_v)
    v = torch.tensor([0.5, -1.0, 2.0, 3.0][:d_v])
    X_new = apply(delta_update(1.0, v), X, h)
    torch.testing.assert_close(along(k, X_new), v.expand(TOKENS, d_v), rtol=0, atol=1e-5)


@both_state_widths
def test_beta_one_leaves_the_component_orthogonal_to_k_unchanged(d_v):
    X, h, k = random_state(d_v)
    X_new = apply(delta_update(1.0, torch.full((d_v,), 2.0)), X, h)
    torch.testing.assert_close(orthogonal_part(k, X_new), orthogonal_part(k, X), rtol=0, atol=1e-5)


@both_state_widths
def test_beta_two_with_zero_value_is_the_householder_reflection(d_v):
    X, h, k = random_state(d_v)
    X_new = apply(delta_update(2.0, torch.zeros(d_v)), X, h)
    torch.testing.assert_close(X_new.norm(dim=1), X.norm(dim=1))     # every channel keeps its norm
    torch.testing.assert_close(along(k, X_new), -along(k, X))        # the reading along k flips sign
    householder = torch.eye(D) - 2 * k[:, :, None] * k[:, None, :]   # (N, D, D)
    torch.testing.assert_close(X_new, householder @ X)


@both_state_widths
def test_in_training_dropout_thins_the_write_and_leaves_the_rest_of_the_state_bit_identical(d_v):
    """Token n writes along feature n (k = e_n), so rows other than n are orthogonal to its write: with
    dropout acting on the write, as in training, they come through exactly. Dropping elements of the
    whole new state instead (drop(X + write)) would zero or rescale them."""
    X, _, _ = random_state(d_v)
    h = 3 * torch.eye(D)[:TOKENS]                                    # k = e_n for token n
    update = delta_update(1.0, torch.full((d_v,), 2.0), dropout=0.5).train()
    torch.manual_seed(0)
    X_new = apply(update, X, h)
    untouched = ~torch.eye(D, dtype=torch.bool)[:TOKENS]             # (N, D): the rows orthogonal to each write
    assert torch.equal(X_new[untouched], X[untouched])
    assert not torch.equal(X_new[~untouched], X[~untouched])         # and some of the write gets through


@pytest.mark.parametrize("beta", [0.3, 1.0, 1.7])
def test_delta_operator_has_eigenvalues_one_and_one_minus_beta(beta):
    """A = I - beta kkᵀ, built column by column: with v = 0 the update maps the basis vector e_i to A e_i."""
    _, h, k = random_state(1)
    h, k = h[0].expand(D, D), k[0]                                   # one direction for all D columns
    columns = apply(delta_update(beta, [0.0]), torch.eye(D)[:, :, None], h)[:, :, 0]  # row i = A e_i
    A = columns.T
    eigenvalues = torch.linalg.eigvals(A).real.sort().values
    expected = torch.tensor(sorted([1.0 - beta] + [1.0] * (D - 1)))
    torch.testing.assert_close(eigenvalues, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(A @ k, (1 - beta) * k, rtol=0, atol=1e-5)  # k is the eigenvector of 1 - beta


@both_state_widths
def test_error_along_k_shrinks_by_one_minus_beta(d_v):
    X, h, k = random_state(d_v)
    generator = torch.Generator().manual_seed(1)
    beta = 2 * torch.rand((), generator=generator).item()   # anywhere in (0, 2)
    v = torch.randn(d_v, generator=generator)
    X_new = apply(delta_update(beta, v), X, h)
    torch.testing.assert_close(along(k, X_new) - v, (1 - beta) * (along(k, X) - v), rtol=0, atol=1e-5)


@pytest.mark.parametrize("scale", [1e-2, 1.0, 1e4])
def test_k_is_the_unit_direction_of_any_nonzero_sublayer_output(scale):
    """From an empty state with beta = 1 and v = 1 the update writes k itself."""
    _, h, k = random_state(1)
    k_written = apply(delta_update(1.0, [1.0]), torch.zeros(TOKENS, D, 1), scale * h)[:, :, 0]
    torch.testing.assert_close(k_written.norm(dim=-1), torch.ones(TOKENS), rtol=0, atol=1e-5)
    torch.testing.assert_close(k_written, k, rtol=0, atol=1e-5)


def test_a_zero_sublayer_output_writes_nothing():
    X, _, _ = random_state(1)
    X_new = apply(delta_update(1.0, [1.0]), X, torch.zeros(TOKENS, D))
    assert torch.equal(X_new, X)


def test_gate_stays_inside_zero_to_two_for_extreme_logits():
    """Gate weights so large that w·c reaches about ±1e4; beta is read back as k·(written vector)."""
    update = delta_update(1.0, [1.0])
    c = torch.randn(TOKENS, D, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        update.gate_weight.copy_(1e4 * c[0] / c[0].norm() ** 2)   # logit 1e4 for token 0, ±1e4·cos for the rest
    c[1] = -c[0]                                                  # logit -1e4 for token 1
    _, h, k = random_state(1)
    with torch.no_grad():
        written = apply(update, torch.zeros(TOKENS, D, 1), h, c=c)[:, :, 0]
    beta = (written * k).sum(-1)
    assert torch.isfinite(written).all()
    assert ((beta >= -1e-6) & (beta <= 2 + 1e-6)).all(), beta   # [0, 2] up to the rounding of k·k
    torch.testing.assert_close(beta[:2], torch.tensor([2.0, 0.0]))


@pytest.mark.parametrize("beta_init", [0.25, 1.0, 1.75])
def test_gate_starts_at_beta_init(beta_init):
    update = DeltaUpdate(GPTConfig(n_embd=D, n_head=1, beta_init=beta_init))
    assert 2 * torch.sigmoid(update.gate_bias).item() == pytest.approx(beta_init)


@pytest.mark.parametrize("value_map, reads", [("sigmoid", "x_in"), ("linear", "c")])
def test_value_target_is_four_sigmoid_of_the_state_or_linear_in_the_normalized_input(value_map, reads):
    """Authors' code: v = 4 sigmoid(W_v x_in + b), from the un-normalized state; paper text: v = W_v c + b."""
    torch.manual_seed(3)
    update = DeltaUpdate(GPTConfig(n_embd=D, n_head=1, d_v=4, value_map=value_map)).eval()
    with torch.no_grad():
        update.gate_weight.zero_()
        update.gate_bias.zero_()                                   # beta = 1: k·X_new is v itself
    X, h, k = random_state(4)
    x_in, c = 5 * torch.randn(TOKENS, D), torch.randn(TOKENS, D)
    with torch.no_grad():
        source = {"x_in": x_in, "c": c}[reads]
        v = 4 * torch.sigmoid(update.value_proj(source)) if value_map == "sigmoid" else update.value_proj(source)
        torch.testing.assert_close(along(k, apply(update, X, h, c=c, x_in=x_in)), v, rtol=0, atol=1e-5)


def test_expanded_state_update_is_rank_one_along_k():
    X, h, k = random_state(4)
    change = apply(delta_update(0.7, [1.0, -2.0, 0.5, 3.0]), X, h) - X     # (N, D, d_v)
    assert (torch.linalg.matrix_rank(change) == 1).all()
    torch.testing.assert_close(orthogonal_part(k, change), torch.zeros_like(change), rtol=0, atol=1e-5)


@both_state_widths
def test_write_mode_adds_beta_k_v_without_the_erase_term(d_v):
    beta, v = 0.6, torch.tensor([1.5, -0.5, 2.0, 0.25][:d_v])
    X, h, k = random_state(d_v)
    update = delta_update(beta, v, residual="write")
    expected_write = beta * k[:, :, None] * v                          # (N, D, d_v), whatever X holds
    torch.testing.assert_close(apply(update, X, h) - X, expected_write)
    torch.testing.assert_close(apply(update, 10 * X, h) - 10 * X, expected_write, rtol=0, atol=1e-5)
