"""
Train several variants over several seeds with the ordinary training command, and report what the
seeds say about them.

    python compare.py config/shakespeare_char.py --variants=add,delta,delta:4,write \\
        --seeds=1337,1,2,3,4 --out=runs/baby --parallel=4 [--key=value ... for every run]
    python compare.py --report runs/baby        # start nothing: re-read the finished runs, write the report

Each (variant, seed) is one subprocess, its output in OUT/VARIANT/seed_S/stdout.log:

    python train.py CONFIG [--key=value for every run] [the variant's settings] --seed=S --out_dir=OUT/VARIANT/seed_S

--parallel=N runs N at a time (side by side on one GPU, or spread over --devices=cuda:0,cuda:1). The
same command again skips the finished runs (log.jsonl ends with a "done" entry) and continues the
unfinished ones with --resume=auto, so a grid stopped by Ctrl-C (the running runs save a checkpoint
first) or by a failed run picks up where it stopped.

Variants are separated by commas; each is  [NAME=]RESIDUAL[:D_V][+key=value...]

    add, delta, write          --residual=add / delta / write          folder add, delta, write
    delta:4                    --residual=delta --d_v=4                folder delta_dv4
    delta+dropout=0            any train.py setting after a '+'        folder delta+dropout=0
    nodrop=delta+dropout=0     the same, with its own name             folder nodrop

A variant's settings win over those given for every run. The first variant is the reference that the
others are tested against (Welch's t-test on the best validation loss).

OUT receives report.md, curves.png and gates_VARIANT.png (figures need matplotlib:
requirements-extra.txt), and compare.json (the commands and settings, for --report).
"""

import dataclasses
import json
import math
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from support.configurator import ConfigError, parse_overrides, unknown_key_error

TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"
SET_BY_COMPARE = ("seed", "out_dir", "resume")
SYNTAX = "[NAME=]RESIDUAL[:D_V][+key=value...], e.g. delta:4 or nodrop=delta+dropout=0"
HOW_TO_READ = ("How to read: lower loss is better. p is the two-sided probability of a difference at least this "
               "large if the two variants had the same mean; it is not a measure of effect size, and with n = {n} "
               "seeds a large p does not show that there is no difference, nor a small p that it is large. "
               "No correction for several comparisons.")


def setting(default, meaning, path=False):
    return dataclasses.field(default=default, metadata={"help": meaning, "path": path})


@dataclasses.dataclass
class CompareConfig:
    variants: str = setting("add,delta", f"comma-separated variants, each {SYNTAX}; the first is the reference")
    seeds: str = setting("1337,1,2", "comma-separated seeds; every variant runs once with each")
    out: str = setting("out-compare", "folder of the grid: OUT/VARIANT/seed_S per run, the report and figures",
                       path=True)
    parallel: int = setting(1, "runs at a time; runs that share a GPU have timings that do not compare")
    devices: str = setting("", "comma-separated devices (cuda:0,cuda:1); each run gets --device= of the least "
                               "busy one. Empty: train.py picks")
    report_only: bool = setting(False, "start no run: re-read the finished runs in --out and write the report")
    report: str = setting("", "--report=OUT or --report OUT: the same as --report_only --out=OUT", path=True)


class CompareError(Exception):
    pass


@dataclasses.dataclass
class Variant:
    name: str       # its folder
    spec: str       # as written on the command line
    settings: dict  # train.py settings, as strings

    @property
    def arguments(self):
        return [f"--{key}={value}" for key, value in self.settings.items()]


def parse_variant(spec):
    from support.settings import parse_mode  # imports torch (through ddl_gpt.py): not needed for --report
    head, *pairs = spec.split("+")
    name, base = head.split("=", 1) if "=" in head else ("", head)
    try:
        residual, d_v = parse_mode(base)
    except ValueError as error:
        raise CompareError(f"variant {spec!r}: {error}; a variant is {SYNTAX}") from None
    settings = {"residual": residual} | ({"d_v": str(d_v)} if d_v is not None else {})
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not key or not eq:
            raise CompareError(f"variant {spec!r}: {pair!r} is not key=value; expected {SYNTAX}")
        if key in settings or key in SET_BY_COMPARE:
            raise CompareError(f"variant {spec!r}: --{key} is set twice or by compare.py itself; drop it")
        settings[key] = value
    name = name or (residual + (f"_dv{d_v}" if d_v is not None else "") + "".join(f"+{pair}" for pair in pairs))
    if not re.fullmatch(r"[\w][\w.+=-]*", name):
        raise CompareError(f"variant {spec!r}: {name!r} cannot be a folder name; name the variant: NAME={base}...")
    return Variant(name, spec, settings)


