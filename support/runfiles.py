"""
A training run's folder, its reports and the signals that stop it: a check that out_dir can be written
before any heavy work, a lock so that two runs never write into one folder, log.jsonl, the lines the
run prints (`Run`), and Ctrl-C / SIGTERM turned into a stop at the next step or evaluation batch.
"""

import dataclasses
import errno
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from support.checkpoint import save_run
from support.configurator import TrainingError
from support.device import device_name, peak_tflops
from support.readback import read_jsonl

FULL_DISK = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))  # a full disk, or a full quota


def write_trouble(path, error):
    """One line for a write that failed: which file or folder, why, and what to do."""
    fix = "free some space on its disk" if error.errno in FULL_DISK else "fix the folder"
    return f"could not write {path} ({error.strerror or error}); {fix}, or choose another --out_dir"


def claim_out_dir(out_dir):
    """Create out_dir, prove that a byte can be written there (a full disk fails here, before any heavy
    work, and not at the first log line), and lock it for the life of the process."""
    probe = Path(out_dir) / ".write-test"
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        try:
            with open(probe, "wb") as f:
                f.write(b"x")
                f.flush()
                os.fsync(f.fileno())
        finally:
            probe.unlink(missing_ok=True)
    except OSError as error:
        fix = "free some space on its disk" if error.errno in FULL_DISK else "choose a folder you can write to"
        raise TrainingError(f"--out_dir={out_dir} cannot be written ({error.strerror or error}); {fix}") from None
    return lock_out_dir(out_dir)


def lock_out_dir(out_dir):
    """Hold an exclusive lock on out_dir/.lock for the life of the process, so that two runs never
    write into one folder. The operating system drops it when the process ends, even by a crash."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock, and no protection against a second run
        return None
    handle = open(Path(out_dir) / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise TrainingError(f"another run is writing into {out_dir} right now; wait for it to finish, or "
                            "choose another --out_dir") from None
    return handle


class RunLog:
    """out_dir/log.jsonl: one JSON object per line. Made before any heavy work, it claims out_dir (see
    claim_out_dir; the lock is held as long as the RunLog) and reads the lines a resumed run keeps: those
    up to the step it resumes from, so that no step is ever logged twice (a damaged file is refused here).
    The file is rewritten only by `start`, once every check has passed; a fresh run starts a fresh one."""

    def __init__(self, out_dir, resume_step=None):
        self.lock = claim_out_dir(out_dir)
        self.path, self.file, self.kept = Path(out_dir) / "log.jsonl", None, []
        if resume_step is not None and self.path.exists():
            fix = "move it aside and resume again (the checkpoint does not depend on it; a new log.jsonl starts)"
            for entry in read_jsonl(self.path, fix):
                step = entry.get("iter", 0)
                if isinstance(step, int) and step <= resume_step and not entry.get("done"):
                    self.kept.append(entry)

    def start(self):
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text("".join(json.dumps(entry) + "\n" for entry in self.kept), encoding="utf-8")
            os.replace(tmp, self.path)
            # unbuffered: a write that fails (a full disk) leaves nothing behind to fail again at exit
            self.file = open(self.path, "ab", buffering=0)
        except OSError as error:
            tmp.unlink(missing_ok=True)
            raise TrainingError(write_trouble(self.path, error)) from None

    def write(self, **entry):
        try:
            self.file.write((json.dumps(entry) + "\n").encode("utf-8"))
        except OSError as error:
            raise TrainingError(write_trouble(self.path, error) + "; ckpt.pt, if any, is intact: --resume "
                                "continues from it") from None

    def close(self):
        self.file.close()


class StopRequest:
    """While active, SIGINT (Ctrl-C) and SIGTERM (what a scheduler sends before preemption) set a flag;
    the loop finishes its step (or evaluation batch), saves ckpt.pt and exits. A second Ctrl-C stops at once.
    Under torchrun, which passes a Ctrl-C on to its processes and kills them 30 s later, every process
    must stop at the same step: `requested` compares their flags over `group`, a group of CPU (gloo)
    connections, so that comparing them after every step never makes the CPU wait for the GPU."""

    def __init__(self, group=None):
        self.group = group

    def __enter__(self):
        self.signal = None
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving ckpt.pt "
              "(Ctrl-C again quits without saving)", file=sys.stderr, flush=True)

    def requested(self):
        """Whether to stop now: whether this process, or under torchrun any, got a signal. Under torchrun
        every process must ask at the same points, or they wait for each other forever."""
        if self.group is None:
            return self.signal is not None
        flag = torch.tensor([float(self.signal is not None)])
        dist.all_reduce(flag, group=self.group)
        return flag.item() > 0

    @property
    def status(self):
        """The exit status of a process ended by this signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + (self.signal or signal.SIGTERM)


def duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Run:
    """A run's bookkeeping between steps, for train.py's loop: the best validation loss, the training time
    over all sessions, the timing of the steps; the lines it prints and writes into log.jsonl (the first
    process only); its checkpoints; and how it stops."""

    def __init__(self, cfg, procs, model, optimizer, scaler, meta, dtype, log, state):
        self.cfg, self.procs, self.model, self.optimizer, self.scaler = cfg, procs, model, optimizer, scaler
        self.meta, self.dtype, self.log = meta, dtype, log  # log: a RunLog on the first process, else None
        self.start_step = state["iter_num"] if state is not None else 0
        self.best_val, self.elapsed_before = (state["best_val_loss"], state["elapsed_s"]) if state else (float("inf"), 0.0)
        self.t_start = time.time()
        self.lap(self.start_step)

    def say(self, text):
        if self.procs.master:
            print(text)

    def record(self, **entry):
        if self.procs.master:
            self.log.write(**entry)

    def elapsed(self):
        """Training seconds over all sessions of the run."""
        return self.elapsed_before + time.time() - self.t_start

    def lap(self, step):
        """Start timing the steps after `step` (evaluation time is not training time)."""
        self.t_last, self.step_last = time.time(), step

    def save(self, step, val_loss=None):
        if self.procs.master:
            save_run(self.cfg.out_dir, self.cfg, self.model, self.optimizer, self.scaler, self.meta, step,
                     self.best_val, self.elapsed(), val_loss)

    def describe(self, plan, micro_steps, train_tokens, val_tokens, additive_params):
        """The run's first lines: the device, the model against the additive one, the data."""
        cfg, procs, model, extra = self.cfg, self.procs, self.model, self.model.num_params() - additive_params
        self.say(f"device {procs.device} ({device_name(procs.device)}) x {procs.world} process(es), dtype {self.dtype}, "
                 f"compile {plan.on}{plan.why}")
        self.say(f"model: residual={model.config.residual} d_v={model.config.d_v}, {model.num_params() / 1e6:.2f}M "
                 f"parameters ({extra:+,} = {100 * extra / additive_params:+.2f}% vs additive)")
        self.say(f"data: {cfg.dataset}, {train_tokens:,} train / {val_tokens:,} val tokens; {self.tokens_per_step():,} "
                 f"tokens per step ({procs.world} x {micro_steps} micro-batches of {cfg.batch_size} x {cfg.block_size})")
        if self.start_step:
            self.say(f"resuming from iter {self.start_step} of {cfg.max_iters} (best val loss so far {self.best_val:.4f})")
        if procs.master:
            self.log.start()
        self.record(iter=self.start_step, run={"config": dataclasses.asdict(cfg), "device": device_name(procs.device),
                                               "world": procs.world, "dtype": self.dtype, "compile": plan.on,
                                               "torch": torch.__version__})

    def tokens_per_step(self):
        return self.cfg.batch_size * self.cfg.block_size * self.cfg.gradient_accumulation_steps

    def evaluation(self, step, scores, gates):
        """Print and record an evaluation with the gates of every sublayer; returns its validation loss."""
        val_loss = scores["val_loss"]
        self.check_finite("validation", val_loss, step)
        self.best_val = min(self.best_val, val_loss)
        accuracy = f", answer accuracy {scores['answer_accuracy']:.3f}" if "answer_accuracy" in scores else ""
        betas = (" | beta by layer (attn/mlp): " + " ".join(f"{a:.2f}/{m:.2f}" for a, m in gates["beta_mean"])
                 if "beta_mean" in gates else "")  # no gates in add mode
        self.say(f"iter {step}: val loss {val_loss:.4f} (best {self.best_val:.4f}){accuracy}{betas}")
        self.record(iter=step, **scores, best_val_loss=self.best_val, diagnostics=gates,
                    elapsed_s=round(self.elapsed(), 2))
        return val_loss

    def progress(self, step, loss, lr):
        """Print and record the progress line after `step` steps: loss (a tensor on the device, this process's
        share of the step), speed, MFU, time left."""
        if self.procs.distributed:  # the step's loss over every process's micro-batches, not rank 0's alone
            dist.all_reduce(loss)
            loss /= self.procs.world
        train_loss = loss.item()  # waits for the GPU, so the timing below is true
        self.check_finite("training", train_loss, step)
        cfg, now = self.cfg, time.time()
        ms_per_step = 1000 * (now - self.t_last) / (step - self.step_last)
        self.lap(step)
        tokens_per_sec = 1000 * self.tokens_per_step() / ms_per_step
        peak = peak_tflops(self.procs.device, cfg.gpu_peak_tflops) if self.dtype != "float32" else None
        mfu = self.model.flops_per_token() * tokens_per_sec / (peak * 1e12 * self.procs.world) if peak else None
        eta = duration(ms_per_step / 1000 * (cfg.max_iters - step))
        self.say(f"iter {step}/{cfg.max_iters} | loss {train_loss:.4f} | lr {lr:.2e} | {ms_per_step:.1f} ms | "
                 f"{tokens_per_sec / 1000:,.1f}k tok/s" + (f" | MFU {100 * mfu:.1f}%" if mfu else "") + f" | ETA {eta}")
        self.record(iter=step, train_loss=train_loss, lr=lr, ms_per_iter=round(ms_per_step, 3),
                    tokens_per_sec=round(tokens_per_sec), mfu=mfu, elapsed_s=round(self.elapsed(), 2))

    def check_finite(self, which, loss, step):
        if math.isfinite(loss):
            return
        ckpt = Path(self.cfg.out_dir) / "ckpt.pt"
        kept = (f"{ckpt} still holds the last good state (--resume continues from it)" if ckpt.exists()
                else "no checkpoint had been written yet")
        raise TrainingError(f"{which} loss is {loss} at iter {step}: training diverged and stopped; {kept}. "
                            "Try a lower --learning_rate.")

    def stop(self, step, stop, val_loss=None):
        """A stop was requested at `step`: save ckpt.pt (if a step was trained) and exit with the signal's status.
        `val_loss`: this step's, if it was evaluated; without it --resume evaluates the step again."""
        if step > self.start_step:
            self.save(step, val_loss)
            self.say(f"stopped at iter {step}, saved in {self.cfg.out_dir}/ckpt.pt; continue with the same command "
                     "and --resume")
        else:
            self.say(f"stopped at iter {step}, before any new step: nothing new to save")
        raise SystemExit(stop.status)

    def finish(self, val_loss):
        self.record(iter=self.cfg.max_iters, done=True, best_val_loss=self.best_val, final_val_loss=val_loss,
                    elapsed_s=round(self.elapsed(), 2))
        self.say(f"done: best val loss {self.best_val:.4f}, {duration(self.elapsed())} (checkpoints in "
                 f"{self.cfg.out_dir}/)")
        if self.procs.master:
            self.log.close()
        return self.best_val
