"""
The command lines as a user meets them: train.py, sample.py, bench.py and data/prepare.py.

- Every mistake (a bad setting, value or combination, a missing or damaged file, an unwritable folder)
  exits non-zero with one `error:` line naming what was wrong, never a traceback, and before any heavy
  work: no out_dir is created for a bad setting, no checkpoint is touched.
- Ctrl-C (SIGINT) and SIGTERM save ckpt.pt and exit 130 / 143; --resume then logs the losses of an
  uninterrupted run. One run at a time per out_dir (a lock that a killed run does not leave stuck).
- --help lists every setting with its default and meaning.

Most cases call the scripts' command-line entry (run_cli) in this process, exactly as `python SCRIPT
ARGS` does; a representative few run the real command lines, all started at once (each one spends
seconds importing torch), and the runs to interrupt are signalled as soon as they train.
"""

import contextlib
import dataclasses
import io
import json
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

import bench as bench_module
import compare
import data.prepare as prepare_module
import sample as sample_module
import train as train_module
from data.reassign.prepare import ReassignConfig
from support.configurator import UserError, field_help, run_cli
from conftest import REPO, SUBPROCESS_ENV, command_line, logged, run_training, tiny_run_settings
from support.device import pick_device, pick_dtype
from support.settings import check_settings
from train import TrainConfig, resolve_config

TIMEOUT = 180  # seconds for one subprocess: the CPU is shared and slow
CONFIGS = {"train.py": train_module.TrainConfig, "sample.py": sample_module.SampleConfig,
           "bench.py": bench_module.BenchConfig, "data/prepare.py": prepare_module.PrepareConfig}


class Result(NamedTuple):
    code: int
    stdout: str
    stderr: str

    @property
    def last_line(self):
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else ""


