"""
Train a ddl-gpt model on one GPU, an Apple-silicon GPU (MPS), the CPU, or several GPUs via torchrun.

    python train.py config/shakespeare_char.py                      # device detected: cuda > mps > cpu
    python train.py config/shakespeare_char.py --residual=add       # the additive baseline
    python train.py config/shakespeare_char.py --resume             # continue from out_dir/ckpt.pt
    python train.py config/shakespeare_char.py --resume=auto        # continue if ckpt.pt exists, else start
    torchrun --standalone --nproc_per_node=4 train.py config/shakespeare_char.py   # DDP, 4 GPUs

Settings are the TrainConfig fields below; a config file and then --key=value arguments override them
(`python train.py --help` lists them; a config file is Python, run as it is: keep it to assignments).
out_dir receives ckpt.pt (the latest state, for --resume), best.pt (the weights with the lowest
validation loss, for sample.py) and log.jsonl (one JSON object per progress or evaluation line).
Ctrl-C or SIGTERM finishes the current step (or evaluation batch), saves ckpt.pt and exits; --resume
then continues exactly where the run stopped.

This file reads in running order: the settings, the data (schedule, seeds, batches), the model and
its optimizer, `train_step` (one optimizer step), `evaluate`, and `run` (the loop that calls them).
The checks, checkpoints, run files and signals it calls on are in support/.
Every random draw is a function of (seed, iteration, rank): the batch of step i is the same whether
the run was interrupted or not, and the same on one GPU as split over several.
"""

import dataclasses
import math
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from ddl_gpt import GPT, gate_statistics
from support.checkpoint import check_same_model, check_same_tokens, model_from_checkpoint, resume_state
from support.configurator import FALSE, TRUE, ConfigError, fields_of, parse_overrides, run_cli
from support.dataset import open_dataset
from support.device import autocast_for, check_memory, pick_dtype, start_processes
from support.runfiles import Run, RunLog, StopRequest
from support.settings import check_settings, model_config
from support.speed import check_fused, compile_plan, use_kernels

VALIDATION_SEED = 1337  # picks the fixed validation windows, the same for every run


@dataclasses.dataclass
class TrainConfig:
    # data and output
    dataset: str = "shakespeare_char"  # a folder of data_dir holding train.bin, val.bin and meta.json
    data_dir: str = "data"             # where datasets live
    out_dir: str = "out"               # checkpoints and log.jsonl go here; one run at a time
    resume: str = dataclasses.field(default="no", metadata={"bare": "yes"})  # no: start fresh; yes (or a bare --resume): continue out_dir/ckpt.pt; auto: continue if it exists, else start
    # model: see GPTConfig in ddl_gpt.py (the vocabulary size comes from the dataset)
    n_layer: int = 6                   # transformer blocks
    n_head: int = 6                    # attention heads; must divide n_embd into heads of even size
    n_embd: int = 384                  # width d of the residual stream
    block_size: int = 256              # context length in tokens
    dropout: float = 0.0               # on attention weights and on every write into the residual state
    dropout_at: str = "write"          # delta/write modes: drop elements of the whole write, or of h (turns k)
    residual: str = "delta"            # add (x + F(x)), delta (Deep Delta Learning) or write (no erase term)
    d_v: int = 1                       # value channels of the state; 4 is the paper's expanded state
    expand_conv: bool = True           # d_v > 1: start the state with a causal token convolution (EC)
    beta_init: float = 1.0             # the gate at initialization, in (0, 2); 1 starts at overwrite
    value_map: str = "sigmoid"         # v = 4*sigmoid(W x + b) (authors' code) or linear: v = W c + b (paper)
    state_dtype: str = "float32"       # the residual state's storage: float32, or bfloat16 (less memory traffic)
    # optimization
    batch_size: int = 64               # sequences per micro-batch, in each process
    gradient_accumulation_steps: int = 1  # micro-batches per step, over all processes together
    max_iters: int = 5000              # optimizer steps
    learning_rate: float = 1e-3        # peak learning rate, reached after warmup
    min_lr: float = 1e-4               # where the cosine decay ends
    warmup_iters: int = 100            # steps of linear warmup
    lr_decay_iters: int | None = None  # where the cosine ends; None: at max_iters
    weight_decay: float = 0.1          # AdamW decay on weight matrices only
    beta1: float = 0.9                 # AdamW first-moment decay
    beta2: float = 0.95                # AdamW second-moment decay
    grad_clip: float = 1.0             # max gradient norm; 0 turns clipping off
    # evaluation and logging
    eval_interval: int = 250           # steps between evaluations (and checkpoints)
    eval_iters: int = 20               # validation batches: the same fixed batches at every evaluation
    log_interval: int = 10             # steps between progress lines
    # system
    device: str = "auto"               # auto picks cuda > mps > cpu; or name one (cuda:1, cpu)
    dtype: str = "auto"                # auto: bfloat16 on GPUs that have it, float16 on older CUDA GPUs, else float32
    compile: bool | None = None        # torch.compile; None: on CUDA where Triton exists, off elsewhere
    compile_mode: str = "auto"         # torch.compile mode; auto: reduce-overhead (CUDA graphs) on one GPU, else default
    fused: bool | None = None          # delta writes in one fused GPU kernel (ddl_kernels.py); None: wherever it runs
    ddp_bucket_mb: int = 25            # under torchrun: gradients are averaged in buckets of this size while backward runs
    seed: int = 1337                   # every random draw of the run follows from it
    gpu_peak_tflops: float | None = None  # the GPU's peak, for MFU on a GPU missing from support/device.py's table


