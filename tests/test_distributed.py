"""
Data-parallel training: two CPU processes under torchrun (DDP over gloo) against one process with
the same global batch. Every batch is a function of (seed, step), and the micro-batches of a step are
shared out over the processes, so the two runs train the same model.
"""

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, SUBPROCESS_ENV, command_line, logged, run_training, tiny_run_settings

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def torchrun(script, settings, *arguments):
    """Run `script` (train.py, or a file) in two CPU processes under torchrun, with `settings` as --key=value."""
    return subprocess.run([*TORCHRUN, str(script), *command_line(settings), *arguments], cwd=REPO,
                          env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def ddp_and_single_runs(char_data, tmp_path_factory):
    """out_dirs of a 2-process torchrun run and of a 1-process run: 2 micro-batches of 4 per step."""
    folder = tmp_path_factory.mktemp("distributed")
    settings = dict(max_iters=6, gradient_accumulation_steps=2, batch_size=4, eval_iters=4)
    ddp = tiny_run_settings(char_data, folder / "ddp", **settings)
    result = torchrun("train.py", ddp)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    single = run_training(tiny_run_settings(char_data, folder / "single", **settings))
    return folder / "ddp", single


def test_two_ddp_processes_reach_the_validation_losses_of_one_process(ddp_and_single_runs):
    ddp, single = (logged(run, "val_loss") for run in ddp_and_single_runs)
    assert [step for step, _ in ddp] == [step for step, _ in single] == [0, 2, 4, 6]
    assert [loss for _, loss in ddp] == pytest.approx([loss for _, loss in single], abs=1e-5)


def test_only_rank_zero_writes_the_log_and_checkpoints(ddp_and_single_runs):
    ddp, single = ddp_and_single_runs
    lines = (ddp / "log.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)) == len((single / "log.jsonl").read_text().splitlines())
    assert sorted(path.name for path in ddp.iterdir()) == [".lock", "best.pt", "ckpt.pt", "log.jsonl"]


def test_ddp_logs_the_training_loss_of_the_whole_step_not_of_rank_zero_alone(ddp_and_single_runs):
    ddp, single = (logged(run, "train_loss") for run in ddp_and_single_runs)
    assert [step for step, _ in ddp] == [step for step, _ in single]
    assert [loss for _, loss in ddp] == pytest.approx([loss for _, loss in single], abs=1e-5)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through Linux's /proc")
def test_ddp_training_shuts_its_process_group_threads_down_before_exit(char_data, tmp_path):
    """A process group that outlives training keeps gloo's worker threads until the interpreter exits,
    where one of them can abort the process (seen as an occasional exit code -6 under torchrun)."""
    script = tmp_path / "count_threads.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import train\n"
        "threads = lambda: len(os.listdir('/proc/self/task'))\n"
        "before = threads()\n"
        "train.main(sys.argv[1:])\n"
        "print(f'threads before {before} after {threads()}')\n")
    settings = tiny_run_settings(char_data, tmp_path / "run", max_iters=2, gradient_accumulation_steps=2)
    result = torchrun(script, settings)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = re.findall(r"threads before (\d+) after (\d+)", result.stdout)
    assert len(counts) == 2 and all(int(after) <= int(before) for before, after in counts), result.stdout


def test_ctrl_c_under_torchrun_stops_every_process_at_the_next_step_saves_and_resumes(char_data, tmp_path):
    """torchrun passes a Ctrl-C on to its processes, and kills them if they have not ended 30 s later:
    they must agree to stop at the next step, not at the next progress line (here none comes)."""
    settings = tiny_run_settings(char_data, tmp_path / "run", max_iters=100000, eval_interval=100000,
                                 log_interval=100000, gradient_accumulation_steps=2)
    process = subprocess.Popen([*TORCHRUN, "train.py", *command_line(settings)], cwd=REPO, env=SUBPROCESS_ENV,
                               text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 120
        log = tmp_path / "run" / "log.jsonl"
        while not (log.exists() and logged(log.parent, "train_loss")) and time.time() < deadline:  # first step
            time.sleep(0.2)
        time.sleep(1.0)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    stopped = int(re.search(r"stopped at iter (\d+), saved", stdout).group(1))
    assert stderr.count("SIGINT: stopping after this step") == 2 and "KeyboardInterrupt" not in stderr, stderr
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["iter_num"] == stopped > 1

    resume = dict(settings, max_iters=stopped + 2, log_interval=1)
    resumed = torchrun("train.py", resume, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from iter {stopped}" in resumed.stdout
    assert [step for step, _ in logged(tmp_path / "run", "train_loss")][-2:] == [stopped + 1, stopped + 2]
