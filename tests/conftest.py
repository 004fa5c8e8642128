"""
Shared pieces of the test suite: tiny model and training settings, a tiny character dataset, and one
finished tiny training run that the checkpoint, resume and sampling tests start from.

Everything runs on the CPU in seconds: 2 layers, 2 heads, width 32, context 16, batches of 4.
"""

import json
import os
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"

# The GPT-2 tokenizer files, offline: tiktoken reads them from this cache (see shared/data/README.md).
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED_DATA / "tiktoken").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED_DATA / "tiktoken")

sys.path.insert(0, str(REPO))

# Without a GPU, tests/test_kernels.py runs the fused kernel on the CPU through Triton's interpreter.
# Triton reads this switch once, when it is first imported, so it is set here, before anything imports it;
# the subprocesses the tests start do not get it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from data.prepare import prepare  # noqa: E402
from ddl_gpt import GPT, GPTConfig  # noqa: E402
from support.tokenizer import GPT2Tokenizer, TokenizerError  # noqa: E402
from train import TrainConfig, train  # noqa: E402

# Models this small run several times faster on one thread than on two competing ones; the
# subprocesses the tests start (sample.py, torchrun) get the same setting through the environment.
torch.set_num_threads(1)
SUBPROCESS_ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"OMP_NUM_THREADS": "1"}

TINY_MODEL = dict(block_size=16, vocab_size=65, n_layer=2, n_head=2, n_embd=32)

# The residual modes every model-level property is checked in.
MODES = {
    "add": dict(residual="add"),
    "delta": dict(residual="delta"),
    "write": dict(residual="write"),
    "delta_dv4": dict(residual="delta", d_v=4),
}


def tiny_gpt(seed=0, **overrides):
    """A freshly initialized tiny GPT; `overrides` are GPTConfig fields."""
    torch.manual_seed(seed)
    return GPT(GPTConfig(**TINY_MODEL | overrides))


class CountedKernel:
    """A Triton kernel that counts its launches, launched as before: kernel[grid](...)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def random_tokens(batch=2, length=TINY_MODEL["block_size"], seed=0):
    return torch.randint(TINY_MODEL["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def all_logits(model, idx):
    """Logits at every position (B, T, vocab): forward returns them only when given targets."""
    return model(idx, idx)[0]


@torch.no_grad()
def perturb(model, seed=1):
    """Move every parameter away from its init, so that identity-started pieces (the EC convolution,
    the compressor mixes, unit gains) are as general as after training and every map is distinct."""
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def tiny_text(lines=200, seed=0):
    """A few kilobytes of deterministic English-like text (about 35 distinct characters)."""
    words = ("the a delta rule writes reads stream residual gate value key model token learns "
             "overfits small text of and to in").split()
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))).capitalize() + "."
                     for _ in range(lines)) + "\n"


def tiny_run_settings(data, out_dir, **overrides):
    """TrainConfig fields of a tiny CPU run on `data` (a dict with data_dir and dataset) into out_dir."""
    return dict(
        data, out_dir=str(out_dir),
        n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4,
        max_iters=4, warmup_iters=1, learning_rate=1e-2, min_lr=1e-3,
        eval_interval=2, eval_iters=2, log_interval=1,
        device="cpu", dtype="float32", compile=False,
    ) | overrides


def command_line(settings):
    """The same settings as --key=value arguments for train.py."""
    return [f"--{key}={value}" for key, value in settings.items()]


def run_training(settings):
    """Train in this process; returns the run's out_dir."""
    train(TrainConfig(**settings))
    return Path(settings["out_dir"])


def logged(out_dir, key):
    """[(iter, value)] of every log.jsonl entry of out_dir that has `key` (train_loss, val_loss, ...)."""
    entries = [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]
    return [(entry["iter"], entry[key]) for entry in entries if key in entry]


@pytest.fixture(scope="session")
def char_data(tmp_path_factory):
    """A prepared character-level dataset: data_dir and dataset, as TrainConfig wants them."""
    folder = tmp_path_factory.mktemp("data")
    (folder / "input.txt").write_text(tiny_text(), encoding="utf-8")
    prepare(input=str(folder / "input.txt"), out_dir=str(folder / "tiny_char"))
    return dict(data_dir=str(folder), dataset="tiny_char")


@pytest.fixture(scope="session")
def trained_run(char_data, tmp_path_factory):
    """out_dir of a finished 4-iteration run (evaluated at 0, 2, 4): ckpt.pt, best.pt, log.jsonl.
    Read it only; tests that change files work on `trained_run_copy`."""
    return run_training(tiny_run_settings(char_data, tmp_path_factory.mktemp("runs") / "trained"))


@pytest.fixture
def trained_run_copy(trained_run, tmp_path):
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    try:
        return GPT2Tokenizer()
    except TokenizerError as error:
        pytest.skip(f"the GPT-2 tokenizer cannot be loaded here: {error}")
