"""
The workshop (docs/WORKSHOP.md) keeps working: its scripts print the right numbers, its answers agree
with the model, and every command it gives names files and settings that exist.

The scripts run in this process, as `python SCRIPT ARGS` would run them, so that no new Python (and
no second import of torch) has to start: the whole file takes a few seconds.
"""

import ast
import contextlib
import importlib.util
import io
import re
import runpy
import shlex
import sys

import pytest
import torch

import ddl_kernels
from conftest import REPO, random_tokens, tiny_gpt
from ddl_gpt import DeltaUpdate, GPTConfig
from support.configurator import parse_overrides
from support.settings import check_settings
from train import TrainConfig

DOCS = REPO / "docs"
WORKSHOP = DOCS / "WORKSHOP.md"


def run_script(path, *args):
    """(exit status, stdout, stderr) of `python path args`, run in this process from the repository root."""
    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv, list(sys.path)
    sys.argv = [str(path), *args]
    status = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(path), run_name="__main__")
    except SystemExit as exit:
        status = exit.code if isinstance(exit.code, int) else 1
        if isinstance(exit.code, str):
            err.write(exit.code + "\n")
    finally:
        sys.argv, sys.path[:] = saved
    return status, out.getvalue(), err.getvalue()


def table(output):
    """{beta: {column: (before, after)} and 'eig': [...]} from the rows delta_toy.py prints."""
    rows = {}
    for line in output.splitlines():
        match = re.match(r"\s*(\d\.\d\d) \|(.*)$", line)
        if match:
            cells = match.group(2).split("|")
            pairs = [tuple(float(n) for n in cell.split("->")) for cell in cells[:3]]
            rows[float(match.group(1))] = dict(zip(("kx", "perp", "norm"), pairs),
                                               eig=[float(n) for n in cells[3].split()])
    return rows


@pytest.fixture(autouse=True)
def from_the_repository_root(monkeypatch):
    monkeypatch.chdir(REPO)


# ---------------------------------------------------------------------------------------------------
# exercise 1: docs/delta_toy.py

@pytest.mark.parametrize("v", [0.0, 0.5])
def test_delta_toy_shows_identity_overwrite_and_reflection(v):
    status, out, _ = run_script(DOCS / "delta_toy.py", f"--v={v}")
    assert status == 0
    rows = table(out)
    assert sorted(rows) == [0.0, 0.5, 1.0, 1.5, 2.0]
    kx, perp, norm = rows[0.0]["kx"][0], rows[0.0]["perp"][0], rows[0.0]["norm"][0]
    assert (kx, perp, norm) == (1.6, -1.3, 2.062)                     # the defaults WORKSHOP.md states
    assert rows[0.0]["kx"][1] == kx and rows[0.0]["norm"][1] == norm  # identity
    assert rows[1.0]["kx"][1] == v                                    # overwrite: k·x_new = v
    assert rows[2.0]["kx"][1] == pytest.approx(2 * v - kx)            # reflection of k·x about v
    if v == 0:
        assert rows[2.0]["norm"][1] == norm                           # Householder: |x| is kept
    for beta, row in rows.items():
        assert row["perp"][1] == perp                                 # nothing moves orthogonal to k
        assert row["kx"][1] - v == pytest.approx((1 - beta) * (kx - v), abs=1e-3)
        assert row["eig"] == sorted([1 - beta, 1.0])
    assert "DeltaUpdate.forward gives the same x_new: yes" in out


def test_delta_toy_notices_a_delta_update_that_disagrees_with_the_equation(monkeypatch):
    monkeypatch.setattr(DeltaUpdate, "forward", lambda self, X, x_in, c, h: X)  # a forward that never writes
    status, out, _ = run_script(DOCS / "delta_toy.py")
    assert status == 1 and "DeltaUpdate.forward gives the same x_new: NO" in out


