"""
compare.py: the statistics (Student's t without scipy, Welch's test), the report from run folders,
resuming an interrupted grid, failures and Ctrl-C, bad command lines, and one real grid of tiny runs.

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


def write_run(out, variant, seed, val_losses, done=True, accuracy=None, beta=None, elapsed=60.0):
    """A run folder as train.py leaves it: evaluations every 100 iterations, a progress entry in between,
    and the final "done" entry if the run finished."""
    folder = Path(out) / variant / f"seed_{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
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


def test_two_sided_p_of_student_t_matches_scipy_for_real_valued_df():
    stats = pytest.importorskip("scipy.stats")
    for df in (0.7, 1.0, 2.5, 50 / 17, 10.0, 33.3, 1000.0):
        for t in (0.05, 0.5, 1.0, 2.0, 3.5, 8.0, 40.0):
            assert compare.two_sided_p(t, df) == pytest.approx(2 * stats.t.sf(t, df), rel=1e-9, abs=1e-300)


def test_welch_t_and_df_match_a_hand_computation_and_scipy():
    # [2, 4, 6]: mean 4, variance 4; [1, 2, 3]: mean 2, variance 1. Squared standard errors 4/3 and 1/3:
    # t = 2 / sqrt(5/3); df = (5/3)^2 / ((4/3)^2 / 2 + (1/3)^2 / 2) = 50/17.
    difference, t, df, p = compare.welch([2, 4, 6], [1, 2, 3])
    assert (difference, t, df) == pytest.approx((2.0, 2 / math.sqrt(5 / 3), 50 / 17))
    assert p == pytest.approx(compare.two_sided_p(2 / math.sqrt(5 / 3), 50 / 17))
    stats = pytest.importorskip("scipy.stats")
    assert p == pytest.approx(stats.ttest_ind([2, 4, 6], [1, 2, 3], equal_var=False).pvalue, rel=1e-9)


# --- variants ------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, name, settings", [
    ("add", "add", {"residual": "add"}),
    ("delta:4", "delta_dv4", {"residual": "delta", "d_v": "4"}),
    ("write", "write", {"residual": "write"}),
    ("delta+dropout=0", "delta+dropout=0", {"residual": "delta", "dropout": "0"}),
    ("nodrop=delta:4+dropout=0+beta_init=0.5", "nodrop", {"residual": "delta", "d_v": "4", "dropout": "0",
                                                          "beta_init": "0.5"}),
])
def test_a_variant_spec_gives_its_folder_name_and_train_settings(spec, name, settings):
    variant = compare.parse_variant(spec)
    assert (variant.name, variant.settings) == (name, settings)
    assert variant.arguments == [f"--{key}={value}" for key, value in settings.items()]


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
    assert table_rows(report, "add") == [
        "| add | `add` | 3 | 1.5200 ± 0.0200 | 1.5300 ± 0.0200 | 0.500 ± 0.000 | 0.400 ± 0.000 | 2.0k | 50 s |",
        "| add | 1.5000 | 1.5200 | 1.5400 |"]
    # delta: best 1.57 ± sqrt(7e-4); seed 4 did not finish and is left out
    assert table_rows(report, "delta")[0] == \
        "| delta | `delta` | 3 | 1.5700 ± 0.0265 | 1.5800 ± 0.0265 | — | — | 2.0k | 70 s |"
    # Welch by hand: squared standard errors 4e-4/3 and 7e-4/3, t = 0.05 / sqrt(11e-4/3) = 2.61, df = 242/65 = 3.72
    p = compare.two_sided_p(0.05 / math.sqrt(11e-4 / 3), 242 / 65)
    assert f"| delta | +0.0500 | 2.61 | 3.7 | {p:.3f} |" in report
    assert "Not finished (or not started), left out: add/seed_4, delta/seed_4." in report
    assert "shared GPU: timings not comparable" in report
    assert "Seeds: 1, 2, 3. Reference: add." in report and "--parallel=4" in report
    assert "not a measure of effect size" in report
    assert capsys.readouterr().out.splitlines()[-1] == f"report: {tmp_path / 'report.md'}"


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
