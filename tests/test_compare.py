"""
compare.py: the statistics (Student's t and its quantile, Welch's test and interval, Holm's adjustment,
Fisher's exact test; each checked against published tables, closed forms or exact enumeration), the report
from run folders (clicks, repeated runs), damaged files, resuming an interrupted grid, failures and
Ctrl-C, bad command lines, and one real grid of tiny runs.

Most tests write small log.jsonl files themselves and replace `compare.start_run` (which starts one
training process) by a fake that writes a finished log, so no training runs except in the last test.
"""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

import compare
from conftest import REPO, SUBPROCESS_ENV, command_line, tiny_run_settings


def write_run(out, variant, seed, val_losses, done=True, accuracy=None, beta=None, elapsed=60.0, run=None):
    """A run folder as train.py leaves it: its settings first if `run` is given, evaluations every 100
    iterations, a progress entry in between, and the final "done" entry if the run finished."""
    folder = Path(out) / variant / f"seed_{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    entries = [dict(iter=0, run=run)] if run else []
    for i, loss in enumerate(val_losses):
        if i:
            entries.append(dict(iter=100 * i, train_loss=loss, tokens_per_sec=1000 * i, elapsed_s=10.0 * i))
        entry = dict(iter=100 * i, val_loss=loss, best_val_loss=min(val_losses[:i + 1]), elapsed_s=10.0 * i)
        if accuracy:
            entry["answer_accuracy"] = accuracy[i]
        if beta:
            entry["diagnostics"] = dict(beta_mean=beta[i], beta_std=None, rewrite=None, state_rms=None)
        entries.append(entry)
    if done:
        entries.append(dict(iter=100 * (len(val_losses) - 1), done=True, best_val_loss=min(val_losses),
                            final_val_loss=val_losses[-1], elapsed_s=elapsed))
    (folder / "log.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    return folder


def fabricated_grid(out):
    """add and delta over seeds 1-3 (seed 4 unfinished or missing), as a 4-at-a-time grid left them.
    Best val losses: add 1.50, 1.52, 1.54; delta 1.55, 1.56, 1.60; each run ends 0.01 above its best."""
    for seed, best in zip((1, 2, 3), (1.50, 1.52, 1.54)):
        write_run(out, "add", seed, [4.0, 2.0, best, best + 0.01], accuracy=[0.0, 0.2, 0.5, 0.4], elapsed=50.0)
    for seed, best in zip((1, 2, 3), (1.55, 1.56, 1.60)):
        write_run(out, "delta", seed, [4.0, 2.0, best, best + 0.01], elapsed=70.0,
                  beta=[[[1.0, 1.0], [1.0, 1.0]], [[0.9, 1.2], [0.5, 1.0]], [[0.2, 1.5], [0.1, 1.9]],
                        [[0.2, 1.5], [0.1, 1.9]]])
    write_run(out, "delta", 4, [4.0, 2.0], done=False)
    manifest = dict(invocations=[dict(command="python compare.py --variants=add,delta --seeds=1,2,3,4 "
                                              f"--out={out} --parallel=4", parallel=4, devices=[])],
                    variants=[dict(name="add", spec="add", settings={"residual": "add"}, max_iters=300),
                              dict(name="delta", spec="delta", settings={"residual": "delta"}, max_iters=300)],
                    seeds=[1, 2, 3, 4], config_files=[], common=[], host="torch 2.13.0, Linux x86_64, 2 CPU cores")
    (Path(out) / "compare.json").write_text(json.dumps(manifest))


def table_rows(report, first_cell):
    return [line for line in report.splitlines() if line.startswith(f"| {first_cell} |")]


class FinishedProcess:
    def __init__(self, returncode=0):
        self.returncode = returncode

    def poll(self):
        return self.returncode


def fake_trainer(monkeypatch, fail=()):
    """Replace the start of training processes: each run 'finishes' at once (or fails, if its folder
    name ends with one of `fail`); returns the list of commands that were started."""
    started = []

    def start_run(command, log_path, env):
        started.append(command)
        folder = Path(log_path).parent
        if any(str(folder).endswith(name) for name in fail):
            Path(log_path).write_text("some progress\nerror: boom\n")
            return FinishedProcess(returncode=1)
        write_run(folder.parent.parent, folder.parent.name, folder.name.removeprefix("seed_"), [3.0, 2.0])
        return FinishedProcess()

    monkeypatch.setattr(compare, "start_run", start_run)
    return started


# --- statistics ----------------------------------------------------------------------------------

@pytest.mark.parametrize("t, df, p", [
    (2.228, 10, 0.05),                       # the 97.5% quantile of t with 10 degrees of freedom
    (0.0, 7, 1.0),
    (1.0, 1, 0.5),                           # Cauchy: p = 1 - (2/pi) atan|t|
    (3.0, 2, 1 - 3 / math.sqrt(11)),         # df = 2: p = 1 - |t| / sqrt(2 + t^2)
    (-3.0, 2, 1 - 3 / math.sqrt(11)),
    (1.959964, 1e5, 0.05),                   # large df: the normal distribution
])
def test_two_sided_p_of_student_t_matches_values_known_by_hand(t, df, p):
    assert compare.two_sided_p(t, df) == pytest.approx(p, abs=2e-4)


def t_density(x, df):
    return math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi) * \
        (1 + x * x / df) ** (-(df + 1) / 2)


