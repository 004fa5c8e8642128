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
    delta:4, write:4           --residual=delta (write) --d_v=4        folder delta_dv4, write_dv4
    delta+dropout=0            any train.py setting after a '+'        folder delta+dropout=0
    nodrop=delta+dropout=0     the same, with its own name             folder nodrop

A variant's settings win over those given for every run. The first variant is the reference that the
others are tested against: Welch's t-test of the best validation loss, with the difference's 95%
confidence interval and p adjusted by Holm's method over the variants. Runs that log answer accuracy
(the reassignment task) also get the runs that "click" (final accuracy above 0.7) with Fisher's exact
test against the reference, Welch's test of the final accuracy itself, and the step at which each clicking
run first reaches 0.9.

To see how far a run lands from the same run repeated (same variant and seed), run a second grid
with the same variants and seeds into another folder and report it against the first:

    python compare.py config/books.py --variants=add,delta:4 --seeds=1337,1,2 --out=runs/books-again
    python compare.py --report runs/books-again --repeat_of=runs/books

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

from support.configurator import ConfigError, UserError, fields_of, parse_overrides, unknown_key_error
from support.readback import read_json, read_jsonl

TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"
SET_BY_COMPARE = ("seed", "out_dir", "resume")
SYNTAX = "[NAME=]RESIDUAL[:D_V][+key=value...], e.g. delta:4 or nodrop=delta+dropout=0"
HOW_TO_READ = ("How to read: lower loss is better. 95% CI: Welch's confidence interval of the difference of the "
               "means. p is the two-sided probability of a difference at least this large if the two variants had "
               "the same mean; p (Holm) is p adjusted by Holm's step-down method over the {k} of this table "
               "with a p (rejecting where it is below 0.05 keeps the chance of any false rejection among them at "
               "most 0.05). Neither is a measure of effect size, and with n = {n} seeds a large p does not show "
               "that there is no difference, nor a small p that it is large.")
HOW_TO_READ_STEPS = ("Only the runs that reached the accuracy are compared, so a variant whose runs rarely get there "
                     "is judged on its few that did. 95% CI, p and p (Holm, over the {k} of this table with a p) "
                     "as in the test of the loss above.")
HOW_TO_READ_ACCURACY = ("Higher accuracy is better. This test uses every run's final accuracy, with no threshold; "
                        "the accuracies are far from normal when some runs climb and others stay near 0.5, so read "
                        "its p as a rough guide. 95% CI, p and p (Holm, over the {k} of this table with a p) as in "
                        "the test of the loss above.")
CLICK = 0.7     # a run "clicks" when its final answer accuracy exceeds this
NEAR = 0.05     # final accuracies this close to CLICK are named in the report: their class is fragile
ACCURATE = 0.9  # and the report gives the first evaluation at which a clicking run's accuracy reaches this
CLICK_WHY = ("Why 0.7: on the reassignment task a run is expected either to stay near 0.5 or to climb toward 1 "
             "once it learns to follow the reassignments, and 0.7 lies between the two; the ranges that follow "
             "show how well the runs of this report separate.")
PER_RUN_SETTINGS = ("out_dir", "device", "resume")  # where a run trains, not how
FOLDER_SETTINGS = ("report", "out", "repeat_of")


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
    repeat_of: str = setting("", "the folder of an earlier grid that this one repeats at equal seeds: the report "
                                 "adds how far each run lands from its earlier run, next to the spread over seeds",
                                 path=True)


class CompareError(UserError):
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
# statistics: Welch's t-test and interval, Holm's adjustment, Fisher's exact test; Student's t
# distribution is computed here (the standard library only)

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


def t_quantile(probability, df):
    """The t with P(T <= t) = probability for Student's t with df degrees of freedom: two_sided_p inverted
    by bisection (it falls steadily as |t| grows), to about 1e-12."""
    if not 0 < probability < 1:
        raise ValueError(f"probability={probability}; expected 0 < probability < 1")
    if probability < 0.5:
        return -t_quantile(1 - probability, df)
    tail = 2 * (1 - probability)  # the two-sided probability beyond +-t
    low, high = 0.0, 1.0
    while two_sided_p(high, df) > tail:  # widen until the quantile is inside [low, high]
        low, high = high, 2 * high
    while high - low > 1e-12 * high:
        middle = (low + high) / 2
        low, high = (middle, high) if two_sided_p(middle, df) > tail else (low, middle)
    return (low + high) / 2