def cli(script, argv):
    """Run `python SCRIPT ARGV` in this process: the script's run_cli entry, with the exit status and the
    output that the interpreter would give (sys.exit("message") prints it to stderr and exits 1)."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if script == "data/prepare.py":
                prepare_module.main(argv)
            else:
                module = {"train.py": train_module, "sample.py": sample_module, "bench.py": bench_module}[script]
                run_cli(module.main, CONFIGS[script], module.__doc__, argv)
        except SystemExit as exit:
            code = exit.code
    if isinstance(code, str):
        err.write(code + "\n")
        code = 1
    return Result(code or 0, out.getvalue(), err.getvalue())


def assert_one_error_line(result, *names):
    """Non-zero exit, no traceback, and stderr ending in one `error:` line that contains every name."""
    shown = f"exit {result.code}\nstdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-3000:]}"
    assert result.code != 0, shown
    assert "Traceback" not in result.stdout + result.stderr, shown
    assert result.last_line.startswith("error: "), shown
    assert sum(line.startswith("error:") for line in result.stderr.splitlines()) == 1, shown
    for name in names:
        assert name in result.last_line, shown


def snapshot(folder):
    """{name: bytes} of every file in folder (nothing if it does not exist)."""
    folder = Path(folder)
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()} if folder.is_dir() else {}


def flip_tensor_bytes(path):
    """Invert 8 bytes in the middle of the largest tensor's data inside a checkpoint: it still unpickles,
    only the checksum can tell."""
    import zipfile
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    blob = bytearray(Path(path).read_bytes())
    name_length, extra_length = struct.unpack("<HH", blob[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_length + extra_length + info.file_size // 2
    blob[start:start + 8] = bytes(b ^ 0xFF for b in blob[start:start + 8])
    Path(path).write_bytes(bytes(blob))


def iters_by_kind(out_dir):
    """{kind: [iter of every log.jsonl entry of that kind]}; the kinds: train_loss (progress lines),
    val_loss (evaluations), run (the start of a run or of a resume) and done."""
    found = {}
    for line in (Path(out_dir) / "log.jsonl").read_text().splitlines():
        entry = json.loads(line)
        for kind in ("train_loss", "val_loss", "run", "done"):
            if kind in entry:
                found.setdefault(kind, []).append(entry["iter"])
    return found


# ----------------------------------------------------------------------------------------------
# the table of bad inputs, in this process

class Context:
    """What a case builds on: a tmp folder, the tiny dataset, a finished tiny run; out_dir is tmp/out."""

    def __init__(self, tmp, char_data, trained_run):
        self.tmp, self.data, self.trained = tmp, char_data, trained_run
        self.out = tmp / "out"
        self.run_dir = None

    def train(self, *extra, **settings):
        """A tiny train.py command line into tmp/out, with `settings` changed and `extra` appended."""
        out_dir = settings.pop("out_dir", self.out)
        return command_line(tiny_run_settings(self.data, out_dir, **settings)) + list(extra)

    def file(self, name, text):
        if isinstance(text, bytes):
            (self.tmp / name).write_bytes(text)
        else:
            (self.tmp / name).write_text(text)
        return str(self.tmp / name)

    def dataset(self, damage):
        """data_dir and dataset of a copy of the tiny dataset, damaged by damage(folder)."""
        folder = Path(shutil.copytree(Path(self.data["data_dir"]) / self.data["dataset"], self.tmp / "data" / "tiny"))
        damage(folder)
        return dict(data_dir=str(self.tmp / "data"), dataset="tiny")

    def run(self, damage=None, file="ckpt.pt"):
        """A copy of the finished run, its ckpt.pt (or another of its files) damaged by damage(path)."""
        self.run_dir = Path(shutil.copytree(self.trained, self.tmp / "run"))
        if damage:
            damage(self.run_dir / file)
        return self.run_dir


def odd_bytes(folder):
    with open(folder / "train.bin", "ab") as f:
        f.write(b"\x00")


def set_vocab(size):
    def damage(folder):
        meta = json.loads((folder / "meta.json").read_text())
        (folder / "meta.json").write_text(json.dumps(meta | {"vocab_size": size}))
    return damage


def reverse_chars(folder):
    """The same tokens, read as other characters: a dataset that does not belong to a checkpoint of the original."""
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps(meta | {"chars": meta["chars"][::-1]}))


def truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def cut_val_to_50_tokens(folder):
    """val.bin cut short while meta.json still records its full length."""
    (folder / "val.bin").write_bytes((folder / "val.bin").read_bytes()[:100])


TEXT, BINARY = "some text\n" * 20, b"\x00\x01\xff binary"
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")

# (id, script, argv builder, names the error line must contain[, a mark])
CASES = [
    # train.py: settings, checked before anything is created
    ("unknown key", "train.py", lambda c: c.train("--n_layers=3"), ["'n_layers'", "did you mean --n_layer?"]),
    ("unknown bare flag", "train.py", lambda c: c.train("--fast"), ["'fast'"]),
    ("stray argument", "train.py", lambda c: c.train("n_layer=3"), ["'n_layer=3'", "--key=value"]),
    ("residual", "train.py", lambda c: c.train("--residual=nonsense"), ["residual", "nonsense"]),
    ("heads", "train.py", lambda c: c.train("--n_embd=384", "--n_head=5"), ["n_head=5", "n_embd=384"]),
    ("batch_size 0", "train.py", lambda c: c.train("--batch_size=0"), ["--batch_size=0"]),
    ("max_iters -1", "train.py", lambda c: c.train("--max_iters=-1"), ["--max_iters=-1"]),
    ("max_iters 1.5", "train.py", lambda c: c.train("--max_iters=1.5"), ["--max_iters", "int"]),
    ("learning_rate nan", "train.py", lambda c: c.train("--learning_rate=nan"), ["--learning_rate", "finite"]),
    ("learning_rate inf", "train.py", lambda c: c.train("--learning_rate=1e400"), ["--learning_rate", "finite"]),
    ("learning_rate 0", "train.py", lambda c: c.train("--learning_rate=0"), ["--learning_rate", "positive"]),
    ("dropout 1.5", "train.py", lambda c: c.train("--dropout=1.5"), ["--dropout=1.5"]),
    ("beta_init 2", "train.py", lambda c: c.train("--beta_init=2"), ["beta_init"]),
    ("d_v 0", "train.py", lambda c: c.train("--d_v=0"), ["--d_v=0"]),
    ("add with d_v 4", "train.py", lambda c: c.train("--residual=add", "--d_v=4"), ["residual='add'", "d_v"]),
    ("value_map", "train.py", lambda c: c.train("--value_map=cubic"), ["value_map", "cubic"]),
    ("min_lr above lr", "train.py", lambda c: c.train("--min_lr=1"), ["--min_lr", "--learning_rate"]),
    ("eval_iters 0", "train.py", lambda c: c.train("--eval_iters=0"), ["--eval_iters=0"]),
    ("log_interval 0", "train.py", lambda c: c.train("--log_interval=0"), ["--log_interval=0"]),
    ("seed -1", "train.py", lambda c: c.train("--seed=-1"), ["--seed=-1"]),
    ("seed 2^31", "train.py", lambda c: c.train("--seed=2147483648"), ["--seed"]),
    ("warmup -1", "train.py", lambda c: c.train("--warmup_iters=-1"), ["--warmup_iters"]),
    ("beta2 1", "train.py", lambda c: c.train("--beta2=1"), ["--beta2"]),
    ("lr_decay_iters 0", "train.py", lambda c: c.train("--lr_decay_iters=0"), ["--lr_decay_iters"]),
    ("resume maybe", "train.py", lambda c: c.train("--resume=maybe"), ["--resume"]),
    ("device cuda", "train.py", lambda c: c.train(device="cuda"), ["--device=cuda", "no usable CUDA"], no_gpu),
    ("device tpu", "train.py", lambda c: c.train(device="tpu"), ["--device", "tpu"]),
    ("device meta", "train.py", lambda c: c.train(device="meta"), ["--device=meta"]),
    ("dtype float8", "train.py", lambda c: c.train(dtype="float8"), ["--dtype", "float8"]),
    ("compile maybe", "train.py", lambda c: c.train(compile="maybe"), ["--compile", "maybe"]),
    ("fused on cpu", "train.py", lambda c: c.train(fused=True), ["--fused=True", "CUDA", "--fused=False"], no_gpu),
    ("fused with add", "train.py", lambda c: c.train(fused=True, residual="add"), ["--fused=True", "residual=add"]),
    ("bare out_dir", "train.py", lambda c: c.train("--out_dir"), ["--out_dir needs a value"]),
    ("empty out_dir", "train.py", lambda c: c.train("--out_dir="), ["--out_dir= is empty"]),
    ("empty dataset", "train.py", lambda c: c.train("--dataset="), ["--dataset= is empty"]),
    # train.py: config files
    ("config missing", "train.py", lambda c: [str(c.tmp / "absent.py"), *c.train()], ["absent.py", "not found"]),
    ("config syntax", "train.py", lambda c: [c.file("bad.py", "n_layer = 2\nx = (\n"), *c.train()],
     ["bad.py", "line 2", "SyntaxError"]),
    ("config raises", "train.py", lambda c: [c.file("bad.py", "n_layer = 1 / 0\n"), *c.train()],
     ["bad.py", "line 1", "ZeroDivisionError"]),
    ("config exits", "train.py", lambda c: [c.file("bad.py", "import sys\nsys.exit(3)\n"), *c.train()],
     ["bad.py", "SystemExit"]),
    ("config bad value", "train.py", lambda c: [c.file("bad.py", "d_v = [2]\n"), *c.train()], ["--d_v", "int"]),
    ("config unknown name", "train.py", lambda c: [c.file("bad.py", "n_layers = 2\n"), *c.train()],
     ["did you mean --n_layer?"]),
    ("config True as a number", "train.py",  # bool is an int in Python: True would train 1 layer
     lambda c: [c.file("bad.py", "n_layer = True\n"), *[a for a in c.train() if not a.startswith("--n_layer")]],
     ["--n_layer=True", "expected int"]),
    # train.py: data and folders
    ("dataset missing", "train.py", lambda c: c.train(data_dir=str(c.tmp), dataset="absent"),
     ["'absent'", "not prepared", "data/prepare.py"]),
    ("train.bin odd size", "train.py", lambda c: c.train(**c.dataset(odd_bytes)), ["train.bin", "damaged"]),
    ("train.bin empty", "train.py", lambda c: c.train(**c.dataset(lambda f: (f / "train.bin").write_bytes(b""))),
     ["train.bin", "0 tokens", "--block_size"]),
    ("val.bin missing", "train.py", lambda c: c.train(**c.dataset(lambda f: (f / "val.bin").unlink())),
     ["val.bin", "missing"]),
    ("meta.json not JSON", "train.py", lambda c: c.train(**c.dataset(lambda f: (f / "meta.json").write_text("{oops"))),
     ["meta.json", "damaged"]),
    ("meta.json vocab 0", "train.py", lambda c: c.train(**c.dataset(set_vocab(0))), ["meta.json", "damaged"]),
    ("meta.json vocab 1.5", "train.py", lambda c: c.train(**c.dataset(set_vocab(1.5))), ["meta.json", "damaged"]),
    ("tokens past vocab", "train.py", lambda c: c.train(**c.dataset(set_vocab(5))), ["train.bin", "vocabulary of 5"]),
    ("val.bin shorter than meta.json", "train.py", lambda c: c.train(**c.dataset(cut_val_to_50_tokens)),
     ["val.bin", "holds 50 tokens", "meta.json records", "prepare the dataset again"]),
    ("block_size too long", "train.py", lambda c: c.train("--block_size=100000"), ["--block_size", "too few"]),
    ("out_dir under a file", "train.py", lambda c: c.train(out_dir=c.file("plain", "") + "/out"),
     ["--out_dir", "cannot be written"]),
    # train.py: checkpoints (the run's files must stay as they were)
    ("resume without ckpt", "train.py", lambda c: c.train("--resume"), ["no checkpoint", "ckpt.pt"]),
    ("ckpt bytes flipped", "train.py", lambda c: ["--resume", f"--out_dir={c.run(flip_tensor_bytes)}"],
     ["ckpt.pt", "damaged"]),
    ("ckpt truncated", "train.py", lambda c: ["--resume", f"--out_dir={c.run(truncate)}"], ["ckpt.pt", "corrupt"]),
    ("ckpt from another program", "train.py",
     lambda c: ["--resume", f"--out_dir={c.run(lambda p: torch.save({'weights': torch.ones(3)}, p))}"],
     ["ckpt.pt", "not a ddl-gpt checkpoint"]),
    ("fresh run over a ckpt", "train.py", lambda c: [f"--out_dir={c.run()}"], ["ckpt.pt", "--resume"]),
    ("resume another model", "train.py", lambda c: ["--resume", f"--out_dir={c.run()}", "--n_layer=3"],
     ["different model", "n_layer"]),
    ("resume on other characters", "train.py",
     lambda c: ["--resume", f"--out_dir={c.run()}", "--max_iters=8", *command_line(c.dataset(reverse_chars))],
     ["cannot resume on dataset 'tiny'", "--dataset="]),
    ("resume with a binary log.jsonl", "train.py",
     lambda c: ["--resume", f"--out_dir={c.run(lambda p: p.write_bytes(BINARY), 'log.jsonl')}", "--max_iters=6"],
     ["log.jsonl", "not UTF-8", "move it aside"]),
    ("resume bad setting", "train.py", lambda c: ["--resume", f"--out_dir={c.run()}", "--max_iters=8", "--min_lr=1"],
     ["--min_lr"]),
    # sample.py
    ("sample no ckpt", "sample.py", lambda c: [f"--out_dir={c.tmp / 'absent'}"], ["no checkpoint", "best.pt"]),
    ("sample checkpoint name", "sample.py", lambda c: [f"--out_dir={c.trained}", "--checkpoint=last"], ["checkpoint"]),
    ("sample foreign ckpt", "sample.py",
     lambda c: [f"--out_dir={c.run(lambda p: torch.save([1, 2], p))}", "--checkpoint=ckpt"],
     ["ckpt.pt", "not a ddl-gpt checkpoint"]),
    ("sample dtype", "sample.py", lambda c: [f"--out_dir={c.trained}", "--dtype=float8"], ["--dtype", "float8"]),
    ("sample device", "sample.py", lambda c: [f"--out_dir={c.trained}", "--device=tpu"], ["--device", "tpu"]),
    ("sample prompt file", "sample.py", lambda c: [f"--out_dir={c.trained}", f"--start=FILE:{c.tmp / 'absent.txt'}"],
     ["absent.txt", "not found"]),
    ("sample prompt file unnamed", "sample.py", lambda c: [f"--out_dir={c.trained}", "--start=FILE:"],
     ["--start=FILE:", "names no file"]),
    ("sample prompt chars", "sample.py", lambda c: [f"--out_dir={c.trained}", "--start=€"], ["vocabulary"]),
    ("sample unknown key", "sample.py", lambda c: ["--temprature=0.5"], ["did you mean --temperature?"]),
    # bench.py
    ("bench modes", "bench.py", lambda c: ["--modes=foo"], ["--modes", "'foo'"]),
    ("bench d_v", "bench.py", lambda c: ["--modes=add,delta:x"], ["--modes", "'delta:x'"]),
    ("bench cuda", "bench.py", lambda c: ["--device=cuda"], ["--device=cuda"], no_gpu),
    ("bench fused on cpu", "bench.py", lambda c: ["--modes=add,delta:4", "--device=cpu", "--fused=True"],
     ["--fused=True", "d_v=4", "--fused=False"], no_gpu),
    ("bench steps", "bench.py", lambda c: ["--steps=0"], ["--steps=0"]),
    ("bench cpu index", "bench.py", lambda c: ["--device=cpu:1"], ["--device=cpu:1", "--device=cpu"]),
    ("bench state_dtype", "bench.py", lambda c: ["--state_dtype=float16"], ["state_dtype='float16'", "bfloat16"]),
    ("bench compile_mode", "bench.py", lambda c: ["--compile_mode=fast"], ["--compile_mode='fast'", "reduce-overhead"]),
    ("bench gpu peak", "bench.py", lambda c: ["--gpu_peak_tflops=0"], ["--gpu_peak_tflops=0", "positive"]),
    ("bench grad_clip", "bench.py", lambda c: ["--grad_clip=-1"], ["--grad_clip=-1", "not be negative"]),
    ("bench heads", "bench.py", lambda c: ["--n_head=5"], ["n_head=5"]),
    ("bench too big for the CPU", "bench.py", lambda c: ["--device=cpu", "--batch_size=100000"],
     ["memory", "--batch_size"]),
    # data/prepare.py
    ("prepare no input", "data/prepare.py", lambda c: [f"--out_dir={c.out}"], ["--input"]),
    ("prepare input missing", "data/prepare.py", lambda c: [f"--input={c.tmp / 'absent.txt'}", f"--out_dir={c.out}"],
     ["absent.txt", "does not exist"]),
    ("prepare too little text", "data/prepare.py", lambda c: [f"--input={c.file('a.txt', 'a')}", f"--out_dir={c.out}"],
     ["0 train and 1 val tokens", "add text"]),
    ("prepare val_fraction 2", "data/prepare.py",
     lambda c: [f"--input={c.file('t.txt', TEXT)}", f"--out_dir={c.out}", "--val_fraction=2"], ["val_fraction"]),
    ("prepare tokenizer", "data/prepare.py",
     lambda c: [f"--input={c.file('t.txt', TEXT)}", f"--out_dir={c.out}", "--tokenizer=bpe"], ["tokenizer", "bpe"]),
    ("prepare no name", "data/prepare.py", lambda c: [f"--input={c.file('t.txt', TEXT)}"], ["--name"]),
    ("prepare name leaves data/", "data/prepare.py", lambda c: [f"--input={c.file('t.txt', TEXT)}", "--name=../x"],
     ["--name='../x'", "--out_dir"]),
    ("prepare binary input", "data/prepare.py",
     lambda c: [f"--input={c.file('t.txt', BINARY)}", f"--out_dir={c.out}"], ["t.txt", "UTF-8"]),
    ("prepare unwritable out_dir", "data/prepare.py",
     lambda c: [f"--input={c.file('t.txt', TEXT)}", f"--out_dir={c.file('plain', '')}/out"],
     ["cannot write", "--out_dir"]),
]


@pytest.fixture
def context(tmp_path, char_data, trained_run):
    return Context(tmp_path, char_data, trained_run)


@pytest.mark.parametrize("script, build, names",
                         [pytest.param(*case[1:4], id=case[0], marks=case[4:]) for case in CASES])
def test_a_bad_input_ends_in_one_error_line_naming_it(context, script, build, names):
    argv = build(context)
    run_before = snapshot(context.run_dir) if context.run_dir else None
    result = cli(script, argv)
    assert_one_error_line(result, *names)
    if script in ("train.py", "data/prepare.py"):
        assert not context.out.exists(), "a refused run must not create its out_dir"
    if run_before is not None:
        assert snapshot(context.run_dir) == run_before, "a refused resume must leave the run's files as they were"


@pytest.mark.parametrize("argument", ["--num_samples=-1", "--top_k=0", "--temperature=-1"])
def test_sample_settings_out_of_range_end_in_one_error_line(trained_run, argument):
    assert_one_error_line(cli("sample.py", [f"--out_dir={trained_run}", "--max_new_tokens=2", argument]),
                          argument.split("=")[0])


def test_an_out_dir_in_a_read_only_folder_is_refused(context):
    locked = context.tmp / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        try:
            (locked / "probe").write_bytes(b"")
        except PermissionError:
            pass
        else:
            pytest.skip("running as root: a read-only folder can still be written to")
        assert_one_error_line(cli("train.py", context.train(out_dir=locked / "out")), "--out_dir", "cannot be written")
        assert_one_error_line(cli("data/prepare.py", [f"--input={context.file('t.txt', 'text ' * 50)}",
                                                      f"--out_dir={locked / 'data'}"]), "cannot write", "--out_dir")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_resuming_a_finished_run_says_nothing_to_do_and_exits_0(trained_run):
    before = snapshot(trained_run)
    result = cli("train.py", ["--resume", f"--out_dir={trained_run}"])
    assert result.code == 0 and "nothing to do" in result.stdout, result
    assert snapshot(trained_run) == before


def test_a_folder_written_with_a_tilde_lies_in_the_home_folder_for_train_sample_and_compare(char_data, tmp_path,
                                                                                            monkeypatch):
    """--out_dir=~/run means $HOME/run, as a shell reads it, not a folder named ~ in the current one."""
    home, elsewhere = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    elsewhere.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(elsewhere)
    trained = cli("train.py", command_line(tiny_run_settings(char_data, "~/run")))
    assert trained.code == 0 and f"checkpoints in {home / 'run'}/" in trained.stdout, trained
    sampled = cli("sample.py", ["--out_dir=~/run", "--max_new_tokens=2", "--num_samples=1"])
    assert sampled.code == 0 and str(home / "run" / "best.pt") in sampled.stderr, sampled
    shutil.copytree(home / "run", home / "grid" / "delta" / "seed_1337")
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert compare.main(["--report", "~/grid"]) == 0
    assert (home / "grid" / "report.md").is_file() and str(home / "grid") in out.getvalue()
    assert list(elsewhere.iterdir()) == []
    refused = cli("train.py", command_line(tiny_run_settings(char_data, "~no_such_user_here/run")))
    assert_one_error_line(refused, "--out_dir=~no_such_user_here/run", "home folder", "full path")


# ----------------------------------------------------------------------------------------------
# fuzz: random command lines through the settings checks

FUZZ_KEYS = [f.name for f in dataclasses.fields(TrainConfig)] + [
    "n_layers", "lr", "batchsize", "N_LAYER", "n-layer", "", "-", "resume_", "déjà", "out dir", "d_V", "seed=1"]
FUZZ_VALUES = [
    "", "0", "1", "-1", "2", "3", "6", "64", "5e3", "1.5", "-0.0", "0.5", "1e-9", "0.999999", "nan", "NaN", "inf",
    "-inf", "1e309", str(10**30), str(-10**30), "9" * 400, "True", "false", "None", "none", "auto", "yes", "no", "on",
    "délta", "∞", "٣", "１２", "a=b", "=", "==", " 3 ", "0x10", "1_000", "\t", "a\nb", "\udcff", "add", "delta",
    "write", "linear", "sigmoid", "cpu", "cuda", "cuda:7", "mps", "tpu", "meta", "float32", "bfloat16", "float16",
    "float8", "..", "/", "out", "x.py", "😀", "2147483647", "2147483648", "[1]", "{}", "'6'",
]


def fuzz_argument(rng):
    key, value = rng.choice(FUZZ_KEYS), rng.choice(FUZZ_VALUES)
    form = rng.random()
    if form < 0.7:
        return f"--{key}={value}"
    if form < 0.8:
        return f"--{key}"                       # no '='
    if form < 0.9:
        return value                            # a stray word
    return rng.choice(["-", "---", "-"]) + f"{key}={value}"


def test_random_command_lines_give_a_checked_config_or_one_user_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                 # relative out_dirs land here, and hold no checkpoint
    rng = random.Random(1234)
    every_pair = [[f"--{key}={value}"] for key in FUZZ_KEYS for value in FUZZ_VALUES]
    accepted = refused = 0
    for argv in every_pair + [[fuzz_argument(rng) for _ in range(rng.randint(1, 6))] for _ in range(400)]:
        try:
            cfg, state = resolve_config(argv)
            check_settings(cfg)
            pick_dtype(cfg.dtype, pick_device(cfg.device))
            assert state is None
            accepted += 1
        except UserError as error:
            message = str(error)
            assert message and "\n" not in message, f"{argv!r} -> {message!r}"
            refused += 1
        except Exception as error:  # noqa: BLE001 (anything else is the bug this test looks for)
            pytest.fail(f"{argv!r} raised {type(error).__name__}: {error}")
    assert accepted > 300 and refused > 2000   # the fuzz reaches both outcomes


# ----------------------------------------------------------------------------------------------
# --help

def test_help_lists_every_setting_with_its_default_and_meaning():
    for script, cls in CONFIGS.items():
        result = cli(script, ["--help"])
        assert result.code == 0 and result.stderr == "", (script, result)
        lines = result.stdout.splitlines()
        for field in dataclasses.fields(cls):
            shown = f"--{field.name}={field.default}" if isinstance(field.default, str) else \
                f"--{field.name}={field.default!r}"
            assert any(line.strip().startswith(shown + " ") or line.strip() == shown for line in lines), \
                (script, shown)
    lines = cli("train.py", ["--help"]).stdout.splitlines()
    assert any(line.split() == ["--n_layer=6", "transformer", "blocks"] for line in lines)
    assert any(line.split()[:3] == ["--residual=delta", "add", "(x"] for line in lines)


@pytest.mark.parametrize("script", [
    "train.py", "bench.py", "data/prepare.py",
    "sample.py"])
def test_every_setting_has_a_help_comment(script):
    helps = field_help(CONFIGS[script])
    missing = [f.name for f in dataclasses.fields(CONFIGS[script]) if not helps.get(f.name)]
    assert missing == []


def run_python(*args):
    """`python ARGS` from the repository root, as a user types it."""
    done = subprocess.run([sys.executable, *args], cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True,
                          timeout=TIMEOUT)
    return Result(done.returncode, done.stdout, done.stderr)


# The scripts that prepare one known dataset: their --help must describe that job (its words before the
# settings), not data/prepare.py's, and list their own settings, each with its meaning.
DATA_SCRIPTS = {"data/shakespeare_char/prepare.py": ("--dataset=shakespeare_char", prepare_module.KnownTextConfig),
                "data/shakespeare/prepare.py": ("--dataset=shakespeare", prepare_module.KnownTextConfig),
                "data/reassign/prepare.py": ("Variable reassignment", ReassignConfig)}


@pytest.mark.parametrize("script", DATA_SCRIPTS)
def test_each_data_script_answers_help_with_its_own_job_and_every_setting_explained(script):
    words, cls = DATA_SCRIPTS[script]
    result = run_python(script, "--help")
    assert result.code == 0 and result.stderr == "", result
    job, _, settings = result.stdout.partition("settings (default shown):")
    assert words in job and "Turn your own text" not in job, result.stdout
    listed = {line.split()[0].partition("=")[0]: line.split()[1:] for line in settings.strip().splitlines()}
    assert set(listed) == {f"--{f.name}" for f in dataclasses.fields(cls)}
    assert all(listed.values()), f"a setting without its meaning: {listed}"


def test_rerunning_a_data_script_leaves_its_dataset_and_another_text_is_refused_unless_overwrite(tmp_path):
    """The README's setup line may be run again; a different dataset in the folder is never replaced silently."""
    out, text, other = tmp_path / "out", tmp_path / "input.txt", tmp_path / "other.txt"
    text.write_text(TEXT)
    other.write_text("other words\n" * 30)
    script = "data/shakespeare_char/prepare.py"
    assert run_python(script, f"--input={text}", f"--out_dir={out}").code == 0
    prepared = snapshot(out)
    again = run_python(script, f"--input={text}", f"--out_dir={out}")
    assert again.code == 0 and "already prepared" in again.stdout, again
    assert snapshot(out) == prepared
    assert_one_error_line(run_python(script, f"--input={other}", f"--out_dir={out}"), str(out), "--overwrite=True")
    assert snapshot(out) == prepared
    replaced = run_python(script, f"--input={other}", f"--out_dir={out}", "--overwrite=True")
    assert replaced.code == 0 and snapshot(out) != prepared, replaced
    assert json.loads((out / "meta.json").read_text())["source"] == str(other)