@pytest.mark.parametrize("df", [1.5, 2.5, 50 / 17, 7.3, 33.3])
@pytest.mark.parametrize("t", [0.3, 1.0, 2.0, 4.0])
def test_two_sided_p_for_real_valued_df_matches_the_integral_of_the_density(t, df):
    # p = 1 - 2 * integral of the t density from 0 to t, by Simpson's rule on 2000 intervals: a computation
    # that shares nothing with the continued fraction in compare.py.
    steps, h = 2000, t / 2000
    integral = h / 3 * sum((1 if i in (0, steps) else 4 if i % 2 else 2) * t_density(i * h, df)
                           for i in range(steps + 1))
    assert compare.two_sided_p(t, df) == pytest.approx(1 - 2 * integral, abs=1e-10)


@pytest.mark.parametrize("probability, df, t", [
    # published tables of Student's t (to 3 decimals)
    (0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 4, 2.776), (0.975, 10, 2.228), (0.975, 30, 2.042),
    (0.95, 5, 2.015), (0.995, 3, 5.841), (0.975, 1e6, 1.960), (0.025, 4, -2.776), (0.5, 3, 0.0),
])
def test_the_t_quantile_matches_published_tables(probability, df, t):
    assert compare.t_quantile(probability, df) == pytest.approx(t, abs=5e-4)


def test_the_t_quantile_inverts_two_sided_p_for_real_valued_df():
    for df in (0.7, 2.5, 50 / 17, 33.3):
        for probability in (0.6, 0.9, 0.975, 0.9995):
            t = compare.t_quantile(probability, df)
            assert compare.two_sided_p(t, df) == pytest.approx(2 * (1 - probability), rel=1e-9)
    # closed forms: df = 1 (Cauchy) t = tan(pi (q - 1/2)); df = 2: t = (2q - 1) sqrt(2 / (4 q (1 - q)))
    assert compare.t_quantile(0.9, 1) == pytest.approx(math.tan(0.4 * math.pi), rel=1e-10)
    assert compare.t_quantile(0.9, 2) == pytest.approx(0.8 * math.sqrt(2 / (4 * 0.9 * 0.1)), rel=1e-10)


