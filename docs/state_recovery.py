"""
How exactly can a delta write's input state be recovered from its output? If well enough, a backward pass
could keep the last state alone instead of one per sublayer: X = X_new - beta k ⊗ e, with e = v - kᵀX, a
(B, T, d_v) tensor kept from the forward (docs/PERFORMANCE.md: what d_v = 4's memory goes to).

    python docs/state_recovery.py                          # 12 and 24 layers, d_v 1 and 4, fp32 and bf16 state
    python docs/state_recovery.py --layers=24 --d_v=4 --state_dtypes=float32

One forward pass of a baby-width GPT with random weights (moved off the initialization, where every write is
zero) records each write's state X, beta, k and e; then, from the last state alone, each earlier state is
recovered from the one after it, in fp32, as a backward pass would. The error is relative to the state's
scale (the largest |X| of the true state); bf16 autocast itself rounds at 2^-8 = 3.9e-3.
"""

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from ddl_gpt import GPT, DeltaUpdate, GPTConfig  # noqa: E402
from support.configurator import ConfigError, parse_overrides, run_cli  # noqa: E402


@dataclasses.dataclass
class RecoveryConfig:
    layers: str = "12,24"                 # model depths; each block writes twice (attention, MLP)
    d_v: str = "1,4"                      # state widths
    state_dtypes: str = "float32,bfloat16"
    seed: int = 0


def writes_of(model, idx):
    """Every write's (X, beta, k, e), and the state after the last write, from one forward pass without dropout."""
    writes, last = [], {}

    def record(update, inputs, X_new):
        X, x_in, c, h = inputs
        k, beta, v = update.coefficients(x_in, c, h)                               # (B, T, d), (B, T), (B, T, d_v)
        e = v - (k.unsqueeze(-1) * X.float()).sum(dim=2) if update.erase else v    # (B, T, d_v)
        writes.append((X, beta, k, e))
        last["state"] = X_new                                                      # (B, T, d, d_v)

    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, DeltaUpdate)]
    with torch.no_grad():
        model(idx)
    for hook in hooks:
        hook.remove()
    return writes, last["state"]


def recovery_errors(writes, last_state):
    """Walking back from the last state: the relative error of each recovered state, last write first."""
    X_next = last_state.float()                                                    # (B, T, d, d_v)
    errors = []
    for X, beta, k, e in reversed(writes):
        X_next = X_next - (beta[..., None, None] * k.unsqueeze(-1)) * e.unsqueeze(-2)  # (B, T, d, d_v)
        errors.append(((X_next - X.float()).abs().max() / X.float().abs().max()).item())
    return errors


def main(argv):
    cfg = RecoveryConfig(**parse_overrides(RecoveryConfig, argv))
    try:
        depths, widths = [int(n) for n in cfg.layers.split(",")], [int(n) for n in cfg.d_v.split(",")]
    except ValueError:
        raise ConfigError(f"--layers={cfg.layers!r} --d_v={cfg.d_v!r}: expected comma-separated whole numbers")
    dtypes = cfg.state_dtypes.split(",")
    if min(depths + widths) < 1 or not set(dtypes) <= {"float32", "bfloat16"}:
        raise ConfigError(f"--layers, --d_v: at least 1; --state_dtypes among float32, bfloat16 "
                          f"(got {cfg.state_dtypes!r})")
    print("| layers | d_v | state | error after one write | after all writes |")
    print("|---|---|---|---|---|")
    for layers in depths:
        for d_v in widths:
            for state_dtype in dtypes:
                torch.manual_seed(cfg.seed)
                model = GPT(GPTConfig(n_layer=layers, n_head=6, n_embd=384, block_size=128, vocab_size=65,
                                      residual="delta", d_v=d_v, state_dtype=state_dtype)).eval()
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(0.02 * torch.randn_like(p))
                idx = torch.randint(65, (2, 128))                                  # (B, T)
                errors = recovery_errors(*writes_of(model, idx))
                print(f"| {layers} | {d_v} | {state_dtype} | {errors[0]:.1e} | {errors[-1]:.1e} |")


if __name__ == "__main__":
    run_cli(main, RecoveryConfig, __doc__, sys.argv[1:])
