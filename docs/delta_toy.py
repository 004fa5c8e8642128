"""
The delta rule on a 2-D state: what each gate beta does to x, given a direction k and a target v.

    python docs/delta_toy.py                       # beta = 0, 0.5, 1, 1.5, 2 on the default x, k, v
    python docs/delta_toy.py --v=0                 # then beta = 2 is the Householder reflection
    python docs/delta_toy.py --x=1,3 --k=1,0 --v=2 --betas=0,1,2
    python docs/delta_toy.py --plot                # also draw docs/delta_regimes.png (needs matplotlib)

Each row applies x_new = x + beta * (v - k·x) * k and shows k·x (the reading along k), k⊥·x (the
part orthogonal to k), |x| and the eigenvalues of A = I - beta kkᵀ. The model's own
DeltaUpdate.forward computes the same x_new, and the last line says whether the two agree.
"""

import dataclasses
import math
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from support.configurator import ConfigError, parse_overrides, run_cli  # noqa: E402
from ddl_gpt import DeltaUpdate, GPTConfig  # noqa: E402


@dataclasses.dataclass
class ToyConfig:
    x: str = "2,0.5"              # the state x, two numbers
    k: str = "0.6,0.8"            # the direction k, two numbers (normalized, as DeltaUpdate does)
    v: float = 0.5                # the target for k·x
    betas: str = "0,0.5,1,1.5,2"  # the gates to try, each in [0, 2]
    plot: bool = False            # also draw the picture (needs matplotlib)
    out: str = ""                 # where the picture goes; "" is docs/delta_regimes.png


def vector(key, text):
    try:
        values = [float(part) for part in text.split(",")]
        assert len(values) == 2 and all(map(math.isfinite, values))
    except (ValueError, AssertionError):
        raise ConfigError(f"--{key}={text}: expected two finite numbers, e.g. --{key}=1,2") from None
    return torch.tensor(values, dtype=torch.float64)


def model_update(x, h, beta, v):
    """x_new by the model's DeltaUpdate, its gate fixed at beta (w_b = 0, b_b = logit(beta/2)) and its
    target at v (linear value map, W_v = 0, b_v = v); d = 2, d_v = 1, one token."""
    update = DeltaUpdate(GPTConfig(n_embd=2, n_head=1, value_map="linear")).eval()
    with torch.no_grad():
        update.gate_weight.zero_()
        update.gate_bias.fill_(math.log(beta / (2 - beta)) if 0 < beta < 2 else (beta - 1) * math.inf)
        update.value_proj.weight.zero_()
        update.value_proj.bias.fill_(v)
        X = x.float().reshape(1, 1, 2, 1)                                      # (B, T, d, d_v)
        return update(X, x_in=X[..., 0], c=X[..., 0], h=h.float().reshape(1, 1, 2)).reshape(2).double()


def regime(beta):
    return ("identity" if beta == 0 else "moves k·x part way to v" if beta < 1 else "overwrite: k·x = v"
            if beta == 1 else "overshoots v" if beta < 2 else "reflects k·x about v")


def main(argv):
    cfg = ToyConfig(**parse_overrides(ToyConfig, argv))
    x, h = vector("x", cfg.x), vector("k", cfg.k)
    try:
        betas = [float(beta) for beta in cfg.betas.split(",")]
    except ValueError:
        betas = [math.nan]
    if not all(0 <= beta <= 2 for beta in betas) or not h.any():
        raise ConfigError("every beta must lie in [0, 2] (--betas=0,1,2) and k must not be 0")
    k = h / h.norm()
    k_perp = torch.stack([-k[1], k[0]])
    print(f"x = ({x[0]:g}, {x[1]:g})   k = ({k[0]:.3f}, {k[1]:.3f})   v = {cfg.v:g}\n"
          "x_new = x + beta * (v - k·x) * k = A x + beta * v * k,   A = I - beta kkᵀ")
    print(" beta |" + "|".join(g.center(18) for g in ("k·x", "k⊥·x", "|x|")) + "|   eig(A)   | what happens")
    print("      |" + " before -> after  |" * 3 + "            |")
    rows, gap = [], 0.0
    for beta in betas:
        x_new = x + beta * (cfg.v - k @ x) * k                                 # the equation
        gap = max(gap, (x_new - model_update(x, h, beta, cfg.v)).abs().max().item())
        eig = torch.linalg.eigvalsh(torch.eye(2, dtype=torch.float64) - beta * torch.outer(k, k))
        cells = [f" {round(a.item(), 3) + 0:6.3f} -> {round(b.item(), 3) + 0:6.3f} " for a, b in
                 [(k @ x, k @ x_new), (k_perp @ x, k_perp @ x_new), (x.norm(), x_new.norm())]]
        eigs = " ".join(f"{e.item() + 0:+.1f}" for e in eig.round(decimals=3))
        print(f"{beta:5.2f} |" + "|".join(cells) + f"| {eigs:<10} | {regime(beta)}")
        rows.append((beta, x_new))
    print(f"DeltaUpdate.forward gives the same x_new: {'yes' if gap < 1e-5 else 'NO'} (largest difference {gap:.1e})")
    if cfg.plot:
        draw(x, k, cfg.v, rows, Path(cfg.out or HERE / "delta_regimes.png"))
    if gap >= 1e-5:
        sys.exit(1)


def draw(x, k, v, rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: the picture needs matplotlib: pip install matplotlib")
        return
    x, k = x.numpy(), k.numpy()
    perp = k[::-1] * [-1, 1]
    span = 1.25 * max([1.0, abs(v), *abs(x)] + [abs(c) for _, x_new in rows for c in x_new.tolist()])
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.plot(*zip(-span * k, span * k), color="tab:blue", lw=0.8, ls="--")                     # the k axis
    ax.plot(*zip(v * k - span * perp, v * k + span * perp), color="gray", lw=0.8, ls=":")    # where k·x = v
    ax.annotate("k·x = v", v * k + 0.75 * span * perp, color="gray", va="bottom")
    ax.annotate("", k, (0, 0), arrowprops=dict(arrowstyle="->", color="tab:blue", lw=2))
    ax.annotate("k", 1.1 * k, color="tab:blue", fontsize=13)
    ax.annotate("", x, (0, 0), arrowprops=dict(arrowstyle="->", color="black", lw=2))
    ax.annotate("x", x, xytext=(-4, -8), textcoords="offset points", fontsize=13, ha="right", va="top")
    ends = [x_new.numpy() for _, x_new in rows]
    ax.plot(*zip(*ends), color="0.6", lw=1, zorder=1)                         # every x_new is x + t k
    for (beta, _), x_new in zip(rows, ends):
        color = plt.get_cmap("plasma")(0.8 * beta / 2)
        ax.plot(*x_new, "o", color=color, ms=8, zorder=2)
        ax.annotate(f"β = {beta:g}", x_new, xytext=(9, 0), textcoords="offset points", color=color,
                    fontsize=12, va="center")
    ax.set(xlim=(-span, span), ylim=(-span, span), aspect="equal")
    ax.axhline(0, color="0.9", lw=0.5, zorder=0), ax.axvline(0, color="0.9", lw=0.5, zorder=0)
    ax.set_title(f"x_new = x + β (v − k·x) k,   v = {v:g}\nall x_new lie on the line through x along k")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"wrote {os.path.relpath(path) if path.is_relative_to(Path.cwd()) else path}")


if __name__ == "__main__":
    run_cli(main, ToyConfig, __doc__, sys.argv[1:])
