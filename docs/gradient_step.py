"""
Workshop exercise: the delta rule is one step of gradient descent.

For one token, let L(X) = 1/2 * |kᵀX - v|^2 measure how far the state's reading along k is from the
target v. Its gradient is k ⊗ (kᵀX - v), so one gradient step with step size beta is

    X - beta * k ⊗ (kᵀX - v)  =  X + beta * k ⊗ (v - kᵀX)      (the delta rule)

The exercise: write `gradient_step` with torch.autograd (not with the formula above), then check it
against the model's DeltaUpdate.forward:

    python docs/gradient_step.py
    python -m pytest -q tests/test_workshop.py -k gradient_step

The body below is one solution; delete it before you start. The script prints the largest difference
between the two for d_v = 1 and 4 and beta = 0, 0.5, 1 and 2, on random states drawn from --seed.
"""

import dataclasses
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from support.configurator import ConfigError, parse_overrides, run_cli  # noqa: E402
from ddl_gpt import DeltaUpdate, GPTConfig  # noqa: E402


@dataclasses.dataclass
class StepConfig:
    seed: int = 0    # the random states, sublayer outputs and targets compared


def gradient_step(X, k, v, beta):
    """X (d, d_v) after one step of gradient descent, step size beta, on L(X) = 1/2 * |kᵀX - v|^2,
    for a unit vector k (d,) and targets v (d_v,). The gradient comes from torch.autograd."""
    X = X.detach().clone().requires_grad_(True)
    loss = 0.5 * ((k @ X - v) ** 2).sum()
    (grad,) = torch.autograd.grad(loss, X)
    return (X - beta * grad).detach()


def delta_rule(X, h, v, beta):
    """X (d, d_v) after the model's DeltaUpdate.forward writes the sublayer output h (d,) with the gate
    fixed at beta and the target at v (d_v,)."""
    d, d_v = X.shape
    update = DeltaUpdate(GPTConfig(n_embd=d, n_head=1, d_v=d_v, value_map="linear")).eval()
    with torch.no_grad():
        update.gate_weight.zero_()                                   # beta = 2 sigmoid(gate_bias)
        update.gate_bias.fill_(math.log(beta / (2 - beta)) if 0 < beta < 2 else (beta - 1) * math.inf)
        update.value_proj.weight.zero_()                             # v = value_proj.bias
        update.value_proj.bias.copy_(v)
        x_in = torch.zeros(1, 1, d)                                  # unused: gate and target are fixed
        return update(X[None, None], x_in, x_in, h[None, None])[0, 0]


def main(argv):
    cfg = StepConfig(**parse_overrides(StepConfig, argv))
    if not 0 <= cfg.seed < 2**31:  # torch.Generator takes 64-bit seeds; the bound train.py's --seed has
        raise ConfigError(f"--seed={cfg.seed}: must lie in [0, 2^31)")
    generator = torch.Generator().manual_seed(cfg.seed)
    for d_v in (1, 4):
        X, h = torch.randn(8, d_v, generator=generator), torch.randn(8, generator=generator)
        v = torch.randn(d_v, generator=generator)
        for beta in (0.0, 0.5, 1.0, 2.0):
            gap = (gradient_step(X, h / h.norm(), v, beta) - delta_rule(X, h, v, beta)).abs().max().item()
            print(f"d_v = {d_v}, beta = {beta:3.1f}: largest difference from DeltaUpdate.forward {gap:.1e}"
                  + ("" if gap < 1e-5 else "   <- not the same"))


if __name__ == "__main__":
    run_cli(main, StepConfig, __doc__, sys.argv[1:])