@dataclasses.dataclass
class Welch:
    difference: float  # mean(sample) - mean(reference)
    t: float
    df: float          # Welch-Satterthwaite
    p: float           # two-sided
    low: float         # the 95% confidence interval of the difference
    high: float


def welch(sample, reference, level=0.95):
    """Welch's t-test of mean(sample) - mean(reference), with the difference's confidence interval:
    difference +- (the (1 + level) / 2 quantile of Student's t with the Welch df) x its standard error."""
    se1, se2 = statistics.variance(sample) / len(sample), statistics.variance(reference) / len(reference)
    difference = statistics.fmean(sample) - statistics.fmean(reference)
    standard_error = math.sqrt(se1 + se2)
    t = difference / standard_error
    df = (se1 + se2) ** 2 / (se1 ** 2 / (len(sample) - 1) + se2 ** 2 / (len(reference) - 1))
    half_width = t_quantile((1 + level) / 2, df) * standard_error
    return Welch(difference, t, df, two_sided_p(t, df), difference - half_width, difference + half_width)


def holm(p_values):
    """Holm's step-down adjustment of m p-values, in their order: the i-th smallest becomes
    max over j <= i of min(1, (m - j + 1) x the j-th smallest). Rejecting where the adjusted p < alpha
    keeps the chance of one or more false rejections among the m at most alpha."""
    m, adjusted, running = len(p_values), [0.0] * len(p_values), 0.0
    for rank, index in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def fisher_exact(a, b, c, d):
    """Fisher's exact test of the 2 x 2 table [[a, b], [c, d]], two-sided: the probability, given the
    table's margins, of every table no more probable than this one. Exact: the hypergeometric
    probabilities share the denominator C(n, a + c), so their integer numerators are compared."""
    row1, row2, column1 = a + b, c + d, a + c
    weight = [math.comb(row1, x) * math.comb(row2, column1 - x)
              for x in range(max(0, column1 - row2), min(row1, column1) + 1)]
    observed = math.comb(row1, a) * math.comb(row2, c)
    return sum(w for w in weight if w <= observed) / math.comb(row1 + row2, column1)


def mean_std(values, digits):
    """'mean ± sample std' (ddof=1); a single value has no std."""
    if not values:
        return "—"
    spread = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.{digits}f}{spread}"


# ----------------------------------------------------------------------------------------------
# run folders

LOG_FIX = ("restore it from a copy, or move its run folder away and run the grid's command again to train "
           "that run anew")
MANIFEST_FIX = ("restore it from a copy, or delete it: --report then reads every VARIANT/seed_S folder (variants "
                "in alphabetical order), and the grid's command writes a new one")


def read_log(run_dir):
    """The entries of run_dir/log.jsonl ([] if there is none); a line torn by a killed run is skipped,
    bytes that are not text stop with one line naming the file."""
    path = Path(run_dir) / "log.jsonl"
    return read_jsonl(path, LOG_FIX) if path.exists() else []


def is_finished(entries, max_iters=None):
    """True if the log ends with train.py's "done" entry (or, from an older train.py without it,
    the last evaluation is at max_iters)."""
    if entries and entries[-1].get("done"):
        return True
    evals = [entry for entry in entries if "val_loss" in entry]
    return bool(evals) and max_iters is not None and evals[-1].get("iter") == max_iters


def summarize(entries):
    """What the report needs from one finished run."""
    by_iter = {entry["iter"]: entry for entry in entries if "val_loss" in entry}  # a re-run step: the later wins
    evals = [by_iter[i] for i in sorted(by_iter)]
    done = entries[-1] if entries[-1].get("done") else {}
    accuracy = [(entry["iter"], float(entry["answer_accuracy"])) for entry in evals
                if entry.get("answer_accuracy") is not None]
    run = next((entry["run"] for entry in entries if isinstance(entry.get("run"), dict)), {})
    if not isinstance(run.get("config", {}), dict):
        raise TypeError("its first entry's settings are not a JSON object")
    return dict(evals=evals,
                best=float(done.get("best_val_loss", min(float(entry["val_loss"]) for entry in evals))),
                final=float(done.get("final_val_loss", evals[-1]["val_loss"])),
                accuracy_best=max((a for _, a in accuracy), default=None),
                accuracy_final=accuracy[-1][1] if accuracy else None,
                # the first evaluation at which the answers reach ACCURATE: when a clicking run has clicked
                accurate_at=next((i for i, a in accuracy if a >= ACCURATE), None),
                tokens_per_sec=[float(entry["tokens_per_sec"]) for entry in entries if entry.get("tokens_per_sec")],
                elapsed=None if (elapsed := done.get("elapsed_s", entries[-1].get("elapsed_s"))) is None
                else float(elapsed),
                run=run)


