"""
Train a ddl-gpt model on one GPU, an Apple-silicon GPU (MPS), the CPU, or several GPUs via torchrun.

    python train.py config/shakespeare_char.py                      # device detected: cuda > mps > cpu
    python train.py config/shakespeare_char.py --residual=add       # the additive baseline
    python train.py config/shakespeare_char.py --resume             # continue from out_dir/ckpt.pt
    python train.py config/shakespeare_char.py --resume=auto        # continue if ckpt.pt exists, else start
    torchrun --standalone --nproc_per_node=4 train.py config/shakespeare_char.py   # DDP, 4 GPUs

Settings are the TrainConfig fields below; a config file and then --key=value arguments override them
(`python train.py --help` lists them). out_dir receives ckpt.pt (the latest state, for --resume),
best.pt (the weights with the lowest validation loss, for sample.py) and log.jsonl (one JSON object
per progress or evaluation line). Ctrl-C or SIGTERM finishes the current step, saves ckpt.pt and
exits; --resume then continues exactly where the run stopped.

Reading order: `train_step` (one optimizer step), `evaluate`, then `train` (the loop that calls them).
Every random draw is a function of (seed, iteration, rank): the batch of step i is the same whether
the run was interrupted or not, and the same on one GPU as split over several.
"""

import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
# Imported here, before any process group exists, on purpose: its functions bind the world group as a
# default argument when the module is imported, and DDP would import it after init_process_group. A group
# held there outlives destroy_process_group, and its gloo threads then sometimes abort the exiting process.
import torch.distributed.nn  # noqa: F401
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import FALSE, TRUE, ConfigError, UserError, fields_of, parse_overrides, run_cli
from ddl_gpt import GPT, GPTConfig, gate_statistics
from runtime import (autocast_for, check_memory, check_speed_settings, compile_blocker, device_name, kernel_blocker,
                     load_checkpoint, model_from_checkpoint, peak_tflops, pick_device, pick_dtype, save_checkpoint,
                     use_kernels)

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
    fused: bool | None = None          # delta writes in one fused GPU kernel (ddl_kernels.py); None: when not compiling
    ddp_bucket_mb: int = 25            # under torchrun: gradients are averaged in buckets of this size while backward runs
    seed: int = 1337                   # every random draw of the run follows from it
    gpu_peak_tflops: float | None = None  # the GPU's peak, for MFU on a GPU missing from runtime.PEAK_TFLOPS


MODEL_KEYS = [f.name for f in dataclasses.fields(GPTConfig) if f.name in TrainConfig.__dataclass_fields__]


class TrainingError(UserError):
    pass


# ----------------------------------------------------------------------------------------------
# settings: every one checked before anything heavy happens

def check_settings(cfg):
    """Raise ConfigError naming the first setting that cannot work, and the fix."""
    positive = ["n_layer", "n_head", "n_embd", "block_size", "batch_size", "gradient_accumulation_steps",
                "max_iters", "eval_interval", "eval_iters", "log_interval", "d_v", "ddp_bucket_mb"]
    for key in positive:
        if getattr(cfg, key) < 1:
            raise ConfigError(f"--{key}={getattr(cfg, key)}: must be at least 1")
    ranges = {"dropout": (0.0, 1.0, "[0, 1)"), "beta1": (0.0, 1.0, "[0, 1)"), "beta2": (0.0, 1.0, "[0, 1)")}
    for key, (low, high, shown) in ranges.items():
        if not low <= getattr(cfg, key) < high:
            raise ConfigError(f"--{key}={getattr(cfg, key)}: must lie in {shown}")
    if cfg.learning_rate <= 0:
        raise ConfigError(f"--learning_rate={cfg.learning_rate}: must be positive")
    if not 0 <= cfg.min_lr <= cfg.learning_rate:
        raise ConfigError(f"--min_lr={cfg.min_lr}: must lie between 0 and --learning_rate={cfg.learning_rate}")
    for key in ("warmup_iters", "weight_decay", "grad_clip"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"--{key}={getattr(cfg, key)}: must not be negative")
    if cfg.lr_decay_iters is not None and cfg.lr_decay_iters < 1:
        raise ConfigError(f"--lr_decay_iters={cfg.lr_decay_iters}: must be at least 1, or None for max_iters")
    if not 0 <= cfg.seed < 2**31:  # step_seed() must stay inside the 64-bit seeds torch accepts
        raise ConfigError(f"--seed={cfg.seed}: must lie in [0, 2^31)")
    check_speed_settings(cfg.compile_mode, cfg.gpu_peak_tflops)
    if cfg.resume not in ("no", "yes", "auto"):
        raise ConfigError(f"--resume={cfg.resume!r}: expected no, yes (or a bare --resume) or auto")
    try:
        GPTConfig(vocab_size=1, **fields_of(GPTConfig, dataclasses.asdict(cfg)))
    except ValueError as error:  # the model's own checks: modes, head sizes, beta_init, ...
        raise ConfigError(str(error)) from None