# ----------------------------------------------------------------------------------------------
# settings: every one checked before anything heavy happens (support/settings.py)

def resolve_config(argv):
    """The run's TrainConfig, checked, and the checkpoint to resume from (or None)."""
    overrides = parse_overrides(TrainConfig, argv)
    if "resume" in overrides:  # --resume=true and --resume=false read as yes and no
        word = overrides["resume"].lower()
        overrides["resume"] = "yes" if word in TRUE else "no" if word in FALSE else word
    cfg = TrainConfig(**overrides)
    check_settings(cfg)
    state = resume_state(cfg.out_dir, cfg.resume)
    if state is None:
        return cfg, None
    check_same_model(state, overrides)  # a resumed run may change max_iters, but not the model
    cfg = TrainConfig(**(fields_of(TrainConfig, state["train_config"]) | overrides | {"resume": cfg.resume}))
    check_settings(cfg)
    return cfg, state


# ----------------------------------------------------------------------------------------------
# data: the learning-rate schedule, and batches drawn from seeded generators (support/dataset.py)

def learning_rate(cfg, step):
    """Linear warmup to learning_rate, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    if step >= decay_iters:
        return cfg.min_lr
    progress = (step - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def step_seed(cfg, step, stream):
    """A seed for one random stream (0: batches, 1 + rank: dropout) at one step of one run. The odd
    multipliers keep (seed, step, stream) triples from colliding for any realistic run length."""
    return (cfg.seed * 1_000_003 + step) * 1_009 + stream


def train_batches(cfg, train_data, step, procs, micro_steps):
    """This process's share of step `step`'s micro-batches: a list of (x, y), each (batch_size, block_size)."""
    offsets = train_data.offsets((cfg.gradient_accumulation_steps, cfg.batch_size), step_seed(cfg, step, 0))
    return [train_data.batch(offsets[procs.rank * micro_steps + i], procs.device) for i in range(micro_steps)]


# ----------------------------------------------------------------------------------------------
# the model and its optimizer

def build_model(cfg, meta, state, device, dtype):
    """The model (the checkpoint's, when resuming), its AdamW optimizer, and the loss scaler of fp16."""
    if state is not None:
        model = model_from_checkpoint(state)
    else:
        # GPT-2's 50,257 tokens are padded to 50,304 (a multiple of 64) for faster matmuls; the
        # padded ids never occur as targets. Character vocabularies are left as they are.
        vocab = meta["vocab_size"] if meta["tokenizer"] == "char" else 64 * math.ceil(meta["vocab_size"] / 64)
        torch.manual_seed(cfg.seed)
        model = GPT(model_config(cfg, vocab_size=vocab))
    model.to(device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
    return model, optimizer, scaler


def speed_up(model, cfg, plan, procs, log):
    """The model as train_step calls it: the delta writes' code chosen, compiled as `plan` says, and
    under torchrun wrapped in DDP, which averages gradients in buckets while backward runs."""
    log(use_kernels(model, cfg.fused, plan.on)[1])
    if plan.on:
        log(f"compiling the model (torch.compile, mode {plan.mode}): the first evaluation and steps take longer")
        model = torch.compile(model, mode=plan.mode)
    if procs.distributed:
        model = DDP(model, device_ids=[procs.device.index] if procs.device.type == "cuda" else None,
                    bucket_cap_mb=cfg.ddp_bucket_mb, gradient_as_bucket_view=True)
    return model


# ----------------------------------------------------------------------------------------------
# one training step, and evaluation

def train_step(model, optimizer, scaler, batches, autocast, grad_clip, distributed):
    """One optimizer step over a list of (x, y) micro-batches; returns the step's mean loss (a tensor,
    left on the device so that nothing waits for the GPU here)."""
    loss_sum = 0.0
    for i, (x, y) in enumerate(batches):
        if distributed:  # average gradients across processes on the last micro-batch only
            model.require_backward_grad_sync = i == len(batches) - 1
        with autocast:
            _, loss = model(x, y)
        loss = loss / len(batches)
        scaler.scale(loss).backward()
        loss_sum += loss.detach()
    if grad_clip > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16 loss-scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum


@torch.no_grad()
def evaluate(model, val_data, val_offsets, autocast, procs, stop):
    """Mean validation loss over the fixed batches (shared out over the processes) and, for datasets
    with answers, the share of answer tokens predicted right (argmax). None when a stop is requested:
    the flag is read between batches, so that even a long evaluation stops within seconds."""
    model.eval()
    device = procs.device
    total = torch.zeros(4, device=device)  # (sum of batch losses, batches, answers right, answers scored)
    for first in range(0, len(val_offsets), procs.world):  # one batch per process per round
        if stop.requested():  # in every round on every process, so that under torchrun they agree
            model.train()
            return None
        i = first + procs.rank
        if i >= len(val_offsets):  # the last round may have fewer batches than processes
            continue
        x, y = val_data.batch(val_offsets[i], device)
        with autocast:
            logits, loss = model(x, y)
        total[:2] += torch.stack([loss.float(), torch.ones((), device=device)])
        if val_data.answers is not None:
            scored = val_data.scored_answers(val_offsets[i], device)                   # (B, T)
            right = (logits.argmax(dim=-1) == y) & scored                              # (B, T)
            total[2:] += torch.stack([right.sum(), scored.sum()]).float()
    if procs.distributed:
        dist.all_reduce(total)
    model.train()
    result = {"val_loss": (total[0] / total[1]).item()}
    if val_data.answers is not None and total[3] > 0:
        result["answer_accuracy"] = (total[2] / total[3]).item()
    return result


# ----------------------------------------------------------------------------------------------
# the loop

def train(cfg, state=None):
    """Run training; returns the best validation loss. `state` is a checkpoint to resume from."""
    procs = start_processes(cfg.device)
    try:
        with StopRequest(procs.flags) as stop:
            return run(cfg, state, procs, stop)
    finally:
        procs.end()


def run(cfg, state, procs, stop):
    """Evaluate every eval_interval steps, train one step, log every log_interval steps."""
    start_step = state["iter_num"] if state is not None else 0
    # On resume the checkpoint was written right after this step's evaluation, which is logged already
    # (unless a stop came during it: then the checkpoint holds no val_loss, and the evaluation runs again).
    evaluated, val_loss = (start_step, state["val_loss"]) if state and state["val_loss"] is not None else (-1, None)
    if start_step > cfg.max_iters or start_step == cfg.max_iters == evaluated:
        if procs.master:
            print(f"nothing to do: {cfg.out_dir}/ckpt.pt is at iter {start_step} and max_iters is {cfg.max_iters} "
                  "(raise --max_iters to train on)")
        return state["best_val_loss"]
    r, model, train_data, val_data, micro_steps = start(cfg, state, procs)
    autocast, device = autocast_for(procs.device, r.dtype), procs.device
    # The validation windows depend on neither the iteration nor --seed: every evaluation of every run
    # (any seed, any residual mode) scores the same text, so their losses compare directly.
    val_offsets = val_data.offsets((cfg.eval_iters, cfg.batch_size), seed=VALIDATION_SEED)
    for step in range(start_step, cfg.max_iters + 1):
        if (step % cfg.eval_interval == 0 or step == cfg.max_iters) and step != evaluated:
            scores = evaluate(model, val_data, val_offsets, autocast, procs, stop)
            if scores is None:  # a stop came during the evaluation
                r.stop(step, stop)
            gates = gate_statistics(r.model, val_data.batch(val_offsets[0, :8], device)[0]) if procs.master else {}
            val_loss, evaluated = r.evaluation(step, scores, gates), step
            if step > start_step:  # at a fresh step 0 nothing has been trained yet
                r.save(step, val_loss)
            r.lap(step)
        if step == cfg.max_iters:
            break
        if stop.requested():
            r.stop(step, stop, val_loss if evaluated == step else None)

        lr = learning_rate(cfg, step)
        for group in r.optimizer.param_groups:
            group["lr"] = lr
        batches = train_batches(cfg, train_data, step, procs, micro_steps)
        torch.manual_seed(step_seed(cfg, step, 1 + procs.rank))  # dropout masks
        loss = train_step(model, r.optimizer, r.scaler, batches, autocast, cfg.grad_clip, procs.distributed)

        # A progress line after the first step too: it shows how long one step takes (and compiles).
        if (step + 1) % cfg.log_interval == 0 or step + 1 == cfg.max_iters or step == start_step:
            r.progress(step + 1, loss, lr)
    return r.finish(val_loss)


def start(cfg, state, procs):
    """The checks that need the device or the data, before any heavy work; then the data, the model, and
    the Run (support/runfiles.py) that keeps the loop's books."""
    if cfg.gradient_accumulation_steps % procs.world:
        raise ConfigError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be a multiple of "
                          f"the {procs.world} processes (each runs an equal share of the micro-batches)")
    micro_steps, dtype = cfg.gradient_accumulation_steps // procs.world, pick_dtype(cfg.dtype, procs.device)
    plan = compile_plan(cfg.compile, cfg.compile_mode, procs.device, micro_steps, procs.distributed)
    check_fused(cfg.fused, procs.device, model_config(cfg))
    meta, train_data, val_data = open_dataset(cfg)
    if state is not None:
        check_same_tokens(state, meta, cfg.dataset)
    check_memory(model_config(cfg, vocab_size=meta["vocab_size"]), cfg.batch_size, procs.device,
                 "Lower --batch_size, --block_size, --n_layer or --n_embd, or train on a GPU.")
    log = RunLog(cfg.out_dir, state and state["iter_num"]) if procs.master else None
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on GPUs that have them

    model, optimizer, scaler = build_model(cfg, meta, state, procs.device, dtype)
    r = Run(cfg, procs, model, optimizer, scaler, meta, dtype, log, state)
    with torch.device("meta"):  # count the additive model's parameters without allocating it
        additive = GPT(dataclasses.replace(model.config, residual="add", d_v=1)).num_params()
    r.describe(plan, micro_steps, len(train_data.tokens), len(val_data.tokens), additive)
    return r, speed_up(model, cfg, plan, procs, r.say), train_data, val_data, micro_steps


def main(argv):
    cfg, state = resolve_config(argv)
    train(cfg, state)


if __name__ == "__main__":
    run_cli(main, TrainConfig, __doc__, sys.argv[1:])