def device_names(out):
    """The devices the runs trained on, and torch's version, from train.py's first log.jsonl entry."""
    names = set()
    for log in Path(out).glob("*/seed_*/log.jsonl"):
        for entry in read_log(log.parent):
            if isinstance(entry.get("run"), dict):
                names.add(f"{entry['run'].get('device')} (torch {entry['run'].get('torch')})")
    return sorted(names)


def load_manifest(out):
    """OUT/compare.json, checked to have the shape compare.py writes (None if there is none)."""
    path = Path(out) / "compare.json"
    if not path.exists():
        return None
    manifest = read_json(path, MANIFEST_FIX)

    def problem():
        if not isinstance(manifest, dict):
            return "not a JSON object"
        for key, kind in [("variants", list), ("seeds", list), ("invocations", list)]:
            if not isinstance(manifest.get(key, []), kind):
                return f'"{key}" is not a list'
        for variant in manifest.get("variants", []):
            if not (isinstance(variant, dict) and isinstance(variant.get("name"), str)
                    and re.fullmatch(r"[\w][\w.+=-]*", variant["name"]) and isinstance(variant.get("spec"), str)
                    and isinstance(variant.get("max_iters"), (int, type(None)))):
                return f"a variant is not {{name, spec, max_iters}}: {variant!r:.60}"
        if not all(isinstance(seed, int) for seed in manifest.get("seeds", [])):
            return "a seed is not a whole number"
        for invocation in manifest.get("invocations", []):
            if not (isinstance(invocation, dict) and isinstance(invocation.get("command"), str)
                    and isinstance(invocation.get("parallel"), int) and isinstance(invocation.get("devices"), list)):
                return f"an invocation is not {{command, parallel, devices}}: {invocation!r:.60}"
        return None

    if (trouble := problem()):
        raise CompareError(f"{path} is damaged ({trouble}); {MANIFEST_FIX}")
    return manifest


# ----------------------------------------------------------------------------------------------
# report and figures

def collect(out, manifest):
    """{variant: {seed: summary}} of the finished runs, the variants' specs, and the unfinished runs."""
    if manifest:
        variants = [(v["name"], v["spec"], v["max_iters"]) for v in manifest["variants"]]
        folders = {v[0]: [Path(out) / v[0] / f"seed_{seed}" for seed in manifest["seeds"]] for v in variants}
    else:  # folders made without compare.json: every VARIANT/seed_S, variants in alphabetical order
        folders = {d.name: [f for f in sorted(d.glob("seed_*")) if f.name.removeprefix("seed_").isdigit()]
                   for d in sorted(Path(out).iterdir()) if d.is_dir()}
        folders = {name: seed_folders for name, seed_folders in folders.items() if seed_folders}
        variants = [(name, name, None) for name in folders]
    runs, unfinished = {}, []
    for name, _, max_iters in variants:
        runs[name] = {}
        for folder in folders[name]:
            entries = read_log(folder)
            if is_finished(entries, max_iters):
                try:
                    runs[name][int(folder.name.removeprefix("seed_"))] = summarize(entries)
                except (KeyError, TypeError, ValueError) as error:  # JSON, but not what train.py writes
                    raise CompareError(f"{folder / 'log.jsonl'} is damaged (an entry is not as train.py writes "
                                       f"it: {type(error).__name__} {error}); {LOG_FIX}") from None
            else:
                unfinished.append(f"{name}/{folder.name}")
    runs = {name: seeds for name, seeds in runs.items() if seeds}
    if not runs:
        raise CompareError(f"no finished runs in {out}; run the grid first: python compare.py CONFIG --out={out}")
    return runs, {name: spec for name, spec, _ in variants}, unfinished