def test_welch_t_df_and_interval_match_a_hand_computation():
    # [2, 4, 6]: mean 4, variance 4; [1, 2, 3]: mean 2, variance 1. Squared standard errors 4/3 and 1/3:
    # t = 2 / sqrt(5/3); df = (5/3)^2 / ((4/3)^2 / 2 + (1/3)^2 / 2) = 50/17.
    test = compare.welch([2, 4, 6], [1, 2, 3])
    assert (test.difference, test.t, test.df) == pytest.approx((2.0, 2 / math.sqrt(5 / 3), 50 / 17))
    assert test.p == pytest.approx(compare.two_sided_p(2 / math.sqrt(5 / 3), 50 / 17))
    # [1, 2, 3] against [4, 5, 6]: equal variances 1 and n = 3, so df = (2/3)^2 / (2 (1/3)^2 / 2) = 4 exactly, and
    # the interval is -3 +- 2.776 (the published t quantile for df 4) x sqrt(2/3) = [-5.267, -0.733].
    test = compare.welch([1, 2, 3], [4, 5, 6])
    assert test.df == pytest.approx(4.0)
    assert (test.low, test.high) == pytest.approx((-3 - 2.776445 * math.sqrt(2 / 3), -3 + 2.776445 * math.sqrt(2 / 3)))
    assert (round(test.low, 3), round(test.high, 3)) == (-5.267, -0.733)
    # t = -3 / sqrt(2/3), t^2 = 13.5; for df = 4, p = 1 - (3s - s^3) / 2 with s = |t| / sqrt(t^2 + 4)
    s = math.sqrt(13.5 / 17.5)
    assert test.p == pytest.approx(1 - (3 * s - s ** 3) / 2, rel=1e-9)


def test_holm_adjusts_a_hand_worked_example_and_keeps_the_order():
    # sorted: 0.005 x 4 = 0.02; 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04, raised to the 0.06 before it
    assert compare.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert compare.holm([0.6, 0.02, 0.3]) == pytest.approx([0.6, 0.06, 0.6])   # 0.06; 0.3 x 2; 0.6 x 1
    assert compare.holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])               # 0.6 x 2 capped at 1, then carried
    assert compare.holm([0.2]) == [0.2] and compare.holm([]) == []


@pytest.mark.parametrize("table, p", [
    # the tea-tasting table: weights C(4, x) C(4, 4 - x) = 1, 16, 36, 16, 1 of 70; those <= 16: 34/70
    ((3, 1, 1, 3), 34 / 70),
    ((4, 0, 0, 4), 2 / 70),
    ((1, 3, 3, 1), 34 / 70),
    # rows 8 and 5, first column 7: weights 28, 280, 700, 560, 140, 8 of 1716; those <= 140: 176/1716
    ((6, 2, 1, 4), 176 / 1716),
    ((2, 6, 4, 1), 176 / 1716),              # the same table, rows and columns swapped
    ((0, 3, 0, 3), 1.0), ((3, 0, 3, 0), 1.0), ((2, 1, 2, 1), 1.0),
    ((10, 0, 0, 10), 2 / math.comb(20, 10)),
])
def test_fisher_exact_two_sided_matches_exact_enumeration(table, p):
    assert compare.fisher_exact(*table) == pytest.approx(p, rel=1e-12)
    assert round(compare.fisher_exact(3, 1, 1, 3), 4) == 0.4857


# --- variants ------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, name, settings", [
    ("add", "add", {"residual": "add"}),
    ("delta:4", "delta_dv4", {"residual": "delta", "d_v": "4"}),
    ("write", "write", {"residual": "write"}),
    ("write:4", "write_dv4", {"residual": "write", "d_v": "4"}),
    ("delta+dropout=0", "delta+dropout=0", {"residual": "delta", "dropout": "0"}),
    ("nodrop=delta:4+dropout=0+beta_init=0.5", "nodrop", {"residual": "delta", "d_v": "4", "dropout": "0",
                                                          "beta_init": "0.5"}),
])
def test_a_variant_spec_gives_its_folder_name_and_train_settings(spec, name, settings):
    variant = compare.parse_variant(spec)
    assert (variant.name, variant.settings) == (name, settings)
    assert variant.arguments == [f"--{key}={value}" for key, value in settings.items()]


