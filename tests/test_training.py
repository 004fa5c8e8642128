"""
train.py on a tiny character dataset: the learning-rate schedule, gradient accumulation, checkpoints
(round trip, exact resume, atomic writes, divergence), and the errors a user can act on.
"""

from pathlib import Path

import pytest
import torch

import train as train_module
from support.configurator import ConfigError, parse_overrides
from conftest import logged, run_training, tiny_run_settings
from support import checkpoint
from support.checkpoint import CheckpointError, model_from_checkpoint
from support.configurator import TrainingError
from support.dataset import TokenFile
from train import TrainConfig, learning_rate, resolve_config, step_seed, train


def resume(out_dir, *arguments):
    """Continue the run in out_dir, as `python train.py --resume --out_dir=... ARGUMENTS` would."""
    cfg, state = resolve_config(["--resume", f"--out_dir={out_dir}", *arguments])
    return train(cfg, state)


def file_bytes(out_dir):
    return {name: (Path(out_dir) / name).read_bytes() for name in ("ckpt.pt", "best.pt")}


# --- learning rate -------------------------------------------------------------------------------

def test_learning_rate_warms_up_linearly_then_decays_by_a_cosine_to_min_lr():
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=120, lr_decay_iters=90)
    lr = [learning_rate(cfg, step) for step in range(cfg.max_iters + 1)]
    warmup, decay, after = lr[:11], lr[10:91], lr[91:]
    assert 0 < warmup[0] and all(a < b for a, b in zip(warmup, warmup[1:]))
    assert warmup[1] - warmup[0] == pytest.approx(warmup[-1] - warmup[-2])   # linear
    assert lr[cfg.warmup_iters] == pytest.approx(cfg.learning_rate)
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert lr[50] == pytest.approx((cfg.learning_rate + cfg.min_lr) / 2)      # cosine: halfway at mid-decay
    assert lr[90] == pytest.approx(cfg.min_lr) and all(x == cfg.min_lr for x in after)


def test_learning_rate_decays_over_the_whole_run_when_lr_decay_iters_is_unset():
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=100, lr_decay_iters=None)
    assert learning_rate(cfg, 99) > cfg.min_lr
    assert learning_rate(cfg, 100) == pytest.approx(cfg.min_lr)


# --- gradient accumulation -----------------------------------------------------------------------

def test_gradient_accumulation_is_equivalent_to_one_larger_batch(char_data, tmp_path):
    # The validation batches are (eval_iters, batch_size) windows drawn from one seed, so 4 batches of
    # 4 and 2 batches of 8 are the same 16 windows; with equal-size batches the mean losses agree.
    accumulated = tiny_run_settings(char_data, tmp_path / "accumulated", max_iters=6,
                                    gradient_accumulation_steps=2, batch_size=4, eval_iters=4)
    larger = tiny_run_settings(char_data, tmp_path / "larger", max_iters=6,
                               gradient_accumulation_steps=1, batch_size=8, eval_iters=2)
    cfg, folder = TrainConfig(**accumulated), Path(char_data["data_dir"]) / char_data["dataset"]
    train_data, val_data = TokenFile(folder / "train.bin", 16), TokenFile(folder / "val.bin", 16)
    for step in range(6):   # both runs draw the same training windows at every step ...
        seed = step_seed(cfg, step, 0)
        assert torch.equal(train_data.offsets((2, 4), seed).flatten(), train_data.offsets((1, 8), seed).flatten())
    assert torch.equal(val_data.offsets((4, 4), cfg.seed).flatten(), val_data.offsets((2, 8), cfg.seed).flatten())

    runs = [run_training(accumulated), run_training(larger)]   # ... so they log the same losses
    for key in ("train_loss", "val_loss"):
        (iters_a, losses_a), (iters_b, losses_b) = (zip(*logged(run, key)) for run in runs)
        assert iters_a == iters_b
        assert losses_a == pytest.approx(losses_b, abs=1e-5)


# --- checkpoints ---------------------------------------------------------------------------------