def write_report(out, manifest, report_command, repeat_of=None):
    """Write OUT/report.md (and the figures) from the finished runs; returns its path. repeat_of: the
    folder of an earlier grid whose runs this one repeats at equal seeds (a section on their differences)."""
    runs, specs, unfinished = collect(out, manifest)
    lines = header(out, manifest or {}, report_command, runs, unfinished)
    lines += summary_table(runs, specs)
    lines += welch_table(runs, lambda run: run["best"], "the best val loss", 4, HOW_TO_READ)
    if any(column(by_seed, "accuracy_final") for by_seed in runs.values()):
        lines += click_section(runs)
    if repeat_of:
        lines += repeat_section(runs, repeat_of)
    lines += per_run_table(runs, "Best val loss of each run:", lambda run: f"{run['best']:.4f}")
    if any(column(by_seed, "accuracy_final") for by_seed in runs.values()):
        lines += per_run_table(runs, "Final answer accuracy of each run:",
                               lambda run: "—" if run["accuracy_final"] is None else f"{run['accuracy_final']:.3f}")
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


def format_p(p):
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def rows_text(k):
    return f"{k} row{'' if k == 1 else 's'}"


def welch_table(runs, value, what, digits, how_to_read):
    """Welch's test of value(run) of every variant against the first: the difference of the means, its 95%
    confidence interval, t, df, p, and p adjusted by Holm's method over the rows of this table."""
    reference, *others = runs
    base = [value(run) for run in runs[reference].values() if value(run) is not None]
    rows, tests = [], []
    for name in others:
        sample = [value(run) for run in runs[name].values() if value(run) is not None]
        if not sample or not base:
            rows.append([name, "—", "—", "—", "—", "— (no value)", "—"])
        elif min(len(sample), len(base)) < 2 or statistics.variance(sample) + statistics.variance(base) == 0:
            difference = statistics.fmean(sample) - statistics.fmean(base)
            rows.append([name, f"{difference:+.{digits}f}", "—", "—", "—",
                         "— (needs 2+ runs each and some spread)", "—"])
        else:
            test = welch(sample, base)
            tests.append((len(rows), test.p))
            interval = f"[{test.low:+.{digits}f}, {test.high:+.{digits}f}]"
            rows.append([name, f"{test.difference:+.{digits}f}", interval, f"{test.t:.2f}", f"{test.df:.1f}",
                         format_p(test.p), None])  # None: Holm's p, once every row's p is known
    for (row, _), adjusted in zip(tests, holm([p for _, p in tests])):
        rows[row][-1] = format_p(adjusted)
    names = ["variant", "difference", "95% CI", "t", "df", "p (two-sided)", "p (Holm)"]
    n = sorted({len(by_seed) for by_seed in runs.values()})
    return (["", f"Welch's t-test of {what} against {reference} (difference = variant − {reference}):", "",
             table_row(names), table_row(["---"] * len(names))] + [table_row(row) for row in rows] +
            ["", how_to_read.format(n=n[0] if len(n) == 1 else f"{n[0]} to {n[-1]}", k=rows_text(len(tests)))])