@pytest.mark.parametrize("script, argument", [
    ("delta_toy.py", "--betas=0,3"), ("delta_toy.py", "--x=1"), ("delta_toy.py", "--k=0,0"),
    ("delta_toy.py", "--betass=1"), ("state_figure.py", "--beta=2.5"), ("state_figure.py", "--v=1,2"),
    ("read_gates.py", "--out_dir=no-such-run"), ("gradient_step.py", "--sed=1"),
    ("gradient_step.py", "--seed=99999999999999999999999"), ("generation_speed.py", "--what=foo"),
    ("generation_speed.py", "--modes=delta:3"), ("state_recovery.py", "--layers=0"),
    ("state_recovery.py", "--state_dtypes=float16"), ("state_recovery.py", "--d_v=four")])
def test_a_bad_setting_ends_in_one_error_line(script, argument):
    status, out, err = run_script(DOCS / script, argument)
    assert status == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: "), err


def test_state_recovery_gets_an_fp32_state_back_to_rounding_and_shows_a_bf16_states_drift():
    """X = X_new - beta k ⊗ e walked back over every write: with an fp32 state each recovered state is within
    rounding of the true one (a wrong e, sign or gate would be off by the write itself); a bf16 state's
    rounding adds up and shows."""
    status, out, err = run_script(DOCS / "state_recovery.py", "--layers=3", "--d_v=2")
    assert status == 0 and err == "", err
    rows = {line.split("|")[3].strip(): [float(cell) for cell in line.split("|")[4:6]]
            for line in out.splitlines()[2:]}
    assert max(rows["float32"]) < 1e-5
    assert rows["bfloat16"][0] < 1e-2 and rows["bfloat16"][1] > 1e-3


@pytest.mark.parametrize("script", sorted(path.name for path in DOCS.glob("*.py")))
def test_every_docs_script_answers_help_with_its_usage_and_runs_nothing(script):
    status, out, err = run_script(DOCS / script, "--help")
    assert status == 0 and err == ""
    doc = ast.get_docstring(ast.parse((DOCS / script).read_text(encoding="utf-8")))
    head, _, settings = out.partition("\nsettings (default shown):\n")
    assert head.strip() == doc.strip(), out                     # the script's own words first, nothing before
    assert settings and all(line.startswith("  --") for line in settings.splitlines()), out  # and nothing after


# ---------------------------------------------------------------------------------------------------
# the figures

def test_figures_draw_small_pngs(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is optional; the figures need it")
    for script, name in [("delta_toy.py", "delta_regimes.png"), ("state_figure.py", "state_and_write.png")]:
        status, out, _ = run_script(DOCS / script, "--plot", f"--out={tmp_path / name}") if script == "delta_toy.py" \
            else run_script(DOCS / script, f"--out={tmp_path / name}")
        assert status == 0 and f"wrote {tmp_path / name}" in out
        for png in (tmp_path / name, DOCS / name):                    # the new one and the committed one
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 100_000


def test_state_figure_without_matplotlib_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)              # import matplotlib now fails
    status, out, _ = run_script(DOCS / "state_figure.py", f"--out={tmp_path / 'x.png'}")
    assert status == 0 and out.startswith("note: ") and "pip install matplotlib" in out
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------------------------------
# exercise 2: the solution printed in WORKSHOP.md is the model's DeltaUpdate.forward

def workshop_forwards():
    """The skeleton and the solution of DeltaUpdate.forward that WORKSHOP.md prints."""
    blocks = re.findall(r"```python\n(.*?)```", WORKSHOP.read_text(encoding="utf-8"), re.S)
    forwards = [b for b in blocks if "def forward(self, X, x_in, c, h):" in b]
    skeleton = [b for b in forwards if "raise NotImplementedError" in b]
    solution = [b for b in forwards if "raise NotImplementedError" not in b]
    assert len(skeleton) == 1 and len(solution) == 1, "WORKSHOP.md should print one skeleton and one solution"
    return skeleton[0], solution[0]


def compile_method(source):
    namespace = {"torch": torch}
    exec(compile(source.replace("\n    ", "\n").strip(), "WORKSHOP.md", "exec"), namespace)
    return namespace["forward"]