def resolve_config(argv):
    """The run's TrainConfig, checked, and the checkpoint to resume from (or None)."""
    overrides = parse_overrides(TrainConfig, argv)
    if "resume" in overrides:  # --resume=true and --resume=false read as yes and no
        word = overrides["resume"].lower()
        overrides["resume"] = "yes" if word in TRUE else "no" if word in FALSE else word
    cfg = TrainConfig(**overrides)
    check_settings(cfg)
    ckpt_path = Path(cfg.out_dir) / "ckpt.pt"
    exists = os.path.exists(ckpt_path)  # False, not an OSError, for a name the system refuses (too long)
    if cfg.resume == "no" or (cfg.resume == "auto" and not exists):
        if exists:
            raise TrainingError(f"{ckpt_path} exists: continue it with --resume, or choose another --out_dir "
                                "(or delete that folder) to start afresh")
        return cfg, None
    state = load_checkpoint(ckpt_path)
    saved = state["train_config"]
    changed = {k: (saved.get(k), v) for k, v in overrides.items() if k in MODEL_KEYS and saved.get(k) != v}
    if changed:
        listed = ", ".join(f"{k}: checkpoint {a!r}, asked {b!r}" for k, (a, b) in changed.items())
        raise TrainingError(f"cannot resume with a different model ({listed}); drop those settings or use another --out_dir")
    cfg = TrainConfig(**(fields_of(TrainConfig, saved) | overrides | {"resume": cfg.resume}))
    check_settings(cfg)
    return cfg, state


# ----------------------------------------------------------------------------------------------
# data: token files read through memory maps; batches drawn from seeded generators

class TokenFile:
    """One split of a dataset: token ids (uint16) and, for tasks with answers, which tokens are answers
    (a uint16 file beside it: 0, or how many tokens back the answer's example starts)."""

    def __init__(self, path, block_size):
        self.tokens = self.read(path)
        self.block_size = block_size
        if len(self.tokens) <= block_size + 1:
            raise TrainingError(f"{path} holds {len(self.tokens)} tokens, too few for block_size={block_size}; "
                                "lower --block_size or add text")
        answers = path.with_name(path.stem + "_answers.bin")
        self.answers = self.read(answers) if answers.is_file() else None
        if self.answers is not None and len(self.answers) != len(self.tokens):
            raise TrainingError(f"{answers} does not match {path} (lengths differ); prepare the dataset again")

    @staticmethod
    def read(path):
        size = path.stat().st_size
        if size % 2:
            raise TrainingError(f"{path} is damaged (an odd number of bytes cannot hold uint16 tokens); "
                                "prepare the dataset again")
        if size == 0:  # numpy cannot map an empty file
            return np.zeros(0, dtype=np.uint16)
        return np.memmap(path, dtype=np.uint16, mode="r")

    def offsets(self, shape, seed):
        """Random window starts, shape `shape`, a function of `seed` alone."""
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(len(self.tokens) - self.block_size - 1, shape, generator=generator)

    def batch(self, offsets, device):
        """Inputs x and targets y (B, T): windows of the text and the same windows one token later."""
        T = self.block_size
        windows = np.stack([self.tokens[i:i + T + 1] for i in offsets.tolist()]).astype(np.int64)  # (B, T+1)
        x = torch.from_numpy(windows[:, :-1])  # (B, T)
        y = torch.from_numpy(windows[:, 1:])   # (B, T)
        if device.type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    def scored_answers(self, offsets, device):
        """(B, T) bool: targets that are answers whose whole example lies inside the window."""
        T = self.block_size
        back = np.stack([self.answers[i + 1:i + T + 1] for i in offsets.tolist()]).astype(np.int64)  # (B, T)
        position = np.arange(T)[None, :]                                                          # (1, T)
        return torch.from_numpy((back > 0) & (position + 1 >= back)).to(device)                   # (B, T)


def token_identity(meta):
    """What makes token ids mean the same text in two datasets: the tokenizer, its vocabulary, its characters."""
    return meta.get("tokenizer"), meta.get("vocab_size"), meta.get("chars")