def click_section(runs):
    """For runs that log answer accuracy: how many click (final accuracy above CLICK), Fisher's exact test
    of each variant's clicks against the first's, and when each clicking run first reached ACCURATE."""
    reference, *others = runs
    finals = [(f"{name}/seed_{seed}", run["accuracy_final"]) for name, by_seed in runs.items()
              for seed, run in by_seed.items() if run["accuracy_final"] is not None]
    below, above = [a for _, a in finals if a <= CLICK], [a for _, a in finals if a > CLICK]
    near = [f"{run} {a:.3f}" for run, a in sorted(finals) if abs(a - CLICK) <= NEAR]
    intervals = {run["run"].get("config", {}).get("eval_interval") for by_seed in runs.values()
                 for run in by_seed.values()}

    def span(values):
        if not values:
            return "— (none)"
        return f"{min(values):.3f}" + (f" to {max(values):.3f}" if max(values) > min(values) else "")

    lines = ["", f"Clicks: a run clicks when its final answer accuracy exceeds {CLICK}. {CLICK_WHY} In this report "
             f"the runs at or below {CLICK} end at {span(below)}, those above at {span(above)}. "
             + (f"Within {NEAR} of {CLICK}, where a threshold moved by that much would change the count: "
                f"{', '.join(near)}." if near else f"No run ends within {NEAR} of {CLICK}."), ""]

    def clicks(by_seed):
        return sum(run["accuracy_final"] > CLICK for run in by_seed.values() if run["accuracy_final"] is not None)

    def count(by_seed):
        return sum(run["accuracy_final"] is not None for run in by_seed.values())

    rows, tests = [], []
    for name, by_seed in runs.items():
        k, n = clicks(by_seed), count(by_seed)
        reached = [f"{seed}: {run['accurate_at'] if run['accurate_at'] is not None else 'not reached'}"
                   for seed, run in sorted(by_seed.items())
                   if run["accuracy_final"] is not None and run["accuracy_final"] > CLICK]
        row = [name, n, k, f"{k / n:.2f}" if n else "—", "—", "—", mean_std(column(by_seed, "accuracy_final"), 3),
               ", ".join(reached) or "—"]
        if name != reference and n and count(runs[reference]):
            k0, n0 = clicks(runs[reference]), count(runs[reference])
            p = fisher_exact(k, n - k, k0, n0 - k0)
            tests.append((len(rows), p))
            row[4] = format_p(p)
        rows.append(row)
    for (row, _), adjusted in zip(tests, holm([p for _, p in tests])):
        rows[row][5] = format_p(adjusted)
    every = f" (evaluated every {intervals.pop()} steps)" if len(intervals) == 1 and None not in intervals else ""
    names = ["variant", "runs", "clicks", "share", f"Fisher p vs {reference} (two-sided)", "p (Holm)",
             "final answer accuracy", f"first step at accuracy ≥ {ACCURATE}, each clicking run (seed: step)"]
    lines += [table_row(names), table_row(["---"] * len(names))] + [table_row(row) for row in rows]
    lines += ["", f"Final answer accuracy: mean ± sample standard deviation over all runs of the variant. Fisher's "
              f"exact test compares the 2 × 2 table of (variant, {reference}) × (clicks, does not) with its margins "
              f"fixed; p is the probability, if clicking did not depend on the variant, of a table no more probable "
              f"than the one observed. p (Holm) is p adjusted by Holm's step-down method over the "
              f"{rows_text(len(tests))} of this table with a p. The step is that of the first evaluation{every} "
              f"at which the answer accuracy was {ACCURATE} or more."]
    lines += welch_table(runs, lambda run: run["accuracy_final"], "the final answer accuracy", 3,
                         HOW_TO_READ_ACCURACY)
    accurate = {name: {seed: run for seed, run in by_seed.items() if run["accurate_at"] is not None}
                for name, by_seed in runs.items()}
    accurate = {name: by_seed for name, by_seed in accurate.items() if by_seed}
    if len(accurate) >= 2 and reference in accurate:  # how fast the runs that got there got there
        lines += welch_table(accurate, lambda run: run["accurate_at"], f"the first step at accuracy ≥ {ACCURATE}", 0,
                             HOW_TO_READ_STEPS)
    return lines