# Every setting that changes what forward computes: the residual mode, the state's width and storage, and
# where dropout acts (the update runs in train mode, so dropout is on wherever it is set).
FORWARD_CASES = {
    "delta d_v=1": dict(residual="delta", d_v=1),
    "delta d_v=4": dict(residual="delta", d_v=4),
    "write d_v=1": dict(residual="write", d_v=1),
    "write d_v=4": dict(residual="write", d_v=4),
    "dropout on the write": dict(residual="delta", d_v=4, dropout=0.5),
    "dropout on h": dict(residual="delta", d_v=4, dropout=0.5, dropout_at="h"),
    "bf16 state": dict(residual="delta", d_v=4, state_dtype="bfloat16"),
}


@pytest.mark.parametrize("case", FORWARD_CASES)
def test_the_workshop_solution_of_delta_update_forward_matches_the_model(case):
    skeleton, solution = workshop_forwards()
    config = GPTConfig(n_embd=8, n_head=1, **FORWARD_CASES[case])
    torch.manual_seed(0)
    update = DeltaUpdate(config).train()
    torch.nn.init.normal_(update.gate_weight)
    X = torch.randn(2, 3, 8, config.d_v).to(getattr(torch, config.state_dtype))
    x_in, c, h = torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    with torch.no_grad():
        torch.manual_seed(1)                                          # the same dropout masks for both
        expected = update(X, x_in, c, h)
        torch.manual_seed(1)
        answer = compile_method(solution)(update, X, x_in, c, h)
        assert answer.dtype == expected.dtype == X.dtype
        torch.testing.assert_close(answer, expected)
        with pytest.raises(NotImplementedError):
            compile_method(skeleton)(update, X, x_in, c, h)


def test_with_the_workshop_solution_pasted_in_use_kernels_still_switches_to_the_fused_kernel(monkeypatch):
    """The exercise has the student write forward as the equation alone: the choice of the fused kernel
    (GPT.use_kernels) must not live in it, or the kernel tests fail for a right answer. With the kernels on,
    every delta write goes through a kernel: the autograd one (delta_write) while gradients are recorded, the
    inference one (delta_update) under torch.no_grad."""
    _, solution = workshop_forwards()
    monkeypatch.setattr(DeltaUpdate, "forward", compile_method(solution))
    calls = {"delta_write": 0, "delta_update": 0}

    def counted(name):
        def kernel(*args, **kwargs):                                   # delta_write(X, ...), delta_update(update, X, ...)
            calls[name] += 1
            return args[0] if name == "delta_write" else args[1]       # the state X, unchanged
        return kernel

    monkeypatch.setattr(ddl_kernels, "available", lambda X: True)
    for name in calls:
        monkeypatch.setattr(ddl_kernels, name, counted(name))
    model = tiny_gpt(residual="delta").eval()
    idx = random_tokens()
    writes = 2 * model.config.n_layer                                  # every delta write, in every block
    model(idx, idx)
    with torch.no_grad():
        model(idx)
    assert calls == {"delta_write": 0, "delta_update": 0}              # off by default
    model.use_kernels(True)
    model(idx, idx)
    assert calls == {"delta_write": writes, "delta_update": 0}         # gradients recorded: the autograd kernel
    with torch.no_grad():
        model(idx)
    assert calls == {"delta_write": writes, "delta_update": writes}    # no gradients: the inference kernel
    model.use_kernels(False)
    with torch.no_grad():
        model(idx)
    model(idx, idx)
    assert calls == {"delta_write": writes, "delta_update": writes}    # off again


# ---------------------------------------------------------------------------------------------------
# exercise 4: Compress; exercise 5: docs/gradient_step.py

def test_compress_reads_the_embedding_back_at_initialization():
    model = tiny_gpt(residual="delta", d_v=4)
    embedding = torch.randn(2, 5, 32)
    with torch.no_grad():
        state = model.transformer.expand(embedding)                                   # (B, T, d, d_v)
        torch.testing.assert_close(model.transformer.h[0].compress(state), embedding)
        compress = model.transformer.h[0].compress
        compress.mix.normal_()                                                        # any mix:
        expected = torch.einsum("btdv,dv->btd", state, compress.mix)                  # sum_j mix[i, j] X[i, j]
        torch.testing.assert_close(compress(state), expected)