def parse_list(text, what, example):
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise CompareError(f"--{what} is empty; give one or more, e.g. --{what}={example}")
    if len(set(items)) < len(items):
        raise CompareError(f"--{what}={text} names one twice; give each once")
    return items


# ----------------------------------------------------------------------------------------------
# statistics: Welch's t-test, with Student's t distribution computed here (no scipy needed)

def regularized_beta(x, a, b):
    """I_x(a, b), from its continued fraction evaluated by the modified Lentz method."""
    if x <= 0 or x >= 1:
        return max(0.0, min(1.0, x))
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below this point; use the symmetry
        return 1 - regularized_beta(1 - x, b, a)
    tiny, fraction, c, d = 1e-300, 1.0, 1.0, 0.0  # fraction = 1 + d1/(1 + d2/(1 + ...))
    for j in range(1, 1000):
        m = j // 2
        term = (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)) if j % 2 == 0 else
                -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)))
        d = 1 / (1 + term * d or tiny)
        c = 1 + term / c or tiny
        fraction *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    return front / (a * fraction)


def two_sided_p(t, df):
    """P(|T| >= |t|) for Student's t with df (real, > 0) degrees of freedom."""
    return regularized_beta(df / (df + t * t), df / 2, 0.5)


def welch(sample, reference):
    """Welch's t-test of mean(sample) - mean(reference): (difference, t, Welch-Satterthwaite df, p)."""
    se1, se2 = statistics.variance(sample) / len(sample), statistics.variance(reference) / len(reference)
    difference = statistics.fmean(sample) - statistics.fmean(reference)
    t = difference / math.sqrt(se1 + se2)
    df = (se1 + se2) ** 2 / (se1 ** 2 / (len(sample) - 1) + se2 ** 2 / (len(reference) - 1))
    return difference, t, df, two_sided_p(t, df)


def mean_std(values, digits):
    """'mean ± sample std' (ddof=1); a single value has no std."""
    if not values:
        return "—"
    spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.{digits}f}{spread}"


# ----------------------------------------------------------------------------------------------
# run folders

def read_log(run_dir):
    """The entries of run_dir/log.jsonl; a line torn by a killed run is skipped."""
    path = Path(run_dir) / "log.jsonl"
    entries = []
    for line in (path.read_text(encoding="utf-8").splitlines() if path.is_file() else []):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return entries


def is_finished(entries, max_iters=None):
    """True if the log ends with train.py's "done" entry (or, from an older train.py without it,
    the last evaluation is at max_iters)."""
    if entries and entries[-1].get("done"):
        return True
    evals = [entry for entry in entries if "val_loss" in entry]
    return bool(evals) and max_iters is not None and evals[-1]["iter"] == max_iters


def summarize(entries):
    """What the report needs from one finished run."""
    by_iter = {entry["iter"]: entry for entry in entries if "val_loss" in entry}  # a re-run step: the later wins
    evals = [by_iter[i] for i in sorted(by_iter)]
    done = entries[-1] if entries[-1].get("done") else {}
    accuracy = [entry["answer_accuracy"] for entry in evals if entry.get("answer_accuracy") is not None]
    return dict(evals=evals,
                best=done.get("best_val_loss", min(entry["val_loss"] for entry in evals)),
                final=done.get("final_val_loss", evals[-1]["val_loss"]),
                accuracy_best=max(accuracy, default=None), accuracy_final=accuracy[-1] if accuracy else None,
                tokens_per_sec=[entry["tokens_per_sec"] for entry in entries if entry.get("tokens_per_sec")],
                elapsed=done.get("elapsed_s", entries[-1].get("elapsed_s")),
                residual=next((entry["run"].get("config", {}).get("residual") for entry in entries
                               if isinstance(entry.get("run"), dict)), None))


def device_names(out):
    """The devices the runs trained on, and torch's version, from train.py's first log.jsonl entry."""
    names = set()
    for log in Path(out).glob("*/seed_*/log.jsonl"):
        for line in log.read_text(errors="replace").splitlines():
            if '"run"' in line:
                run = json.loads(line)["run"]
                names.add(f"{run['device']} (torch {run['torch']})")
    return sorted(names)


