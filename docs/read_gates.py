"""
Read the gates out of a training run: the `diagnostics` that train.py writes into log.jsonl at every
evaluation (computed by gate_statistics in ddl_gpt.py), one row per layer.

    python docs/read_gates.py --out_dir=out-delta
    python docs/read_gates.py --out_dir=out-delta --last     # only the last evaluation

beta is the gate (mean ± spread over the tokens of one validation batch): about 0 leaves the state as
it is, about 1 overwrites the reading k·x with v, about 2 reflects it. |v - kᵀX| is how far the
reading is from the target before the write (the mean over tokens and d_v channels); state rms is the size of the state after the block.
"""

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from support.configurator import ConfigError, parse_overrides, run_cli  # noqa: E402
from support.readback import read_jsonl  # noqa: E402


@dataclasses.dataclass
class ReadConfig:
    out_dir: str = "out"   # the training run's folder, holding log.jsonl
    last: bool = False     # only the last evaluation


def regime(beta):
    return ("~ identity" if beta < 0.25 else "partial" if beta < 0.75 else "~ overwrite" if beta < 1.25
            else "overshoot" if beta < 1.75 else "~ reflection")


def table(entry):
    """The lines that show one evaluation's diagnostics."""
    stats = entry["diagnostics"]
    lines = [f"iter {entry['iter']}: val loss {entry['val_loss']:.4f}"]
    if "beta_mean" not in stats:
        return lines + ["  additive residual: no gates; state rms by layer: " +
                        " ".join(f"{rms:.2f}" for rms in stats["state_rms"])]
    lines.append("  layer |" + "|".join(name.center(27) for name in ("beta, attention", "beta, MLP"))
                 + "| |v - kᵀX| attn/mlp | state rms")
    for i, (means, stds, gaps, rms) in enumerate(zip(stats["beta_mean"], stats["beta_std"], stats["rewrite"],
                                                     stats["state_rms"])):
        cells = [f" {m:4.2f} ± {s:4.2f}  {regime(m):<12} " for m, s in zip(means, stds)]
        lines.append(f"  {i + 1:5d} |" + "|".join(cells) + f"|    {gaps[0]:4.2f} / {gaps[1]:4.2f}     |   {rms:5.2f}")
    return lines


def main(argv):
    cfg = ReadConfig(**parse_overrides(ReadConfig, argv))
    path = Path(cfg.out_dir) / "log.jsonl"
    if not path.is_file():
        raise ConfigError(f"{path} not found: train first, e.g. python train.py config/shakespeare_char_cpu.py "
                          f"--out_dir={cfg.out_dir}")
    fix = "train again (into a fresh --out_dir) for a readable log"
    entries = read_jsonl(path, fix)
    evaluations = [e for e in entries if "diagnostics" in e]
    if not evaluations:
        raise ConfigError(f"{path} holds no evaluation yet")
    try:
        model = next((e["run"]["config"] for e in entries if "run" in e), {})
        lines = [f"{path}: residual={model.get('residual', '?')} d_v={model.get('d_v', '?')}"]
        for entry in evaluations[-1:] if cfg.last else evaluations:
            lines += table(entry)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError):  # JSON, but not what train.py writes
        raise ConfigError(f"{path} is damaged (its entries lack what train.py writes into them); {fix}") from None
    print("\n".join(lines))


if __name__ == "__main__":
    run_cli(main, ReadConfig, __doc__, sys.argv[1:])
