"""
Draw the expanded residual state of one token and the delta rule's rank-one write into it.

    python docs/state_figure.py                    # writes docs/state_and_write.png (needs matplotlib)
    python docs/state_figure.py --beta=0.5 --out=my_figure.png

The state X has shape (B, T, d, d_v); one token's slice X[b, t] is a d x d_v matrix. A sublayer
writes X <- X + beta * k ⊗ (v - kᵀX): the column k (d numbers, unit length) times the row v - kᵀX
(d_v numbers). Every number in the figure is computed by the model's own DeltaUpdate.forward on a
random state, with the gate fixed at beta and the target at v.
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
class FigureConfig:
    d: int = 6                 # width of the stream (rows); even, as the model needs
    d_v: int = 4               # value channels (columns)
    beta: float = 1.0          # the gate, in [0, 2]; at 1 the reading kᵀX_new equals v
    v: str = "0.5,3,1.5,2"     # the targets, d_v numbers
    seed: int = 0              # picks the random state X and the sublayer output h
    out: str = ""              # the picture; "" is docs/state_and_write.png


def one_write(d, d_v, beta, v, seed):
    """X, k, v - kᵀX, the write and X_new of one token, computed by DeltaUpdate.forward."""
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(1, 1, d, d_v, generator=generator)                            # (B, T, d, d_v)
    h = torch.randn(1, 1, d, generator=generator)                                  # sublayer output
    update = DeltaUpdate(GPTConfig(n_embd=d, n_head=1, d_v=d_v, value_map="linear")).eval()
    with torch.no_grad():
        update.gate_weight.zero_()                                                 # beta = 2 sigmoid(b)
        update.gate_bias.fill_(math.log(beta / (2 - beta)) if 0 < beta < 2 else (beta - 1) * math.inf)
        update.value_proj.weight.zero_()                                           # v = b
        update.value_proj.bias.copy_(torch.tensor(v))
        X_new = update(X, x_in=X[..., 0], c=X[..., 0], h=h)[0, 0]                  # (d, d_v)
    X, k = X[0, 0], h[0, 0] / h.norm()
    error = torch.tensor(v) - k @ X                                                # (d_v,): v - kᵀX
    write = beta * torch.outer(k, error)                                           # (d, d_v)
    assert torch.allclose(X + write, X_new, atol=1e-5), "DeltaUpdate.forward disagrees with the equation"
    return dict(X=X, k=k, error=error, write=write, X_new=X_new, read=k @ X, read_new=k @ X_new)


def draw(parts, beta, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    d, d_v = parts["X"].shape
    scale = max(p.abs().max().item() for p in parts.values())
    cmap, norm = plt.get_cmap("RdBu_r"), matplotlib.colors.Normalize(-scale, scale)
    fig, ax = plt.subplots(figsize=(0.6 * (3 * d_v + 5.4), 0.6 * (d + 5.2)))

    def grid(values, x0, y0, label=None, where="below"):
        """values (rows, cols) as cells whose top-left corner is (x0, y0); y grows downwards."""
        values = values.reshape(-1, values.shape[-1]) if values.dim() == 2 else values.reshape(1, -1)
        for (i, j), value in ((ij, values[ij].item()) for ij in
                              ((i, j) for i in range(values.shape[0]) for j in range(values.shape[1]))):
            ax.add_patch(Rectangle((x0 + j, y0 + i), 1, 1, facecolor=cmap(norm(value)), edgecolor="white", lw=1.5))
            ax.text(x0 + j + 0.5, y0 + i + 0.5, f"{round(value, 2) + 0:.2f}", ha="center", va="center", fontsize=8.5,
                    color="white" if abs(value) > 0.6 * scale else "black")
        if label:
            y = y0 + values.shape[0] + 0.35 if where == "below" else y0 - 0.25
            ax.text(x0 + values.shape[1] / 2, y, label, ha="center", va="top" if where == "below" else "bottom",
                    fontsize=11)

    def sign(x, y, text):
        ax.text(x, y, text, ha="center", va="center", fontsize=20)

    top = 1.6                                        # room for the row v - kᵀX above the write
    x_write = d_v + 3.2                              # left edge of the write's grid
    x_new = x_write + d_v + 1.6
    grid(parts["X"], 0, top, "X  (one token: d × d_v)")
    grid(parts["read"], 0, top + d + 1.4, "reading kᵀX")
    sign(d_v + 0.6, top + d / 2, "+")
    grid(parts["k"][:, None], x_write - 1.4, top, "k")
    grid(parts["error"], x_write, top - 1.4, "v − kᵀX", where="above")
    grid(parts["write"], x_write, top, f"β · k ⊗ (v − kᵀX),  β = {beta:g}")
    sign(x_write - 0.9, top - 0.9, "⊗")
    sign(x_new - 0.8, top + d / 2, "=")
    grid(parts["X_new"], x_new, top, "X_new")
    grid(parts["read_new"], x_new, top + d + 1.4, "reading kᵀX_new" + ("  = v" if beta == 1 else ""))
    ax.set_xlim(-0.3, x_new + d_v + 0.3)
    ax.set_ylim(top + d + 3.2, -0.9)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(f"The state X has shape (B, T, d, d_v): one token's slice is a d × d_v matrix (here {d} × {d_v}).\n"
                 "A sublayer writes the column k times the row v − kᵀX into it: a rank-one update.", fontsize=11)
    fig.savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)


def main(argv):
    cfg = FigureConfig(**parse_overrides(FigureConfig, argv))
    if cfg.d < 2 or cfg.d % 2 or cfg.d_v < 1 or not 0 <= cfg.beta <= 2:
        raise ConfigError("expected an even --d >= 2, --d_v >= 1 and --beta in [0, 2]")
    try:
        v = [float(part) for part in cfg.v.split(",")]
        assert len(v) == cfg.d_v
    except (ValueError, AssertionError):
        raise ConfigError(f"--v={cfg.v}: expected d_v = {cfg.d_v} numbers separated by commas") from None
    parts = one_write(cfg.d, cfg.d_v, cfg.beta, v, cfg.seed)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("note: the figure needs matplotlib: pip install matplotlib")
        return
    path = Path(cfg.out) if cfg.out else HERE / "state_and_write.png"
    draw(parts, cfg.beta, path)
    print(f"wrote {cfg.out or os.path.relpath(path)}")


if __name__ == "__main__":
    run_cli(main, FigureConfig, __doc__, sys.argv[1:])