def load_manifest(out):
    path = Path(out) / "compare.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


# ----------------------------------------------------------------------------------------------
# report and figures

def collect(out, manifest):
    """{variant: {seed: summary}} of the finished runs, the variants' specs, and the unfinished runs."""
    if manifest:
        variants = [(v["name"], v["spec"], v["max_iters"]) for v in manifest["variants"]]
        folders = {v[0]: [Path(out) / v[0] / f"seed_{seed}" for seed in manifest["seeds"]] for v in variants}
    else:  # folders made without compare.json: every VARIANT/seed_S, variants in alphabetical order
        folders = {d.name: sorted(d.glob("seed_*")) for d in sorted(Path(out).iterdir())
                   if d.is_dir() and any(d.glob("seed_*"))}
        variants = [(name, name, None) for name in folders]
    runs, unfinished = {}, []
    for name, _, max_iters in variants:
        runs[name] = {}
        for folder in folders[name]:
            entries = read_log(folder)
            if is_finished(entries, max_iters):
                runs[name][int(folder.name.removeprefix("seed_"))] = summarize(entries)
            else:
                unfinished.append(f"{name}/{folder.name}")
    runs = {name: seeds for name, seeds in runs.items() if seeds}
    if not runs:
        raise CompareError(f"no finished runs in {out}; run the grid first: python compare.py CONFIG --out={out}")
    return runs, {name: spec for name, spec, _ in variants}, unfinished