def open_dataset(cfg):
    """meta.json, and the train and validation TokenFiles of the dataset."""
    folder = Path(cfg.data_dir) / cfg.dataset
    if not (folder / "meta.json").is_file():
        script = folder / "prepare.py"
        target = f"--name={cfg.dataset}" if Path(cfg.data_dir) == Path("data") else f"--out_dir={folder}"
        how = (f"python {script}" if script.is_file() else
               f"python data/prepare.py --input=YOUR_TEXT {target}  (a text file or a folder of .txt files)")
        raise TrainingError(f"dataset {cfg.dataset!r} is not prepared: {folder}/meta.json is missing. Run: {how}")
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        vocab_size, tokenizer = meta["vocab_size"], meta["tokenizer"]
        if type(vocab_size) is not int or not 1 <= vocab_size <= 2**16 or tokenizer not in ("char", "gpt2"):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise TrainingError(f"{folder}/meta.json is damaged; prepare the dataset again") from None
    for split in ("train", "val"):
        if not (folder / f"{split}.bin").is_file():
            raise TrainingError(f"{folder}/{split}.bin is missing; prepare the dataset again")
    splits = [TokenFile(folder / f"{split}.bin", cfg.block_size) for split in ("train", "val")]
    for split, data in zip(("train", "val"), splits):  # one pass over each file; an id past the vocabulary would crash
        if data.tokens.max() >= meta["vocab_size"]:
            raise TrainingError(f"{folder}/{split}.bin holds token id {data.tokens.max()}, outside the vocabulary of "
                                f"{meta['vocab_size']} in meta.json: the files do not belong together; prepare the "
                                "dataset again")
    return meta, *splits


# ----------------------------------------------------------------------------------------------
# schedule and seeds

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
def evaluate(model, val_data, val_offsets, autocast, rank=0, world=1):
    """Mean validation loss over the fixed batches (shared out over the processes) and, for datasets
    with answers, the share of answer tokens predicted right (argmax)."""
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(4, device=device)  # (sum of batch losses, batches, answers right, answers scored)
    for i in range(rank, len(val_offsets), world):
        x, y = val_data.batch(val_offsets[i], device)
        with autocast:
            logits, loss = model(x, y)
        total[:2] += torch.stack([loss.float(), torch.ones((), device=device)])
        if val_data.answers is not None:
            scored = val_data.scored_answers(val_offsets[i], device)                   # (B, T)
            right = (logits.argmax(dim=-1) == y) & scored                              # (B, T)
            total[2:] += torch.stack([right.sum(), scored.sum()]).float()
    if world > 1:
        dist.all_reduce(total)
    model.train()
    result = {"val_loss": (total[0] / total[1]).item()}
    if val_data.answers is not None and total[3] > 0:
        result["answer_accuracy"] = (total[2] / total[3]).item()
    return result


# ----------------------------------------------------------------------------------------------
# the run's files: log, checkpoints, a lock, and signals