def test_data_prepare_takes_the_same_text_from_another_copy_as_the_same_dataset(tmp_path):
    out = tmp_path / "out"
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "book.txt").write_text(TEXT)
    assert cli("data/prepare.py", [f"--input={tmp_path / 'a' / 'book.txt'}", f"--out_dir={out}"]).code == 0
    prepared = snapshot(out)
    again = cli("data/prepare.py", [f"--input={tmp_path / 'b' / 'book.txt'}", f"--out_dir={out}"])
    assert again.code == 0 and "already prepared" in again.stdout and snapshot(out) == prepared, again
    other_split = [f"--input={tmp_path / 'b' / 'book.txt'}", f"--out_dir={out}", "--val_fraction=0.2"]
    assert_one_error_line(cli("data/prepare.py", other_split), str(out), "--overwrite=True")
    assert snapshot(out) == prepared


# ----------------------------------------------------------------------------------------------
# real command lines, started together in the background

EVAL_STOP_BATCHES = 10**6  # validation batches: minutes of evaluation even for the tiny model
SIGNAL_RUN = dict(max_iters=200, eval_interval=1000, log_interval=1, dropout=0.1, warmup_iters=10)


class Background:
    """Subprocesses started at once: `python ARGS` with the test environment, output captured."""

    def __init__(self):
        self.processes, self.results, self.signalled, self.ended = {}, {}, {}, {}

    def start(self, name, args, preexec_fn=None, env=SUBPROCESS_ENV, **kwargs):
        self.processes[name] = subprocess.Popen(
            [sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, preexec_fn=preexec_fn, **kwargs)

    def result(self, name):
        if name not in self.results:
            stdout, stderr = self.processes[name].communicate(timeout=TIMEOUT)
            self.results[name] = Result(self.processes[name].returncode, stdout, stderr)
            self.ended[name] = time.time()
        return self.results[name]

    def wait_for_progress(self, runs, lines, then=lambda name: None):
        """Wait until each run's log.jsonl holds `lines` training-loss entries (it is in its loop), and
        call then(name) for each as soon as it does. `runs` = {name: out_dir}."""
        waiting, deadline = dict(runs), time.time() + TIMEOUT
        while waiting and time.time() < deadline:
            for name, out_dir in list(waiting.items()):
                log = Path(out_dir) / "log.jsonl"
                if log.exists() and log.read_text().count('"train_loss"') >= lines:
                    then(name)
                    del waiting[name]
                elif self.processes[name].poll() is not None:
                    pytest.fail(f"{name} ended before it showed progress: {self.result(name)}")
            time.sleep(0.01)
        if waiting:
            pytest.fail(f"{', '.join(waiting)} showed no progress in {TIMEOUT} s")

    def stop_all(self):
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()


def limit_file_size(size):
    """preexec_fn: writes past `size` bytes fail with EFBIG (an OSError) instead of killing the process."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))
    return limit


def limit_memory():
    """preexec_fn: at most 8 GB of address space, so that a check that fails cannot fill the machine."""
    resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, resource.RLIM_INFINITY))


# In-process cases run in one subprocess under a memory limit: settings that would need terabytes.
HUGE_RUNNER = """
import contextlib, io, json, sys
sys.path.insert(0, '.')
import torch
torch.set_num_threads(1)
import train
from support.configurator import run_cli
results = []
for argv in json.loads(sys.stdin.readline()):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            run_cli(train.main, train.TrainConfig, train.__doc__, argv)
            code = 0
        except SystemExit as exit:
            code = exit.code
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""
HUGE_CASES = [("--batch_size=1000000000", ["memory", "--batch_size"]),
              ("--n_layer=100000000000", ["memory", "--n_layer"]),
              ("--n_embd=1e200", ["memory"]),
              ("--eval_iters=1000000000000", ["out of memory"]),
              ("--gradient_accumulation_steps=100000000000", ["out of memory"])]


@pytest.fixture(scope="module")
def background(char_data, trained_run, tmp_path_factory):
    """Every real command line of this file, started together; the interrupted runs already signalled."""
    tmp = tmp_path_factory.mktemp("cli")
    jobs = Background()
    try:
        jobs.start("train --help", ["train.py", "--help"])
        jobs.start("train bad key", ["train.py", "--n_layers=3", f"--out_dir={tmp / 'bad-key'}"])
        jobs.start("bench bad mode", ["bench.py", "--modes=add,foo", "--device=cpu"])
        jobs.start("bench tiny", ["bench.py", "--modes=add,delta,write:2", "--device=cpu", "--n_layer=1", "--n_head=2",
                                  "--n_embd=32", "--block_size=16", "--batch_size=2", "--vocab_size=64", "--warmup=1",
                                  "--steps=2", "--grad_clip=0"])
        jobs.start("sample no ckpt", ["sample.py", f"--out_dir={tmp / 'absent'}"])
        jobs.start("prepare --help", ["data/prepare.py", "--help"])
        jobs.start("prepare no input", ["data/prepare.py", f"--out_dir={tmp / 'data'}"])
        jobs.start("prepare val_fraction", ["data/prepare.py", f"--input={REPO / 'README.md'}",
                                            f"--out_dir={tmp / 'data'}", "--val_fraction=2"])
        # disk full: a resume whose next checkpoint cannot be written
        full = Path(shutil.copytree(trained_run, tmp / "full"))
        jobs.start("disk full", ["train.py", "--resume", f"--out_dir={full}", "--max_iters=6"],
                   preexec_fn=limit_file_size((full / "ckpt.pt").stat().st_size // 2))
        # a machine without a C++ compiler (an empty PATH): --compile=True is refused, the default says why it is off
        no_compiler = SUBPROCESS_ENV | {"PATH": ""}
        jobs.start("compile without C++", ["train.py", *command_line(tiny_run_settings(
            char_data, tmp / "no-cxx", compile=True))], env=no_compiler)
        default_compile = {k: v for k, v in tiny_run_settings(char_data, tmp / "no-cxx-default").items() if k != "compile"}
        jobs.start("default without C++", ["train.py", *command_line(default_compile)], env=no_compiler)
        # giant settings, in one process under a memory limit
        huge = [command_line(tiny_run_settings(char_data, tmp / f"huge{i}")) + [argument]
                for i, (argument, _) in enumerate(HUGE_CASES)]
        jobs.start("huge", ["-c", HUGE_RUNNER], preexec_fn=limit_memory, stdin=subprocess.PIPE)
        jobs.processes["huge"].stdin.write(json.dumps(huge) + "\n")
        jobs.processes["huge"].stdin.flush()
        # interrupted runs, and a long one that holds the lock until it is killed
        for name in ("SIGINT", "SIGTERM"):
            jobs.start(name, ["train.py", *command_line(tiny_run_settings(char_data, tmp / name, **SIGNAL_RUN))])
        jobs.start("locked", ["train.py", *command_line(tiny_run_settings(
            char_data, tmp / "locked", max_iters=100000, eval_interval=100000, log_interval=10))])
        # a disk full from the start: nothing at all can be written (the out_dir probe fails), or a
        # byte but not a log line
        jobs.start("full from the start", ["train.py", *command_line(tiny_run_settings(char_data, tmp / "full0"))],
                   preexec_fn=limit_file_size(0))
        jobs.start("full at the log", ["train.py", *command_line(tiny_run_settings(char_data, tmp / "full64"))],
                   preexec_fn=limit_file_size(64))
        # a stop during an evaluation that would take many minutes: the finished run, resumed to 6 steps
        shutil.copytree(trained_run, tmp / "eval-stop")
        jobs.start("eval stop", ["train.py", "--resume", f"--out_dir={tmp / 'eval-stop'}", "--max_iters=6",
                                 f"--eval_iters={EVAL_STOP_BATCHES}"])
        jobs.wait_for_progress({name: tmp / name for name in ("SIGINT", "SIGTERM")}, lines=3,
                               then=lambda name: jobs.processes[name].send_signal(getattr(signal, name)))
        jobs.wait_for_progress({"eval stop": tmp / "eval-stop"}, lines=6, then=lambda name: (
            jobs.processes[name].send_signal(signal.SIGTERM), jobs.signalled.update({name: time.time()})))
        yield jobs, tmp, full
    finally:
        jobs.stop_all()


def test_bench_prints_one_row_per_mode_with_throughput_relative_to_the_first_and_no_nan_memory(background):
    jobs, _, _ = background
    result = jobs.result("bench tiny")
    assert result.code == 0 and result.stderr == "", result
    table = result.stdout.split("| mode |")[1].splitlines()[2:]  # the rows after the header and its rule
    cells = [[cell.strip() for cell in row.strip("|").split("|")] for row in table]
    assert [row[0] for row in cells] == ["add d_v=1", "delta d_v=1", "write d_v=2"]
    assert [row[1] for row in cells] == ["-", "plain", "plain"]  # no fused kernel on the CPU
    assert [row[6] for row in cells] == ["n/a"] * 3               # the CPU has no per-run peak memory to show
    assert cells[0][7] == "1.00x" and all(float(row[3]) > 0 for row in cells)


def test_the_real_command_lines_end_in_one_error_line(background):
    jobs, tmp, _ = background
    assert_one_error_line(jobs.result("train bad key"), "did you mean --n_layer?")
    assert not (tmp / "bad-key").exists()
    assert_one_error_line(jobs.result("bench bad mode"), "--modes", "'foo'")
    assert_one_error_line(jobs.result("sample no ckpt"), "no checkpoint")
    assert_one_error_line(jobs.result("prepare no input"), "--input")
    assert_one_error_line(jobs.result("prepare val_fraction"), "val_fraction")
    assert not (tmp / "data").exists()
    for name in ("train --help", "prepare --help"):
        result = jobs.result(name)
        assert result.code == 0 and result.stderr == "" and "settings (default shown):" in result.stdout, result
    assert any(line.split() == ["--n_layer=6", "transformer", "blocks"]
               for line in jobs.result("train --help").stdout.splitlines())


def test_help_says_that_a_config_file_is_python_run_as_it_is(background):
    """A config file can do anything Python can (os._exit ends the run silently): --help says so."""
    jobs, _, _ = background
    usage = " ".join(jobs.result("train --help").stdout.split())
    assert "a config file is Python, run as it is: keep it to assignments" in usage


def test_without_a_cxx_compiler_compile_is_refused_in_one_line_and_the_default_says_why_it_is_off(background):
    jobs, tmp, _ = background
    assert_one_error_line(jobs.result("compile without C++"), "--compile=True", "C++ compiler", "--compile=False")
    assert not (tmp / "no-cxx").exists()
    result = jobs.result("default without C++")
    assert result.code == 0 and "Traceback" not in result.stderr, result
    assert "compile False (torch.compile on the CPU needs a C++ compiler" in result.stdout.splitlines()[0], result
    assert logged(tmp / "no-cxx-default", "val_loss")  # and it trained


def test_settings_too_large_for_the_machine_are_refused_in_one_line(background):
    jobs, tmp, _ = background
    result = jobs.result("huge")
    assert result.code == 0 and "Traceback" not in result.stderr, result
    for (argument, names), (code, stderr) in zip(HUGE_CASES, json.loads(result.stdout)):
        assert isinstance(code, str) and "\n" not in code and code.startswith("error: "), (argument, code, stderr)
        assert all(name in code for name in names), (argument, code)


def test_a_disk_full_from_the_start_ends_in_one_error_line_naming_the_folder_or_the_file(background):
    jobs, tmp, _ = background
    assert_one_error_line(jobs.result("full from the start"), f"--out_dir={tmp / 'full0'}", "cannot be written")
    assert_one_error_line(jobs.result("full at the log"), f"could not write {tmp / 'full64' / 'log.jsonl'}")
    assert not list((tmp / "full0").iterdir())


def test_a_stop_during_a_long_evaluation_is_honoured_at_once_and_resume_evaluates_that_step(background):
    """SIGTERM is followed by SIGKILL after a scheduler's grace period: the flag is read between evaluation
    batches, the step is saved without a val_loss, and --resume runs its evaluation again, logged once."""
    jobs, tmp, _ = background
    out_dir = tmp / "eval-stop"
    result = jobs.result("eval stop")
    assert result.code == 143 and "stopped at iter 6, saved" in result.stdout, result
    assert "Traceback" not in result.stdout + result.stderr, result
    assert jobs.ended["eval stop"] - jobs.signalled["eval stop"] < 60  # the whole evaluation takes many minutes
    state = torch.load(out_dir / "ckpt.pt", weights_only=True)
    assert state["iter_num"] == 6 and state["val_loss"] is None
    assert [step for step, _ in logged(out_dir, "val_loss")] == [0, 2, 4]

    resumed = cli("train.py", ["--resume", f"--out_dir={out_dir}", "--eval_iters=2"])
    assert resumed.code == 0, resumed
    assert [step for step, _ in logged(out_dir, "val_loss")] == [0, 2, 4, 6]
    assert iters_by_kind(out_dir)["done"] == [6]


def test_a_full_disk_ends_in_one_error_line_and_keeps_the_previous_checkpoint(background, trained_run):
    jobs, _, full = background
    result = jobs.result("disk full")
    assert_one_error_line(result, "could not write", "ckpt.pt", "intact")
    assert (full / "ckpt.pt").read_bytes() == (trained_run / "ckpt.pt").read_bytes()
    assert not list(full.glob("*.tmp"))


@pytest.fixture(scope="module")
def uninterrupted(char_data, tmp_path_factory):
    return run_training(tiny_run_settings(char_data, tmp_path_factory.mktemp("whole") / "run", **SIGNAL_RUN))


@pytest.mark.parametrize("name, status, resume", [("SIGINT", 130, "--resume"), ("SIGTERM", 143, "--resume=auto")])
def test_a_signal_saves_and_resume_continues_exactly(background, uninterrupted, name, status, resume):
    jobs, tmp, _ = background
    out_dir = tmp / name
    result = jobs.result(name)
    assert result.code == status, result
    assert "Traceback" not in result.stdout + result.stderr, result
    assert "--resume" in result.stdout and name in result.stderr, result
    stopped = logged(out_dir, "train_loss")[-1][0]
    assert f"stopped at iter {stopped}" in result.stdout
    assert torch.load(out_dir / "ckpt.pt", weights_only=True)["iter_num"] == stopped
    assert 3 <= stopped < SIGNAL_RUN["max_iters"]

    resumed = cli("train.py", [resume, f"--out_dir={out_dir}"])
    assert resumed.code == 0, resumed
    assert f"resuming from iter {stopped}" in resumed.stdout
    for key in ("train_loss", "val_loss"):
        assert logged(out_dir, key) == logged(uninterrupted, key)
    kinds = iters_by_kind(out_dir)
    assert kinds["run"] == [0, stopped] and kinds["done"] == [SIGNAL_RUN["max_iters"]]
    for kind, iters in kinds.items():
        assert len(iters) == len(set(iters)), f"{kind} logged twice at some iteration: {iters}"
    assert not list(out_dir.glob("*.tmp"))


def test_one_run_at_a_time_per_out_dir_and_a_killed_run_leaves_no_lock(background, char_data):
    jobs, tmp, _ = background
    out_dir = tmp / "locked"
    jobs.wait_for_progress({"locked": out_dir}, lines=1)
    settings = command_line(tiny_run_settings(char_data, out_dir, max_iters=2, eval_interval=2))
    assert_one_error_line(cli("train.py", settings), "another run is writing into", str(out_dir))

    jobs.processes["locked"].kill()                     # kill -9: no chance to clean up
    jobs.processes["locked"].wait(timeout=TIMEOUT)
    assert not (out_dir / "ckpt.pt").exists()
    fresh = cli("train.py", [*settings, "--resume=auto"])   # no ckpt.pt: --resume=auto starts afresh
    assert fresh.code == 0, fresh
    assert "resuming" not in fresh.stdout
    assert [step for step, _ in logged(out_dir, "train_loss")] == [1, 2]