def test_write_with_d_v_4_passes_the_models_own_check():
    assert compare.check_train_settings([], [], [compare.parse_variant("write:4")]) == {"write_dv4": 5000}


@pytest.mark.parametrize("spec", ["foo", "delta:x", "delta+dropout", "delta+seed=3", "delta:4+d_v=2",
                                  "a/b=delta", "a=b=delta", "delta+data_dir=/tmp"])
def test_a_malformed_variant_spec_is_refused_with_the_syntax(spec):
    with pytest.raises(compare.CompareError, match=re.escape(f"variant '{spec}'")):
        compare.parse_variant(spec)


# --- report --------------------------------------------------------------------------------------

def test_report_tables_give_mean_and_sample_std_over_finished_seeds_and_welch_against_the_first(tmp_path, capsys):
    fabricated_grid(tmp_path)
    assert compare.main(["--report", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    # add: best 1.52 ± 0.02, final 1.53 ± 0.02, accuracy best 0.5, final 0.4; tokens/s median of 1000, 2000, 3000
    assert "| add | `add` | 3 | 1.5200 ± 0.0200 | 1.5300 ± 0.0200 | 0.500 ± 0.000 | 0.400 ± 0.000 | 2.0k | 50 s |" \
        in report
    assert "| add | 1.5000 | 1.5200 | 1.5400 |" in report
    # delta: best 1.57 ± sqrt(7e-4); seed 4 did not finish and is left out
    assert "| delta | `delta` | 3 | 1.5700 ± 0.0265 | 1.5800 ± 0.0265 | — | — | 2.0k | 70 s |" in report
    # Welch by hand: squared standard errors 4e-4/3 and 7e-4/3, t = 0.05 / sqrt(11e-4/3) = 2.61, df = 242/65 = 3.72;
    # the interval 0.05 +- t_0.975(df) x sqrt(11e-4/3); one row, so Holm leaves p as it is
    p = compare.two_sided_p(0.05 / math.sqrt(11e-4 / 3), 242 / 65)
    half = compare.t_quantile(0.975, 242 / 65) * math.sqrt(11e-4 / 3)
    assert f"| delta | +0.0500 | [{0.05 - half:+.4f}, {0.05 + half:+.4f}] | 2.61 | 3.7 | {p:.3f} | {p:.3f} |" in report
    assert "| variant | difference | 95% CI | t | df | p (two-sided) | p (Holm) |" in report
    assert "Not finished (or not started), left out: add/seed_4, delta/seed_4." in report
    assert "shared GPU: timings not comparable" in report
    assert "Seeds: 1, 2, 3. Reference: add." in report and "--parallel=4" in report
    assert "Holm's step-down method over the 1 row of this table" in report
    assert "Neither is a measure of effect size" in report and "No correction" not in report
    assert capsys.readouterr().out.splitlines()[-1] == f"report: {tmp_path / 'report.md'}"


def click_grid(out):
    """Runs that log answer accuracy, evaluated every 100 steps: add clicks in 4 of 4 seeds, delta in 1 of 4,
    write in 2 of 4 (one of them, at 0.73, near the threshold)."""
    rising = {2: [0.1, 0.5, 0.8, 0.92], 3: [0.1, 0.6, 0.91, 0.95], 4: [0.1, 0.5, 0.7, 0.88]}
    stalled = [0.1, 0.45, 0.5, 0.52]
    grid = {"add": [rising[2], rising[3], rising[3], rising[4]],
            "delta": [rising[2], stalled, stalled, stalled],
            "write": [rising[3], [0.1, 0.5, 0.6, 0.73], stalled, stalled]}
    for name, curves in grid.items():
        for seed, accuracy in enumerate(curves, start=1):
            write_run(out, name, seed, [3.0, 2.0, 1.5, 1.4 - 0.01 * seed], accuracy=accuracy,
                      run=dict(config=dict(eval_interval=100, residual=name), device="cpu", torch="2"))


def test_a_report_with_answer_accuracy_counts_clicks_with_fishers_test_and_holm_and_the_steps_to_click(tmp_path):
    click_grid(tmp_path)
    assert compare.main(["--report", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    # delta 1 of 4 against add 4 of 4: weights C(4, x) C(4, 5 - x) for x = 1..4: 4, 24, 24, 4 of 56; those <= 4:
    # 8/56 = 0.143. write 2 of 4: weights for x = 2..4: 6, 16, 6 of 28 (C(8, 6)); those <= 6: 12/28 = 0.429.
    # Holm: 0.143 x 2 = 0.286; 0.429 x 1, raised to 0.429.
    assert compare.fisher_exact(1, 3, 4, 0) == pytest.approx(8 / 56)
    assert compare.fisher_exact(2, 2, 4, 0) == pytest.approx(12 / 28)
    assert "| add | 4 | 4 | 1.00 | — | — | 0.925 ± 0.033 | 1: 300, 2: 200, 3: 200, 4: not reached |" in report
    assert "| delta | 4 | 1 | 0.25 | 0.143 | 0.286 | 0.620 ± 0.200 | 1: 300 |" in report
    assert "| write | 4 | 2 | 0.50 | 0.429 | 0.429 | 0.680 ± 0.205 | 1: 200, 2: not reached |" in report
    assert "exceeds 0.7. Why 0.7:" in report
    assert "the runs at or below 0.7 end at 0.520, those above at 0.730 to 0.950." in report
    assert "Within 0.05 of 0.7, where a threshold moved by that much would change the count: write/seed_2 0.730." \
        in report
    assert "first evaluation (evaluated every 100 steps)" in report
    # steps to 0.9 among the runs that got there: add 300, 200, 200; delta 300; write 200
    assert "Welch's t-test of the first step at accuracy ≥ 0.9 against add" in report
    assert "| delta | +67 | — | — | — | — (needs 2+ runs each and some spread) | — |" in report
    assert "| write | 0.950 | 0.730 | 0.520 | 0.520 |" in report        # final accuracy of each run
    # every run's final accuracy, no threshold: delta (0.92, 0.52 x 3) against add (0.92, 0.95, 0.95, 0.88):
    # difference -0.305; variances 0.04 and 0.0011, se sqrt(0.01 + 0.000275) = 0.1014, t = -3.01,
    # Welch df 0.010275^2 / (0.01^2 / 3 + 0.000275^2 / 3) = 3.2
    assert "Welch's t-test of the final answer accuracy against add" in report
    assert "| delta | -0.305 | [" in report and "| -3.01 | 3.2 |" in report


def test_a_repeated_grid_is_compared_run_by_run_at_equal_seeds_next_to_the_spread_over_seeds(tmp_path, capsys):
    settings = dict(config=dict(eval_interval=100, out_dir="x", device="cuda:0"), device="H200", torch="2")
    for seed, best in zip((1, 2, 3), (1.50, 1.52, 1.54)):
        write_run(tmp_path / "first", "add", seed, [3.0, best], run=settings)
        write_run(tmp_path / "first", "delta", seed, [3.0, best + 0.1], run=settings)
    moved = dict(settings, config=dict(settings["config"], out_dir="y", device="cuda:1"))   # where, not how
    for seed, best in zip((1, 3), (1.503, 1.539)):
        write_run(tmp_path / "again", "add", seed, [3.0, best], run=moved)
    argv = ["--report", str(tmp_path / "again"), f"--repeat_of={tmp_path / 'first'}"]
    assert compare.main(argv) == 0
    report = (tmp_path / "again" / "report.md").read_text()
    # |1.503 - 1.50| = 0.003 and |1.539 - 1.54| = 0.001: mean 0.002, largest 0.003; seeds' spread in first: 0.02
    assert f"| add | 1, 3 | 0.0020 | 0.0030 | 0.0200 (n = 3) |" in report
    assert "| add | 1 | 1.5000 | 1.5030 | +0.0030 |" in report and "| add | 3 | 1.5400 | 1.5390 | -0.0010 |" in report
    assert "Each pair ran the same train.py settings (apart from out_dir, device, resume)" in report
    # a pair that did not train alike is named
    write_run(tmp_path / "again", "add", 2, [3.0, 1.52], run=dict(settings, config=dict(eval_interval=50)))
    assert compare.main(argv) == 0
    assert "**The repeated runs differ in their settings**, so they are not pure repeats: add/seed_2: " \
           "eval_interval 100 → 50." in (tmp_path / "again" / "report.md").read_text()
    # no run in common
    assert compare.main(["--report", str(tmp_path / "first"), f"--repeat_of={tmp_path / 'again' / 'add'}"]) == 1
    assert "no finished runs in" in capsys.readouterr().err


def png_size(path):
    header = Path(path).read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


def test_figures_show_validation_curves_and_a_gate_heatmap_for_variants_that_log_gates(tmp_path):
    pytest.importorskip("matplotlib")
    fabricated_grid(tmp_path)
    compare.main(["--report", str(tmp_path)])
    assert png_size(tmp_path / "curves.png") == png_size(tmp_path / "gates_delta.png") == (600, 400)
    assert not (tmp_path / "gates_add.png").exists()


def test_without_matplotlib_the_report_is_written_with_a_one_line_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    fabricated_grid(tmp_path)
    assert compare.main(["--report", str(tmp_path)]) == 0
    assert (tmp_path / "report.md").exists() and not (tmp_path / "curves.png").exists()
    assert capsys.readouterr().out.splitlines()[0] == "note: figures skipped; pip install -r requirements-extra.txt"


# --- the grid ------------------------------------------------------------------------------------

def test_an_interrupted_grid_starts_only_its_missing_runs_and_continues_its_unfinished_ones(tmp_path, monkeypatch):
    write_run(tmp_path, "add", 1, [3.0, 2.0])                 # finished
    write_run(tmp_path, "add", 2, [3.0, 2.0], done=False)     # stopped half-way
    started = fake_trainer(monkeypatch)
    assert compare.main(["--variants=add,delta", "--seeds=1,2", f"--out={tmp_path}", "--max_iters=200"]) == 0
    train = [sys.executable, str(REPO / "train.py"), "--max_iters=200"]
    assert started == [
        train + ["--residual=add", "--seed=2", f"--out_dir={tmp_path / 'add' / 'seed_2'}", "--resume=auto"],
        train + ["--residual=delta", "--seed=1", f"--out_dir={tmp_path / 'delta' / 'seed_1'}"],
        train + ["--residual=delta", "--seed=2", f"--out_dir={tmp_path / 'delta' / 'seed_2'}"]]
    assert compare.main(["--variants=add,delta", "--seeds=1,2", f"--out={tmp_path}", "--max_iters=200"]) == 0
    assert len(started) == 3                                  # all finished: nothing more to start
    assert len(json.loads((tmp_path / "compare.json").read_text())["invocations"]) == 2


def test_runs_are_spread_over_devices_and_a_failed_run_is_reported_while_the_grid_goes_on(tmp_path, monkeypatch,
                                                                                          capsys):
    started = fake_trainer(monkeypatch, fail=["delta/seed_1"])
    argv = ["--variants=add,delta", "--seeds=1,2", f"--out={tmp_path}", "--parallel=2", "--devices=cuda:0,cuda:1"]
    assert compare.main(argv) == 1
    assert [command[-1] for command in started] == ["--device=cuda:0", "--device=cuda:1"] * 2
    assert f"FAILED {tmp_path / 'delta' / 'seed_1'} (exit 1): error: boom" in capsys.readouterr().out
    assert table_rows((tmp_path / "report.md").read_text(), "delta")[0].startswith("| delta | `delta` | 1 |")


def test_ctrl_c_stops_the_running_runs_says_how_to_continue_and_exits_130(tmp_path, monkeypatch, capsys):
    class RunningProcess(FinishedProcess):
        def poll(self):
            raise KeyboardInterrupt  # Ctrl-C arrives while the grid waits for its runs

        def terminate(self):
            stopped.append(self)

        def wait(self, timeout):
            return 0

    stopped = []
    monkeypatch.setattr(compare, "start_run", lambda command, log_path, env: RunningProcess())
    assert compare.main(["--variants=add,delta", "--seeds=1", f"--out={tmp_path}", "--parallel=2"]) == 130
    assert len(stopped) == 2
    assert "run the same command again" in capsys.readouterr().err


# --- the command line ----------------------------------------------------------------------------

@pytest.mark.parametrize("arguments, message", [
    (["--variants=add,delta:x"], "variant 'delta:x'"),
    (["config/no_such_config.py"], "config file config/no_such_config.py not found"),
    (["--out={tmp}/a_file/grid"], "cannot write to --out="),
    (["--parallel=0"], "--parallel=0"),
    (["--seeds=,"], "--seeds is empty"),
    (["--report={tmp}"], "no finished runs in"),
    (["--seed=3"], "--seed is set by compare.py"),
], ids=["variant", "config", "out", "parallel", "seeds", "report", "seed"])
def test_a_bad_command_line_exits_with_one_error_line_before_any_run(tmp_path, arguments, message):
    (tmp_path / "a_file").write_text("")
    arguments = [f"--out={tmp_path}/grid", *[a.format(tmp=tmp_path) for a in arguments]]   # the last --out wins
    result = subprocess.run([sys.executable, "compare.py", *arguments],
                            cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("error: ") and message in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a_file"]     # nothing started, nothing created


def run_compare(*arguments, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / "compare.py"), *arguments],
                          cwd=cwd, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("damage, message", [
    ("binary log", "add/seed_2/log.jsonl is not UTF-8 text (byte 0 is 0x89): it is damaged; restore it from a copy, "
                   "or move its run folder away and run the grid's command again"),
    ("compare.json not JSON", "compare.json is damaged (not JSON: Expecting value at line 2); restore it from a "
                              "copy, or delete it: --report then reads every VARIANT/seed_S folder"),
    ("compare.json binary", "compare.json is not UTF-8 text (byte 0 is 0xff)"),
    ("compare.json wrong shape", 'compare.json is damaged ("seeds" is not a list); restore it'),
    ("compare.json unsafe name", "compare.json is damaged (a variant is not {name, spec, max_iters}"),
    ("log entry not train.py's", "add/seed_2/log.jsonl is damaged (an entry is not as train.py writes it"),
])
def test_a_damaged_file_in_the_grid_ends_the_report_in_one_line_naming_it_and_the_fix(tmp_path, damage, message):
    fabricated_grid(tmp_path)
    log, manifest = tmp_path / "add" / "seed_2" / "log.jsonl", tmp_path / "compare.json"
    if damage == "binary log":
        log.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    elif damage == "compare.json not JSON":
        manifest.write_text('{"variants": [\n')          # cut short, as by a full disk
    elif damage == "compare.json binary":
        manifest.write_bytes(b"\xff\xfe{}")
    elif damage == "compare.json wrong shape":
        manifest.write_text(json.dumps(dict(json.loads(manifest.read_text()), seeds="1,2")))
    elif damage == "compare.json unsafe name":
        manifest.write_text(json.dumps(dict(variants=[dict(name="../../elsewhere", spec="add", max_iters=1)])))
    else:
        log.write_text('{"iter": 0, "val_loss": "low"}\n{"iter": 300, "done": true}\n')
    result = run_compare("--report", str(tmp_path))
    assert result.returncode == 1 and result.stdout == "", result.stderr
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(f"error: {tmp_path}/")
    assert message in result.stderr
    assert not (tmp_path / "report.md").exists()


@pytest.mark.parametrize("damage", ["binary log", "compare.json not JSON"])
def test_a_damaged_file_stops_the_grid_command_before_any_run_in_one_line(tmp_path, damage):
    write_run(tmp_path, "add", 1, [3.0, 2.0])
    if damage == "binary log":
        (tmp_path / "add" / "seed_1" / "log.jsonl").write_bytes(b"\x00\xff" * 64)
    else:
        (tmp_path / "compare.json").write_text("{")
    result = run_compare("--variants=add", "--seeds=1", f"--out={tmp_path}", "--max_iters=200")
    assert result.returncode == 1 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(f"error: {tmp_path}/")
    assert "is damaged" in result.stderr and "restore it from a copy" in result.stderr
    assert not (tmp_path / "add" / "seed_1" / "stdout.log").exists()    # no run started


@pytest.mark.parametrize("arguments, message", [
    (["--report="], "error: --report= is empty; give a folder, e.g. --report=runs/baby"),
    (["--report", ""], "error: --report= is empty; give a folder"),
    (["--repeat_of=", "--report=grid"], "error: --repeat_of= is empty; give a folder"),
    (["--report=grid", "--repeat_of=nowhere"], "error: --repeat_of=nowhere is not a folder; give the --out folder"),
    (["--out="], "error: --out= is empty"),
    (["--report=grid", "--repeat_of=./grid"], "error: --repeat_of=./grid is this grid itself"),
], ids=["report=", "report ''", "repeat_of=", "repeat_of missing", "out=", "repeat_of itself"])
def test_an_empty_or_missing_folder_is_refused_and_starts_no_grid(tmp_path, arguments, message):
    (tmp_path / "grid").mkdir()
    result = run_compare(*arguments, cwd=tmp_path)
    assert result.returncode == 1 and result.stdout == ""
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(message)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["grid"]     # no out-compare, nothing written


def test_a_misspelled_setting_is_refused_with_the_closest_valid_one(tmp_path, capsys):
    assert compare.main(["--parralel=2", f"--out={tmp_path}/grid"]) == 1
    assert capsys.readouterr().err == "error: unknown setting 'parralel'; did you mean --parallel?\n"
    assert compare.main(["--variants=add:4", f"--out={tmp_path}/grid"]) == 1   # checked as the model would
    assert "variant add_dv4: residual='add' has no expanded state" in capsys.readouterr().err
    assert not (tmp_path / "grid").exists()


def test_help_lists_every_setting_with_its_default():
    result = subprocess.run([sys.executable, "compare.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0
    assert all(f"--{name}={default}\n" in result.stdout for name, default in
               [("variants", "add,delta"), ("seeds", "1337,1,2"), ("out", "out-compare"), ("parallel", 1)])


# --- end to end ----------------------------------------------------------------------------------

def test_a_grid_of_two_tiny_real_runs_is_trained_reported_and_then_skipped(char_data, tmp_path, monkeypatch):
    # Finished runs are recognized by train.py's final {"done": true} entry, or (for a train.py that does
    # not write it) by a last evaluation at max_iters: this test passes with either.
    settings = tiny_run_settings(char_data, tmp_path, max_iters=2, eval_interval=2)
    del settings["out_dir"]
    argv = ["--variants=add,delta", "--seeds=1", f"--out={tmp_path / 'grid'}", "--parallel=2", *command_line(settings)]
    assert compare.main(argv) == 0, (tmp_path / "grid" / "delta" / "seed_1" / "stdout.log").read_text()
    report = (tmp_path / "grid" / "report.md").read_text()
    assert table_rows(report, "add")[0].startswith("| add | `add` | 1 |")
    assert table_rows(report, "delta")[0].startswith("| delta | `delta` | 1 |")
    monkeypatch.setattr(compare, "start_run", lambda *args: pytest.fail("a finished run was started again"))
    assert compare.main(argv) == 0