def write_report(out, manifest, report_command):
    """Write OUT/report.md (and the figures) from the finished runs; returns its path."""
    runs, specs, unfinished = collect(out, manifest)
    lines = header(out, manifest or {}, report_command, runs, unfinished)
    lines += summary_table(runs, specs) + welch_table(runs)
    seeds = sorted({seed for by_seed in runs.values() for seed in by_seed})
    lines += ["", "Best val loss of each run:", "", table_row(["variant", *[f"seed {s}" for s in seeds]]),
              table_row(["---"] * (len(seeds) + 1))]
    lines += [table_row([name, *[f"{by_seed[s]['best']:.4f}" if s in by_seed else "—" for s in seeds]])
              for name, by_seed in runs.items()]
    Path(out, "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_figures(out, runs)
    return Path(out, "report.md")


def header(out, manifest, report_command, runs, unfinished):
    invocations = manifest.get("invocations", [])
    lines = [f"# {', '.join(runs)}", ""] + [f"Command: `{i['command']}`  " for i in invocations]
    if report_command:
        lines.append(f"Report: `{report_command}`  ")
    devices = device_names(out) or ["device unknown (not in the runs' log.jsonl)"]
    lines.append(f"Hardware: {', '.join(devices)}; {manifest.get('host') or host_description()}  ")
    shared = [i["parallel"] for i in invocations if i["parallel"] > max(1, len(i["devices"]))]
    if not invocations:
        lines.append("Timing: unknown whether runs shared a device (no compare.json)  ")
    elif shared:
        lines.append(f"Timing: up to {max(shared)} runs at a time: "
                     f"**shared {'CPU' if all(d.startswith('cpu') for d in devices) else 'GPU'}: timings not comparable**  ")
    else:
        lines.append("Timing: one run at a time on each device  ")
    seeds = sorted({seed for by_seed in runs.values() for seed in by_seed})
    lines.append(f"Seeds: {', '.join(map(str, seeds))}. Reference: {next(iter(runs))}.  ")
    if unfinished:
        lines.append(f"Not finished (or not started), left out: {', '.join(unfinished)}.  ")
    return lines


def column(by_seed, key):
    return [run[key] for run in by_seed.values() if run[key] is not None]


def summary_table(runs, specs):
    accuracy = any(column(by_seed, "accuracy_best") for by_seed in runs.values())
    names = ["variant", "spec", "n", "best val loss", "final val loss"]
    names += ["answer accuracy (best)", "answer accuracy (final)"] if accuracy else []
    names += ["tokens/s (median)", "wall time (mean)"]
    lines = ["", "Mean ± sample standard deviation over seeds.", "", table_row(names), table_row(["---"] * len(names))]
    for name, by_seed in runs.items():
        row = [name, f"`{specs[name]}`", len(by_seed), mean_std(column(by_seed, "best"), 4),
               mean_std(column(by_seed, "final"), 4)]
        if accuracy:
            row += [mean_std(column(by_seed, "accuracy_best"), 3), mean_std(column(by_seed, "accuracy_final"), 3)]
        tokens, elapsed = sum(column(by_seed, "tokens_per_sec"), []), column(by_seed, "elapsed")
        row += [f"{statistics.median(tokens) / 1000:,.1f}k" if tokens else "—",
                f"{statistics.fmean(elapsed):.0f} s" if elapsed else "—"]
        lines.append(table_row(row))
    return lines


def welch_table(runs):
    reference, *others = runs
    lines = ["", f"Welch's t-test of the best val loss against {reference} (difference = variant − {reference}):",
             "", table_row(["variant", "difference", "t", "df", "p (two-sided)"]), table_row(["---"] * 5)]
    base = column(runs[reference], "best")
    for name in others:
        sample = column(runs[name], "best")
        if min(len(sample), len(base)) < 2 or statistics.variance(sample) + statistics.variance(base) == 0:
            difference = statistics.fmean(sample) - statistics.fmean(base)
            lines.append(table_row([name, f"{difference:+.4f}", "—", "—", "— (needs 2+ seeds and some spread)"]))
        else:
            difference, t, df, p = welch(sample, base)
            lines.append(table_row([name, f"{difference:+.4f}", f"{t:.2f}", f"{df:.1f}", f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"]))
    n = sorted({len(by_seed) for by_seed in runs.values()})
    return lines + ["", HOW_TO_READ.format(n=n[0] if len(n) == 1 else f"{n[0]} to {n[-1]}")]


def table_row(cells):
    return "| " + " | ".join(map(str, cells)) + " |"


def across_seeds(seeds, value):
    """The eval iterations at which every seed logged value(entry), and the values (seeds x iterations)."""
    logged = [{entry["iter"]: value(entry) for entry in run["evals"] if value(entry) is not None}
              for run in seeds.values()]
    iters = sorted(set.intersection(*(set(by_iter) for by_iter in logged)))
    return iters, [[by_iter[i] for i in iters] for by_iter in logged]


def write_figures(out, runs):
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no window, no display needed
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        print("note: figures skipped; pip install -r requirements-extra.txt")
        return
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    tops = []
    for name, seeds in runs.items():
        iters, losses = across_seeds(seeds, lambda entry: entry["val_loss"])
        losses = np.array(losses)
        line, = ax.plot(iters, losses.mean(0), label=f"{name} (n={len(seeds)})")
        ax.fill_between(iters, losses.min(0), losses.max(0), color=line.get_color(), alpha=0.2, linewidth=0)
        tops.append(losses.max(0)[1 if len(iters) > 2 else 0])
    # The untrained model's loss (iteration 0) would squash the differences that matter: cut the axis below it.
    ax.set_ylim(top=max(tops))
    ax.set(xlabel="iteration", ylabel="validation loss", title="mean over seeds; band: min to max")
    ax.legend()
    fig.tight_layout()
    fig.savefig(Path(out, "curves.png"))
    plt.close(fig)

    for name, seeds in runs.items():
        iters, beta = across_seeds(seeds, lambda entry: (entry.get("diagnostics") or {}).get("beta_mean"))
        if not iters:  # additive runs have no gate
            continue
        beta = np.array(beta, dtype=float).mean(0)  # (iterations, layers, 2): mean over seeds
        rows = beta.reshape(len(iters), -1).T       # (2 * layers, iterations): layer 0 attn, layer 0 mlp, ...
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        image = ax.imshow(rows, cmap="RdBu_r", vmin=0, vmax=2, aspect="auto", interpolation="nearest")
        ax.set_yticks(range(len(rows)), [f"layer {i // 2} {('attn', 'mlp')[i % 2]}" for i in range(len(rows))])
        every = max(1, len(iters) // 8)
        ax.set_xticks(range(0, len(iters), every), iters[::every])
        ax.set(xlabel="iteration", title=f"{name}: mean gate beta over {len(seeds)} seed(s)")
        colorbar = fig.colorbar(image, ticks=[0, 1, 2])
        # without the erase term (residual=write) the gate scales v alone: 2 writes 2v, it reflects nothing
        erase_free = any(run["residual"] == "write" for run in seeds.values())
        colorbar.ax.set_yticklabels(["identity (0)", "writes v (1)", "writes 2v (2)"] if erase_free else
                                    ["identity (0)", "overwrite (1)", "reflection (2)"])
        fig.tight_layout()
        fig.savefig(Path(out, f"gates_{name}.png"))
        plt.close(fig)


def host_description():
    try:
        torch = f"torch {metadata.version('torch')}"
    except metadata.PackageNotFoundError:
        torch = "torch not installed"
    return f"{torch}, {platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores"


# ----------------------------------------------------------------------------------------------
# the grid

@dataclasses.dataclass
class Run:
    variant: Variant
    seed: int
    folder: Path
    resume: bool  # the folder exists: train.py continues from its checkpoint if there is one

    def command(self, common, device):
        return [sys.executable, str(TRAIN_SCRIPT), *common, *self.variant.arguments, f"--seed={self.seed}",
                f"--out_dir={self.folder}"] + ([f"--device={device}"] if device else []) + (
                ["--resume=auto"] if self.resume else [])


def start_run(command, log_path, env):
    """Start one training process, its output appended to log_path. In its own session, so that
    Ctrl-C reaches only compare.py, which then stops each run once (they save a checkpoint first)."""
    with open(log_path, "a", encoding="utf-8") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def last_line(path):
    lines = [line for line in Path(path).read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def run_grid(runs, common, parallel, devices):
    """Run `runs`, `parallel` at a time, each on the least busy of `devices`; returns the failed ones."""
    # Runs side by side on the CPU would each start one thread per core and slow each other down.
    env = os.environ | ({} if "OMP_NUM_THREADS" in os.environ else
                        {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // parallel))})
    pending, running, failed = list(runs), {}, []  # running: {process: (run, device)}
    try:
        while pending or running:
            while pending and len(running) < parallel:
                run = pending.pop(0)
                busy = [device for _, device in running.values()]
                device = min(devices, key=busy.count) if devices else None
                run.folder.mkdir(parents=True, exist_ok=True)
                running[start_run(run.command(common, device), run.folder / "stdout.log", env)] = (run, device)
                print(f"{'continue' if run.resume else 'start'} {run.folder}" + (f" on {device}" if device else ""))
            for process in [process for process in running if process.poll() is not None]:
                run, _ = running.pop(process)
                if process.returncode == 0:
                    print(f"finished {run.folder}")
                else:
                    failed.append(run)
                    print(f"FAILED {run.folder} (exit {process.returncode}): {last_line(run.folder / 'stdout.log')}")
            time.sleep(0.1)
    except KeyboardInterrupt:
        print(f"\ninterrupted: stopping {len(running)} run(s); each saves its checkpoint first", flush=True)
        for process in running:
            process.terminate()
        for process in running:
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
        raise
    return failed


# ----------------------------------------------------------------------------------------------
# command line

def usage():
    settings = "\n".join(f"  --{f.name}={f.default}\n      {f.metadata['help']}"
                         for f in dataclasses.fields(CompareConfig))
    return (f"{__doc__.strip()}\n\nSettings of compare.py (--key=default, then its meaning); every other "
            f"--key=value is a train.py setting for every run:\n{settings}")


def split_arguments(argv):
    """compare.py's own settings, the config files, and the train.py settings of every run."""
    own_keys = {f.name for f in dataclasses.fields(CompareConfig)}
    own, files, common = [], [], []
    for arg in argv:
        key = arg[2:].partition("=")[0].replace("-", "_")
        (own if arg.startswith("--") and key in own_keys else common if arg.startswith("--") else files).append(arg)
    return CompareConfig(**parse_overrides(CompareConfig, own)), files, common


def check_train_settings(files, common, variants):
    """Read each variant's settings as train.py will, so that a mistake stops the grid before any run
    starts rather than failing every run; returns {variant name: max_iters}."""
    from support.settings import model_config  # these import torch: only after the quick checks have passed
    from train import TrainConfig
    train_keys = [f.name for f in dataclasses.fields(TrainConfig)]
    for arg in common:
        key = arg[2:].partition("=")[0].replace("-", "_")
        if key not in train_keys:
            raise unknown_key_error(key, train_keys + [f.name for f in dataclasses.fields(CompareConfig)])
    max_iters = {}
    for variant in variants:
        try:
            cfg = TrainConfig(**parse_overrides(TrainConfig, [*files, *common, *variant.arguments]))
            model_config(cfg)
        except (ConfigError, ValueError, TypeError, SyntaxError) as error:  # SyntaxError: in a config file
            raise CompareError(f"variant {variant.name}: {error}") from None
        max_iters[variant.name] = cfg.max_iters
    return max_iters


def run_and_report(cfg, files, common, command):
    variants = [parse_variant(spec) for spec in parse_list(cfg.variants, "variants", "add,delta,delta:4")]
    names = [variant.name for variant in variants]
    if len(set(names)) < len(names):
        raise CompareError(f"two variants have the same folder name in {names}; name one: NAME=RESIDUAL...")
    seeds = parse_list(cfg.seeds, "seeds", "1337,1,2")
    if not all(seed.isdigit() for seed in seeds):
        raise CompareError(f"--seeds={cfg.seeds}: seeds are whole numbers >= 0, e.g. --seeds=1337,1,2")
    seeds = [int(seed) for seed in seeds]
    if cfg.parallel < 1:
        raise CompareError(f"--parallel={cfg.parallel}: at least one run must run at a time; use --parallel=1 or more")
    devices = parse_list(cfg.devices, "devices", "cuda:0,cuda:1") if cfg.devices else []
    for path in files:
        if not path.endswith(".py") or not Path(path).is_file():
            raise CompareError(f"config file {path} not found; give an existing config file (*.py), e.g. "
                               "config/shakespeare_char.py, or --report=FOLDER to only write a report")
    for arg in common:
        key = arg[2:].partition("=")[0].replace("-", "_")
        if key in SET_BY_COMPARE or (key == "device" and devices):
            raise CompareError(f"--{key} is set by compare.py for each run; drop it (choose them with --seeds, "
                               "--out or --devices)")
    out = Path(cfg.out)
    try:  # a probe file in the nearest folder that exists: nothing is created before the settings are checked
        existing = next(folder for folder in [out, *out.parents] if folder.exists())
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise CompareError(f"cannot write to --out={out} ({error.strerror}); choose a folder you can write to") \
            from None
    max_iters = check_train_settings(files, common, variants)
    out.mkdir(parents=True, exist_ok=True)

    previous = load_manifest(out) or {}
    manifest = dict(invocations=previous.get("invocations", []) + [dict(command=command, parallel=cfg.parallel,
                                                                        devices=devices)],
                    variants=[dict(name=v.name, spec=v.spec, settings=v.settings, max_iters=max_iters[v.name])
                              for v in variants],
                    seeds=seeds, config_files=files, common=common, host=host_description())
    (out / "compare.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")

    grid = [(v, seed, out / v.name / f"seed_{seed}") for v in variants for seed in seeds]
    todo = [Run(v, seed, folder, resume=folder.exists()) for v, seed, folder in grid
            if not is_finished(read_log(folder), max_iters[v.name])]
    resumed = sum(run.resume for run in todo)
    print(f"{len(variants)} variant(s) x {len(seeds)} seed(s): {len(grid) - len(todo)} finished, {resumed} to "
          f"continue, {len(todo) - resumed} to start; {cfg.parallel} at a time")
    failed = run_grid(todo, [*files, *common], cfg.parallel, devices)
    if failed:
        print(f"{len(failed)} run(s) failed (see their stdout.log); the same command runs them again", file=sys.stderr)
    try:
        print(f"report: {write_report(out, manifest, report_command=None)}")
    except CompareError:
        if not failed:
            raise
    return 1 if failed else 0


def main(argv):
    if "--help" in argv or "-h" in argv:
        print(usage())
        return 0
    for i, arg in enumerate(argv[:-1]):  # `--report OUT` is `--report=OUT`
        if arg == "--report" and not argv[i + 1].startswith("--"):
            argv = argv[:i] + [f"--report={argv[i + 1]}"] + argv[i + 2:]
            break
    command = shlex.join(["python", "compare.py", *argv])
    try:
        cfg, files, common = split_arguments(argv)
        if cfg.report or cfg.report_only:
            out = Path(cfg.report or cfg.out)
            if files or common or cfg.report == "True":
                raise CompareError("--report takes only the grid's folder: python compare.py --report OUT")
            if not out.is_dir():
                raise CompareError(f"{out} is not a folder; give the --out folder of a grid")
            print(f"report: {write_report(out, load_manifest(out), report_command=command)}")
            return 0
        return run_and_report(cfg, files, common, command)
    except (CompareError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"stopped; to continue the grid where it stopped, run the same command again:\n  {command}",
              file=sys.stderr)
        return 130


def stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt  # a scheduler's SIGTERM stops the grid as Ctrl-C does


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    sys.exit(main(sys.argv[1:]))