class RunLog:
    """log.jsonl: one JSON object per line. A fresh run starts a fresh file; a resumed run keeps the
    lines up to the step it resumes from, so that no step is ever logged twice."""

    def __init__(self, path, resume_step=None):
        self.path = Path(path)
        kept = []
        if resume_step is not None and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a crash
                    continue
                if entry.get("iter", 0) <= resume_step and not entry.get("done"):
                    kept.append(line + "\n")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, self.path)
        self.file = open(self.path, "a", encoding="utf-8")

    def write(self, **entry):
        self.file.write(json.dumps(entry) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


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


def check_writable(out_dir):
    """Create out_dir and prove that a file can be written there, before any heavy work."""
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        probe = Path(out_dir) / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise TrainingError(f"--out_dir={out_dir} cannot be written ({error.strerror or error}); "
                            "choose a folder you can write to") from None


class StopRequest:
    """While active, SIGINT (Ctrl-C) and SIGTERM (what a scheduler sends before preemption) set a flag;
    the loop finishes its step, saves ckpt.pt and exits. A second Ctrl-C stops at once.
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
        """Whether to stop before the next step: whether this process, or under torchrun any, got a signal."""
        if self.group is None:
            return self.signal is not None
        flag = torch.tensor([float(self.signal is not None)])
        dist.all_reduce(flag, group=self.group)
        return flag.item() > 0


def save_checkpoints(cfg, model, optimizer, scaler, meta, step, best_val, elapsed, val_loss=None):
    """ckpt.pt: everything --resume needs; and best.pt, the weights alone, when `val_loss` (this step's
    validation loss, if it was evaluated) is the best so far."""
    state = {"model_args": dataclasses.asdict(model.config), "model": model.state_dict(), "tokenizer": meta,
             "iter_num": step, "val_loss": val_loss, "best_val_loss": best_val, "elapsed_s": elapsed,
             "train_config": dataclasses.asdict(cfg)}
    if val_loss is not None and val_loss <= best_val:
        save_checkpoint(Path(cfg.out_dir) / "best.pt", state)
    save_checkpoint(Path(cfg.out_dir) / "ckpt.pt", state | {"optimizer": optimizer.state_dict(),
                                                          "scaler": scaler.state_dict()})


def duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# ----------------------------------------------------------------------------------------------
# the run

def setup_processes(cfg):
    """(rank, world size, device): one process, or one of torchrun's."""
    if int(os.environ.get("RANK", -1)) == -1:
        return 0, 1, pick_device(cfg.device)
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def train(cfg, state=None):
    """Run training; returns the best validation loss. `state` is a checkpoint to resume from."""
    rank, world, device = setup_processes(cfg)
    distributed, master = "RANK" in os.environ, rank == 0
    log = print if master else (lambda *args, **kwargs: None)
    flags = None  # under torchrun the stop flags travel over gloo: the world group on CPUs, a second group on GPUs
    if distributed:
        flags = dist.new_group(backend="gloo") if device.type == "cuda" else dist.group.WORLD
    try:
        with StopRequest(flags) as stop:
            return run(cfg, state, rank, world, device, distributed, master, log, stop)
    finally:
        if distributed:
            dist.destroy_process_group()


def run(cfg, state, rank, world, device, distributed, master, log, stop):
    # --- checks that need the device, before any heavy work
    if cfg.gradient_accumulation_steps % world:
        raise ConfigError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be a multiple of "
                          f"the {world} processes (each runs an equal share of the micro-batches)")
    micro_steps = cfg.gradient_accumulation_steps // world
    dtype = pick_dtype(cfg.dtype, device)
    if cfg.compile_mode in ("reduce-overhead", "max-autotune") and micro_steps > 1:
        raise ConfigError(f"--compile_mode={cfg.compile_mode} (CUDA graphs) does not work with "
                          f"{micro_steps} micro-batches per step; use --compile_mode=default or auto")
    blocker = compile_blocker(device)
    if cfg.compile and blocker:
        raise ConfigError(f"--compile=True: {blocker}; use --compile=False")
    use_compile = cfg.compile if cfg.compile is not None else device.type == "cuda" and blocker is None
    why_not = ""  # the default left compile off: say why, so that a user knows what --compile=True would do
    if cfg.compile is None and not use_compile:
        # On a 2-core CPU the first compilation took about 55 s for a 30% faster step: it does not pay in a
        # run of a minute (README, Laptop CPU). Later runs reuse the kernels, cached on disk.
        why_not = f" ({blocker})" if blocker else (" (off by default on the CPU: the first compilation takes "
                                                    "longer than a short run saves; --compile=True turns it on)")
    shape = GPTConfig(vocab_size=1, **fields_of(GPTConfig, dataclasses.asdict(cfg)))  # the model, vocabulary aside
    no_kernel = kernel_blocker(device, shape)
    if cfg.fused and no_kernel:
        raise ConfigError(f"--fused=True: {no_kernel}; use --fused=False")
    start_step = state["iter_num"] if state is not None else 0
    if start_step >= cfg.max_iters:
        log(f"nothing to do: {cfg.out_dir}/ckpt.pt is at iter {start_step} and max_iters is {cfg.max_iters} "
            "(raise --max_iters to train on)")
        return state["best_val_loss"]
    meta, train_data, val_data = open_dataset(cfg)
    if state is not None and token_identity(state["tokenizer"]) != token_identity(meta):
        raise TrainingError(f"cannot resume on dataset {cfg.dataset!r}: its tokens are not the checkpoint's "
                            f"({meta['tokenizer']} tokenizer, vocabulary {meta['vocab_size']}, against "
                            f"{state['tokenizer']['tokenizer']}, {state['tokenizer']['vocab_size']}); resume with "
                            f"--dataset={state['train_config']['dataset']} or start afresh in another --out_dir")
    check_memory(dataclasses.replace(shape, vocab_size=meta["vocab_size"]), cfg.batch_size, device,
                 "Lower --batch_size, --block_size, --n_layer or --n_embd, or train on a GPU.")
    if master:
        check_writable(cfg.out_dir)
        lock = lock_out_dir(cfg.out_dir)  # noqa: F841 (held until the process ends)
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on GPUs that have them

    # --- the model, its optimizer, and where the run starts
    if state is not None:
        model = model_from_checkpoint(state)
    else:
        # GPT-2's 50,257 tokens are padded to 50,304 (a multiple of 64) for faster matmuls; the
        # padded ids never occur as targets. Character vocabularies are left as they are.
        vocab = meta["vocab_size"] if meta["tokenizer"] == "char" else 64 * math.ceil(meta["vocab_size"] / 64)
        torch.manual_seed(cfg.seed)
        model = GPT(GPTConfig(vocab_size=vocab, **fields_of(GPTConfig, dataclasses.asdict(cfg))))
    model.to(device)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")
    best_val, elapsed_before = float("inf"), 0.0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        best_val, elapsed_before = state["best_val_loss"], state["elapsed_s"]

    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    with torch.device("meta"):  # count the additive model's parameters without allocating it
        additive = GPT(dataclasses.replace(model.config, residual="add", d_v=1)).num_params()
    log(f"device {device} ({device_name(device)}) x {world} process(es), dtype {dtype}, compile {use_compile}{why_not}")
    log(f"model: residual={model.config.residual} d_v={model.config.d_v}, {model.num_params() / 1e6:.2f}M parameters "
        f"({model.num_params() - additive:+,} = {100 * (model.num_params() - additive) / additive:+.2f}% vs additive)")
    log(f"data: {cfg.dataset}, {len(train_data.tokens):,} train / {len(val_data.tokens):,} val tokens; "
        f"{tokens_per_step:,} tokens per step ({world} x {micro_steps} micro-batches of {cfg.batch_size} x {cfg.block_size})")
    if state is not None:
        log(f"resuming from iter {start_step} of {cfg.max_iters} (best val loss so far {best_val:.4f})")
    run_log = RunLog(Path(cfg.out_dir) / "log.jsonl", start_step if state else None) if master else None
    record = run_log.write if master else (lambda **entry: None)
    record(iter=start_step, run={"config": dataclasses.asdict(cfg), "device": device_name(device), "world": world,
                                 "dtype": dtype, "compile": use_compile, "torch": torch.__version__})

    log(use_kernels(model, cfg.fused, use_compile)[1])
    raw_model = model
    if use_compile:
        # CUDA graphs replay a whole step in one launch: at the baby GPT's size, where launching kernels
        # takes longer than running them, that is a third off the step. Under DDP they would capture
        # the gradient hooks, so several processes keep the default mode.
        # With several micro-batches per step the graphs' reused output buffers are overwritten
        # before the accumulated backward is done with them, so accumulation keeps the default mode.
        mode = cfg.compile_mode if cfg.compile_mode != "auto" else (
            "reduce-overhead" if device.type == "cuda" and not distributed and micro_steps == 1 else "default")
        log(f"compiling the model (torch.compile, mode {mode}): the first evaluation and steps take longer")
        model = torch.compile(model, mode=mode)
    if distributed:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                    bucket_cap_mb=cfg.ddp_bucket_mb, gradient_as_bucket_view=True)
    autocast = autocast_for(device, dtype)
    peak = peak_tflops(device, cfg.gpu_peak_tflops) if dtype != "float32" else None
    flops_per_step = raw_model.flops_per_token() * tokens_per_step
    # The validation windows depend on neither the iteration nor --seed: every evaluation of every run
    # (any seed, any residual mode) scores the same text, so their losses compare directly.
    val_offsets = val_data.offsets((cfg.eval_iters, cfg.batch_size), seed=VALIDATION_SEED)

    # --- the loop: evaluate every eval_interval steps, train one step, log every log_interval steps
    t_start = t_last = time.time()
    elapsed = lambda: elapsed_before + time.time() - t_start  # noqa: E731 (training time over all sessions)
    step_last, val_loss = start_step, None
    for step in range(start_step, cfg.max_iters + 1):
        # On resume the checkpoint was written right after this step's evaluation, already logged.
        if (step % cfg.eval_interval == 0 or step == cfg.max_iters) and not (state is not None and step == start_step):
            scores = evaluate(model, val_data, val_offsets, autocast, rank, world)
            val_loss = scores["val_loss"]
            if not math.isfinite(val_loss):
                raise TrainingError(diverged("validation", val_loss, step, cfg))
            best_val = min(best_val, val_loss)
            gates = gate_statistics(raw_model, val_data.batch(val_offsets[0, :8], device)[0]) if master else {}
            accuracy = f", answer accuracy {scores['answer_accuracy']:.3f}" if "answer_accuracy" in scores else ""
            log(f"iter {step}: val loss {val_loss:.4f} (best {best_val:.4f}){accuracy}" + gate_summary(gates))
            record(iter=step, **scores, best_val_loss=best_val, diagnostics=gates, elapsed_s=round(elapsed(), 2))
            if master and step > start_step:  # at a fresh step 0 nothing has been trained yet
                save_checkpoints(cfg, raw_model, optimizer, scaler, meta, step, best_val, elapsed(), val_loss)
            t_last, step_last = time.time(), step  # evaluation time is not training time
        if step == cfg.max_iters:
            break
        if stop.requested():
            if step > start_step:
                if master:
                    save_checkpoints(cfg, raw_model, optimizer, scaler, meta, step, best_val, elapsed())
                log(f"stopped at iter {step}, saved in {cfg.out_dir}/ckpt.pt; continue with the same command "
                    "and --resume")
            else:
                log(f"stopped at iter {step}, before any new step: nothing new to save")
            raise SystemExit(128 + (stop.signal or signal.SIGTERM))

        lr = learning_rate(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        offsets = train_data.offsets((cfg.gradient_accumulation_steps, cfg.batch_size), step_seed(cfg, step, 0))
        batches = [train_data.batch(offsets[rank * micro_steps + i], device) for i in range(micro_steps)]
        torch.manual_seed(step_seed(cfg, step, 1 + rank))  # dropout masks
        loss = train_step(model, optimizer, scaler, batches, autocast, cfg.grad_clip, distributed)

        # A progress line after the first step too: it shows how long one step takes (and compiles).
        if (step + 1) % cfg.log_interval == 0 or step + 1 == cfg.max_iters or step == start_step:
            if distributed:  # the step's loss over every process's micro-batches, not rank 0's alone
                dist.all_reduce(loss)
                loss /= world
            train_loss = loss.item()  # waits for the GPU, so the timing below is true
            if not math.isfinite(train_loss):
                raise TrainingError(diverged("training", train_loss, step + 1, cfg))
            now = time.time()
            ms_per_step = 1000 * (now - t_last) / (step + 1 - step_last)
            t_last, step_last = now, step + 1
            tokens_per_sec = 1000 * tokens_per_step / ms_per_step
            mfu = flops_per_step / (ms_per_step / 1000) / (peak * 1e12 * world) if peak else None
            eta = duration(ms_per_step / 1000 * (cfg.max_iters - step - 1))
            log(f"iter {step + 1}/{cfg.max_iters} | loss {train_loss:.4f} | lr {lr:.2e} | {ms_per_step:.1f} ms | "
                f"{tokens_per_sec / 1000:,.1f}k tok/s" + (f" | MFU {100 * mfu:.1f}%" if mfu else "") + f" | ETA {eta}")
            record(iter=step + 1, train_loss=train_loss, lr=lr, ms_per_iter=round(ms_per_step, 3),
                   tokens_per_sec=round(tokens_per_sec), mfu=mfu, elapsed_s=round(elapsed(), 2))

    record(iter=cfg.max_iters, done=True, best_val_loss=best_val, final_val_loss=val_loss, elapsed_s=round(elapsed(), 2))
    log(f"done: best val loss {best_val:.4f}, {duration(elapsed())} (checkpoints in {cfg.out_dir}/)")
    if master:
        run_log.close()
    return best_val


def gate_summary(gates):
    """' | beta by layer (attn/mlp): 1.02/0.97 0.88/1.10' for the progress line; '' in add mode."""
    if "beta_mean" not in gates:
        return ""
    return " | beta by layer (attn/mlp): " + " ".join(f"{a:.2f}/{m:.2f}" for a, m in gates["beta_mean"])


def diverged(which, loss, step, cfg):
    ckpt = Path(cfg.out_dir) / "ckpt.pt"
    kept = (f"{ckpt} still holds the last good state (--resume continues from it)" if ckpt.exists()
            else "no checkpoint had been written yet")
    return f"{which} loss is {loss} at iter {step}: training diverged and stopped; {kept}. Try a lower --learning_rate."


def main(argv):
    cfg, state = resolve_config(argv)
    train(cfg, state)


if __name__ == "__main__":
    run_cli(main, TrainConfig, __doc__, sys.argv[1:])