def repeat_section(runs, first_out):
    """The runs of this grid against those of first_out with the same variant and seed: how far one
    run's best val loss lands from the same run repeated, next to the spread over seeds."""
    first, _, _ = collect(first_out, load_manifest(first_out))
    pairs = {name: [(seed, first[name][seed], run) for seed, run in sorted(by_seed.items()) if seed in first[name]]
             for name, by_seed in runs.items() if name in first}
    pairs = {name: seed_pairs for name, seed_pairs in pairs.items() if seed_pairs}
    if not pairs:
        raise CompareError(f"no finished run here has the same variant and seed as one in --repeat_of={first_out}; "
                           "give the folder of the grid that these runs repeat")
    names = ["variant", "seeds repeated", "mean absolute difference at equal seeds", "largest absolute difference",
             f"spread over seeds in {first_out} (sample std, n)"]
    lines = ["", f"Repeated runs: each run here against the run of {first_out} with the same variant and seed "
             "(best val loss):", "", table_row(names), table_row(["---"] * len(names))]
    for name, seed_pairs in pairs.items():
        gaps = [abs(run["best"] - earlier["best"]) for _, earlier, run in seed_pairs]
        spread = column(first[name], "best")
        lines.append(table_row([name, ", ".join(str(seed) for seed, _, _ in seed_pairs),
                                f"{statistics.fmean(gaps):.4f}", f"{max(gaps):.4f}",
                                f"{statistics.stdev(spread):.4f} (n = {len(spread)})" if len(spread) > 1 else "—"]))
    lines += ["", table_row(["variant", "seed", f"in {first_out}", "here", "difference (here − there)"]),
              table_row(["---"] * 5)]
    lines += [table_row([name, seed, f"{earlier['best']:.4f}", f"{run['best']:.4f}",
                         f"{run['best'] - earlier['best']:+.4f}"])
              for name, seed_pairs in pairs.items() for seed, earlier, run in seed_pairs]
    differences = [f"{name}/seed_{seed}: {setting_differences(earlier['run'], run['run'])}"
                   for name, seed_pairs in pairs.items() for seed, earlier, run in seed_pairs
                   if setting_differences(earlier["run"], run["run"])]
    lines.append("")
    if any(not earlier["run"] or not run["run"] for seed_pairs in pairs.values() for _, earlier, run in seed_pairs):
        lines.append("Settings not compared: a log lacks train.py's first entry (its settings).")
    elif differences:
        lines.append(f"**The repeated runs differ in their settings**, so they are not pure repeats: "
                     f"{'; '.join(differences)}.")
    else:
        lines.append(f"Each pair ran the same train.py settings (apart from {', '.join(PER_RUN_SETTINGS)}), "
                     "on the same kind of device, with the same torch.")
    return lines


def setting_differences(earlier, later):
    """What differs between two runs' first log entries, apart from the settings that name a run's place."""
    def flat(run):
        config = {key: value for key, value in run.get("config", {}).items() if key not in PER_RUN_SETTINGS}
        return config | {f"({key})": value for key, value in run.items() if key != "config"}
    a, b = flat(earlier), flat(later)
    return ", ".join(f"{key} {a.get(key)!r} → {b.get(key)!r}" for key in sorted(set(a) | set(b))
                     if a.get(key) != b.get(key))


def per_run_table(runs, title, cell):
    seeds = sorted({seed for by_seed in runs.values() for seed in by_seed})
    return (["", title, "", table_row(["variant", *[f"seed {s}" for s in seeds]]),
             table_row(["---"] * (len(seeds) + 1))]
            + [table_row([name, *[cell(by_seed[s]) if s in by_seed else "—" for s in seeds]])
               for name, by_seed in runs.items()])


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
        erase_free = any(run["run"].get("config", {}).get("residual") == "write" for run in seeds.values())
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
        print(f"report: {write_report(out, manifest, None, cfg.repeat_of)}")
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
        for arg in argv:  # an empty folder would be taken as "not given" (--report=) or as "." (--out=)
            key, eq, value = arg.removeprefix("--").partition("=")
            if arg.startswith("--") and key.replace("-", "_") in FOLDER_SETTINGS and eq and not value.strip():
                raise CompareError(f"--{key}= is empty; give a folder, e.g. --{key}=runs/baby")
        if cfg.repeat_of and not Path(cfg.repeat_of).is_dir():
            raise CompareError(f"--repeat_of={cfg.repeat_of} is not a folder; give the --out folder of the grid "
                               "that this one repeats")
        if cfg.repeat_of and Path(cfg.repeat_of).resolve() == Path(cfg.report or cfg.out).resolve():
            raise CompareError(f"--repeat_of={cfg.repeat_of} is this grid itself; give the folder of the earlier "
                               "grid that this one repeats")
        if cfg.report or cfg.report_only:
            out = Path(cfg.report or cfg.out)
            if files or common or cfg.report == "True":
                raise CompareError("--report takes only the grid's folder (and --repeat_of): "
                                   "python compare.py --report OUT")
            if not out.is_dir():
                raise CompareError(f"{out} is not a folder; give the --out folder of a grid")
            print(f"report: {write_report(out, load_manifest(out), command, cfg.repeat_of)}")
            return 0
        return run_and_report(cfg, files, common, command)
    except UserError as error:  # CompareError, ConfigError, and damaged files read back
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