@pytest.mark.parametrize("d_v", [1, 4])
def test_gradient_step_is_the_delta_rule(d_v):
    spec = importlib.util.spec_from_file_location("gradient_step", DOCS / "gradient_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    generator = torch.Generator().manual_seed(d_v)
    for beta in (0.0, 0.3, 1.0, 1.7, 2.0):
        X, h, v = torch.randn(8, d_v, generator=generator), torch.randn(8, generator=generator), torch.randn(d_v)
        step = module.gradient_step(X, h / h.norm(), v, beta)
        torch.testing.assert_close(step, module.delta_rule(X, h, v, beta), rtol=0, atol=1e-5)
        k = h / h.norm()
        torch.testing.assert_close(k @ step - v, (1 - beta) * (k @ X - v), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# exercise 3 and every command on the page

def test_read_gates_prints_one_row_per_layer(trained_run):
    status, out, _ = run_script(DOCS / "read_gates.py", f"--out_dir={trained_run}", "--last")
    assert status == 0
    rows = [line for line in out.splitlines() if re.match(r"\s+\d+ \|", line)]
    assert len(rows) == 2 and out.count("iter ") == 1                # 2 layers, the last evaluation only


@pytest.mark.parametrize("damage", [b"\x00\xff\xfe binary", b'{"iter": 4, "diagnostics": {"beta_mean": 1}}\n'],
                         ids=["not UTF-8", "not train.py's entries"])
def test_read_gates_on_a_damaged_log_ends_in_one_error_line_naming_it(tmp_path, damage):
    (tmp_path / "log.jsonl").write_bytes(damage)
    status, out, err = run_script(DOCS / "read_gates.py", f"--out_dir={tmp_path}")
    assert status == 1 and out == "", (out, err)
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert str(tmp_path / "log.jsonl") in err and "damaged" in err and "train again" in err, err


def workshop_commands():
    """Every line of a code block in WORKSHOP.md that starts with `python `, as a list of arguments."""
    commands, in_block = [], False
    for line in WORKSHOP.read_text(encoding="utf-8").splitlines():
        if line.strip().startswith("```"):
            in_block = not in_block
        elif in_block and line.startswith("python "):
            commands.append(shlex.split(line, comments=True)[1:])
    return commands


def test_the_workshop_page_has_commands_and_its_links_exist():
    commands = workshop_commands()
    assert ["-m", "pytest", "-q", "tests/test_delta_math.py"] in commands
    assert ["docs/delta_toy.py"] in commands
    for link in re.findall(r"\]\(([^)#]+)\)", WORKSHOP.read_text(encoding="utf-8")):
        assert (DOCS / link).exists(), link


@pytest.mark.parametrize("command", workshop_commands(), ids=lambda command: " ".join(command)[:60])
def test_every_workshop_command_names_files_and_settings_that_exist(command):
    if command[:2] == ["-m", "pytest"]:
        args = command[2:]
        selected = args[args.index("-k") + 1] if "-k" in args else None
        files = [REPO / a for a in args if not a.startswith("-") and a != selected]
        assert files and all(f.is_file() for f in files), files
        if selected:
            names = re.findall(r"def (test_\w+)", "".join(f.read_text(encoding="utf-8") for f in files))
            assert any(selected in name for name in names), f"-k {selected} selects no test"
        return
    script, args = REPO / command[0], command[1:]
    assert script.is_file(), script
    status, usage, _ = run_script(script, "--help")
    assert status == 0
    assert "settings (default shown)" in usage or not args           # a script with no settings just runs
    for arg in args:
        if arg.startswith("--"):
            assert f"--{arg[2:].partition('=')[0]}=" in usage, f"{command[0]} has no setting {arg}"
        else:
            assert (REPO / arg).is_file(), arg                        # a config file
    if command[0] == "train.py":                                      # the values too, as train.py checks them
        check_settings(TrainConfig(**parse_overrides(TrainConfig, args)))