def test_checkpoints_load_with_weights_only_and_give_the_trained_models_logits(char_data, tmp_path, monkeypatch):
    built = []

    class RecordedGPT(train_module.GPT):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(train_module, "GPT", RecordedGPT)
    out_dir = run_training(tiny_run_settings(char_data, tmp_path / "run"))
    trained = built[0].eval()   # the model that trained (train.py then builds a meta-device copy to count)

    idx = torch.randint(trained.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trained(idx, idx)[0]
        for name in ("ckpt.pt", "best.pt"):
            state = torch.load(out_dir / name, weights_only=True)
            assert state["iter_num"] == 4            # the last evaluation, which was also the best
            assert state["val_loss"] == min(loss for _, loss in logged(out_dir, "val_loss"))
            assert torch.equal(model_from_checkpoint(state).eval()(idx, idx)[0], expected)


def test_resume_continues_exactly_as_an_uninterrupted_run(char_data, tmp_path):
    # lr_decay_iters is fixed: by default the cosine spans max_iters, which the two halves do not share.
    settings = dict(max_iters=8, lr_decay_iters=8, dropout=0.1)
    whole = run_training(tiny_run_settings(char_data, tmp_path / "whole", **settings))
    halves = run_training(tiny_run_settings(char_data, tmp_path / "halves", **settings | dict(max_iters=4)))
    resume(halves, "--max_iters=8")
    for key in ("train_loss", "val_loss"):
        assert logged(halves, key) == logged(whole, key)
    assert [step for step, _ in logged(whole, "train_loss")] == list(range(1, 9))


def truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


@pytest.mark.parametrize("damage, message", [
    (truncate, "corrupt"),
    (lambda path: torch.save({"x": 1}, path), "not a ddl-gpt checkpoint"),
], ids=["truncated", "foreign"])
def test_an_unreadable_checkpoint_is_refused_with_a_clear_message(trained_run_copy, damage, message):
    path = trained_run_copy / "ckpt.pt"
    damage(path)
    with pytest.raises(CheckpointError, match=message) as error:
        resolve_config(["--resume", f"--out_dir={trained_run_copy}"])
    assert str(path) in str(error.value)


def test_a_failed_checkpoint_write_leaves_the_previous_checkpoints_intact(trained_run_copy, monkeypatch):
    before = file_bytes(trained_run_copy)

    def save_half_then_fail(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.torch, "save", save_half_then_fail)
    with pytest.raises(CheckpointError, match="could not write .*intact"):
        resume(trained_run_copy, "--max_iters=6")      # evaluates, then saves, at iteration 6
    assert file_bytes(trained_run_copy) == before


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(trained_run_copy):
    before = file_bytes(trained_run_copy)
    with pytest.raises(TrainingError, match=r"(nan|inf).*diverged"):
        resume(trained_run_copy, "--max_iters=8", "--learning_rate=1e30", "--warmup_iters=0")
    assert file_bytes(trained_run_copy) == before


# --- settings and the errors a user can act on ---------------------------------------------------

def test_an_unknown_setting_names_the_closest_valid_key():
    with pytest.raises(ConfigError, match="did you mean --n_layer\\?"):
        resolve_config(["--n_layers=3"])


def test_command_line_values_are_converted_to_the_field_types():
    overrides = parse_overrides(TrainConfig, ["--learning_rate=1", "--compile=false", "--max_iters=5e3",
                                              "--resume", "--lr_decay_iters=None"])
    assert overrides == dict(learning_rate=1.0, compile=False, max_iters=5000, resume="yes", lr_decay_iters=None)
    assert type(overrides["learning_rate"]) is float and type(overrides["max_iters"]) is int


@pytest.mark.parametrize("argument", ["--max_iters=abc", "--max_iters=1.5", "--max_iters=inf",
                                      "--compile=maybe", "--learning_rate=fast"])
def test_a_value_that_does_not_fit_the_field_type_is_rejected(argument):
    with pytest.raises(ConfigError, match=argument.split("=")[0]):
        parse_overrides(TrainConfig, [argument])


@pytest.mark.parametrize("file_first", [True, False], ids=["file_first", "file_last"])
def test_command_line_values_win_over_a_config_file_wherever_they_stand(tmp_path, file_first):
    config_file = tmp_path / "config.py"
    config_file.write_text("n_layer = 5\ndropout = 0.3\n")
    arguments = [f"--out_dir={tmp_path / 'out'}", "--n_layer=3"]
    cfg, _ = resolve_config([str(config_file), *arguments] if file_first else [*arguments, str(config_file)])
    assert (cfg.n_layer, cfg.dropout) == (3, 0.3)


def test_resume_refuses_a_different_model_setting(trained_run):
    with pytest.raises(TrainingError, match="different model.*residual"):
        resolve_config(["--resume", f"--out_dir={trained_run}", "--residual=add"])


def test_starting_afresh_in_a_folder_that_holds_a_checkpoint_is_refused(trained_run):
    with pytest.raises(TrainingError, match="--resume"):
        resolve_config([f"--out_dir={trained_run}"])


def test_a_missing_dataset_names_the_prepare_command(tmp_path):
    cfg = TrainConfig(**tiny_run_settings(dict(data_dir=str(tmp_path), dataset="absent"), tmp_path / "out"))
    with pytest.raises(TrainingError, match="not prepared") as error:
        train(cfg)
    message = str(error.value)
    assert "data/prepare.py" in message and f"--out_dir={tmp_path / 'absent'}" in message


def test_a_missing_dataset_in_the_default_data_folder_is_named_by_its_dataset_name(tmp_path):
    cfg = TrainConfig(**tiny_run_settings(dict(data_dir="data", dataset="surely_absent"), tmp_path / "out"))
    with pytest.raises(TrainingError, match="--name=surely_absent"):
        train(cfg)


# --- diagnostics ----------------------------------------------------------------------------------

def test_each_evaluation_logs_the_gates_of_every_layer_and_sublayer(trained_run):
    """The tiny run is a 2-layer delta model: per layer an [attention, MLP] pair of each gate statistic."""
    evaluations = [entry for _, entry in logged(trained_run, "diagnostics")]
    assert len(evaluations) == 3                                     # iterations 0, 2 and 4
    for diagnostics in evaluations:
        assert len(diagnostics["state_rms"]) == 2 and all(rms > 0 for rms in diagnostics["state_rms"])
        for key in ("beta_mean", "beta_std", "rewrite"):
            assert [len(pair) for pair in diagnostics[key]] == [2, 2]
        assert all(0 < beta < 2 for pair in diagnostics["beta_mean"] for beta in pair)


def test_cuda_graphs_with_several_micro_batches_per_step_are_refused_before_training(char_data, tmp_path):
    settings = tiny_run_settings(char_data, tmp_path / "run", compile_mode="reduce-overhead",
                                 gradient_accumulation_steps=2)
    with pytest.raises(ConfigError, match="compile_mode=reduce-overhead.*micro-batches"):
        run_training(settings)
    assert not (tmp_path / "run").exists()
