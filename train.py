"""
Train a ddl-gpt model on one GPU, an Apple-silicon GPU (MPS), the CPU, or several GPUs via torchrun.

    python train.py config/shakespeare_char.py                      # device detected: cuda > mps > cpu
    python train.py config/shakespeare_char.py --residual=add       # the additive baseline
    python train.py config/shakespeare_char.py --resume             # continue from out_dir/ckpt.pt
    torchrun --standalone --nproc_per_node=4 train.py config/shakespeare_char.py   # DDP, 4 GPUs

Settings are the TrainConfig fields below; a config file and then --key=value arguments override them.
out_dir receives ckpt.pt (the latest state, for --resume), best.pt (the weights with the lowest
validation loss, for sample.py) and log.jsonl (one JSON object per progress or evaluation line).

Every random draw is a function of (seed, iteration, rank): the batch of step i is the same whether
the run was interrupted or not, and the same on one GPU as split over several, which makes --resume
exact and lets one GPU with gradient accumulation reproduce a multi-GPU run.
"""

import dataclasses
import importlib.util
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import ConfigError, fields_of, parse_overrides
from ddl_gpt import GPT, GPTConfig
from tokenizer import TokenizerError

CHECKPOINT_FORMAT = "ddl-gpt/1"
VALIDATION_SEED = 1337  # picks the fixed validation windows


@dataclasses.dataclass
class TrainConfig:
    # data and output
    dataset: str = "shakespeare_char"  # a folder of data_dir holding train.bin, val.bin and meta.json
    data_dir: str = "data"
    out_dir: str = "out"
    resume: bool = False               # continue from out_dir/ckpt.pt exactly where it stopped
    # model: see GPTConfig in ddl_gpt.py (the vocabulary size comes from the dataset)
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    block_size: int = 256
    dropout: float = 0.0
    residual: str = "delta"            # "add", "delta" or "write"
    d_v: int = 1
    expand_conv: bool = True
    beta_init: float = 1.0
    value: str = "sigmoid"
    # optimization
    batch_size: int = 64               # sequences per micro-batch, in each process
    gradient_accumulation_steps: int = 1  # micro-batches per step, over all processes together
    max_iters: int = 5000              # optimizer steps
    learning_rate: float = 1e-3
    min_lr: float = 1e-4               # where the cosine decay ends
    warmup_iters: int = 100
    lr_decay_iters: int | None = None  # None: decay over the whole run
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0             # max gradient norm; 0 turns clipping off
    # evaluation and logging
    eval_interval: int = 250
    eval_iters: int = 20               # validation batches: the same fixed batches at every evaluation
    log_interval: int = 10
    # system
    device: str = "auto"               # "auto" picks cuda > mps > cpu; or name one ("cuda:1", "cpu")
    dtype: str = "auto"                # "auto": bfloat16 on GPUs that have it, float16 on older CUDA GPUs, else float32
    compile: bool | None = None        # None: torch.compile on CUDA (where it is supported), not elsewhere
    seed: int = 1337
    gpu_peak_tflops: float | None = None  # for MFU on a GPU missing from PEAK_TFLOPS


MODEL_KEYS = [f.name for f in dataclasses.fields(GPTConfig) if f.name in TrainConfig.__dataclass_fields__]

# Dense bf16/fp16 tensor-core peaks from the vendors' datasheets, matched against the device name in
# this order (so "H100 PCIe" is found before "H100"). MFU is reported against the GPU actually used.
PEAK_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0),
               ("L40S", 362.0), ("L4", 121.0)]


class TrainingError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------
# checkpoints: written atomically, read with weights_only=True (plain dicts, tensors and numbers)

def save_checkpoint(path, state):
    """Write to a temporary file, then rename: a crash mid-write never damages the previous file."""
    tmp = Path(str(path) + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path):
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"no checkpoint at {path}; train one first (python train.py ...), or check --out_dir")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise TrainingError(f"{path} cannot be read ({type(error).__name__}: {first_line[:200]}); it is "
                            "truncated, corrupt or not a ddl-gpt checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise TrainingError(f"{path} is not a ddl-gpt checkpoint of format {CHECKPOINT_FORMAT!r} (found {found!r})")
    return state


def model_from_checkpoint(state):
    """The GPT a checkpoint describes, with its weights loaded."""
    try:
        model = GPT(GPTConfig(**state["model_args"]))
    except (TypeError, ValueError) as error:
        raise TrainingError(f"the checkpoint's model settings do not fit this version of ddl_gpt.py: {error}") from None
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    if missing or unexpected:
        raise TrainingError(f"the checkpoint's weights do not match its model: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}")
    return model


# ----------------------------------------------------------------------------------------------
# data: token files read through memory maps; batches drawn from seeded generators

class TokenFile:

    def __init__(self, path, block_size):
        self.tokens = np.memmap(path, dtype=np.uint16, mode="r")
        self.block_size = block_size
        if len(self.tokens) <= block_size + 1:
            raise TrainingError(f"{path} holds {len(self.tokens)} tokens, too few for block_size={block_size}; "
                                "lower --block_size or add text")

    def offsets(self, shape, seed):
        """Random window starts, shape `shape`, a function of `seed` alone."""
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(len(self.tokens) - self.block_size - 1, shape, generator=generator)

    def batch(self, offsets, device):
        T = self.block_size
        windows = np.stack([self.tokens[i:i + T + 1] for i in offsets.tolist()]).astype(np.int64)  # (B, T+1)
        x = torch.from_numpy(windows[:, :-1])  # (B, T)
        y = torch.from_numpy(windows[:, 1:])   # (B, T)
        if device.type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)


def dataset_meta(cfg):
    folder = Path(cfg.data_dir) / cfg.dataset
    if not (folder / "meta.json").is_file():
        script = folder / "prepare.py"
        target = f"--name={cfg.dataset}" if Path(cfg.data_dir) == Path("data") else f"--out_dir={folder}"
        how = (f"python {script}" if script.is_file() else
               f"python data/prepare.py --input=YOUR_TEXT {target}  (a text file or a folder of .txt files)")
        raise TrainingError(f"dataset {cfg.dataset!r} is not prepared: {folder}/meta.json is missing. Run:\n  {how}")
    return json.loads((folder / "meta.json").read_text(encoding="utf-8"))


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
    """A seed for one random stream (0: batches, 1 + rank: dropout) at one step of one run."""
    return (cfg.seed * 1_000_003 + step) * 1_009 + stream


# ----------------------------------------------------------------------------------------------
# device policy

def pick_device(requested):
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(requested, device):
    if requested != "auto":
        if requested not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype={requested!r}; expected auto, float32, bfloat16 or float16")
        return requested
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    # CPU: bf16 autocast is slower than fp32 on most CPUs. MPS: fp32 works on every macOS version;
    # --dtype=bfloat16 or float16 may be faster on recent ones.
    return "float32"


def peak_tflops(cfg, device):
    if device.type != "cuda":
        return None
    if cfg.gpu_peak_tflops:
        return cfg.gpu_peak_tflops
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# ----------------------------------------------------------------------------------------------

def resolve_config(argv):
    """The run's TrainConfig, and the checkpoint to resume from (or None)."""
    overrides = parse_overrides(TrainConfig, argv)
    cfg = TrainConfig(**overrides)
    ckpt_path = Path(cfg.out_dir) / "ckpt.pt"
    if not cfg.resume:
        if ckpt_path.exists():
            raise TrainingError(f"{ckpt_path} exists: continue it with --resume, or choose another --out_dir "
                                "(or delete that folder) to start afresh")
        return cfg, None
    state = load_checkpoint(ckpt_path)
    saved = state["train_config"]
    changed = {k: (saved.get(k), v) for k, v in overrides.items() if k in MODEL_KEYS and saved.get(k) != v}
    if changed:
        listed = ", ".join(f"{k}: checkpoint {a!r}, asked {b!r}" for k, (a, b) in changed.items())
        raise TrainingError(f"cannot resume with a different model ({listed}); drop those settings or use another --out_dir")
    return TrainConfig(**(fields_of(TrainConfig, saved) | overrides | {"resume": True})), state


def train(cfg, state=None):
    """Run training; returns the best validation loss. `state` is a checkpoint to resume from."""
    distributed = int(os.environ.get("RANK", -1)) != -1
    if distributed:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ["LOCAL_RANK"])
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    else:
        rank, world, device = 0, 1, pick_device(cfg.device)
    master = rank == 0
    log = print if master else (lambda *args, **kwargs: None)
    if cfg.gradient_accumulation_steps % world:
        raise ConfigError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} must be a multiple of "
                          f"the {world} processes (each runs an equal share of the micro-batches)")
    micro_steps = cfg.gradient_accumulation_steps // world
    dtype = pick_dtype(cfg.dtype, device)
    use_compile = cfg.compile if cfg.compile is not None else (
        device.type == "cuda" and importlib.util.find_spec("triton") is not None)
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on GPUs that have them

    meta = dataset_meta(cfg)
    folder = Path(cfg.data_dir) / cfg.dataset
    train_data = TokenFile(folder / "train.bin", cfg.block_size)
    val_data = TokenFile(folder / "val.bin", cfg.block_size)
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps

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
    start_step, best_val, elapsed_before = 0, float("inf"), 0.0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_step, best_val, elapsed_before = state["iter_num"], state["best_val_loss"], state["elapsed_s"]

    with torch.device("meta"):  # count the additive model's parameters without allocating it
        additive = GPT(dataclasses.replace(model.config, residual="add", d_v=1)).num_params()
    log(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else device.type})"
        f" x {world} process(es), dtype {dtype}, compile {use_compile}")
    log(f"model: residual={model.config.residual} d_v={model.config.d_v}, {model.num_params() / 1e6:.2f}M parameters "
        f"({model.num_params() - additive:+,} = {100 * (model.num_params() - additive) / additive:+.2f}% vs additive)")
    log(f"data: {cfg.dataset}, {len(train_data.tokens):,} train / {len(val_data.tokens):,} val tokens; "
        f"{tokens_per_step:,} tokens per step ({world} x {micro_steps} micro-batches of {cfg.batch_size} x {cfg.block_size})")

    raw_model = model
    if use_compile:
        model = torch.compile(model)
    ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if distributed else model
    autocast = (torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))
                if dtype != "float32" else nullcontext())
    peak = peak_tflops(cfg, device) if dtype != "float32" else None
    flops_per_step = raw_model.flops_per_token() * tokens_per_step

    # The validation windows depend on neither the iteration nor --seed: every evaluation of every run
    # (any seed, any residual mode) scores the same text, so their losses compare directly.
    val_offsets = val_data.offsets((cfg.eval_iters, cfg.batch_size), seed=VALIDATION_SEED)

    @torch.no_grad()
    def evaluate():
        model.eval()
        total = torch.zeros(2, device=device)  # (sum of batch losses, number of batches)
        for i in range(rank, cfg.eval_iters, world):  # the fixed batches, shared out over the processes
            x, y = val_data.batch(val_offsets[i], device)
            with autocast:
                _, loss = model(x, y)
            total += torch.stack([loss.float(), torch.ones((), device=device)])
        if distributed:
            dist.all_reduce(total)
        model.train()
        return (total[0] / total[1]).item()

    def checkpoint(step, val_loss, elapsed):
        common = {"format": CHECKPOINT_FORMAT, "model_args": dataclasses.asdict(raw_model.config),
                  "model": raw_model.state_dict(), "tokenizer": meta, "iter_num": step, "val_loss": val_loss,
                  "best_val_loss": best_val, "elapsed_s": elapsed, "train_config": dataclasses.asdict(cfg)}
        if val_loss <= best_val:
            save_checkpoint(Path(cfg.out_dir) / "best.pt", common)
        save_checkpoint(Path(cfg.out_dir) / "ckpt.pt", common | {"optimizer": optimizer.state_dict(),
                                                                 "scaler": scaler.state_dict()})

    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        log_file = open(Path(cfg.out_dir) / "log.jsonl", "a", encoding="utf-8")

    def diverged(which, loss, step):
        ckpt = Path(cfg.out_dir) / "ckpt.pt"
        kept = (f"{ckpt} still holds the last good state (--resume continues from it)" if ckpt.exists()
                else "no checkpoint had been written yet")
        return f"{which} loss is {loss} at iter {step}: training diverged and stopped; {kept}. Try a lower --learning_rate."

    def record(**entry):
        if master:
            log_file.write(json.dumps(entry) + "\n")
            log_file.flush()

    t_start = time.time()
    t_last, step_last, ms_per_step = time.time(), start_step, None
    for step in range(start_step, cfg.max_iters + 1):
        elapsed = elapsed_before + time.time() - t_start
        if (step % cfg.eval_interval == 0 or step == cfg.max_iters) and not (state is not None and step == start_step):
            val_loss = evaluate()
            if not math.isfinite(val_loss):
                raise TrainingError(diverged("validation", val_loss, step))
            best_val = min(best_val, val_loss)
            log(f"iter {step}: val loss {val_loss:.4f} (best {best_val:.4f})")
            record(iter=step, val_loss=val_loss, best_val_loss=best_val, elapsed_s=round(elapsed, 2))
            if master and step > start_step:
                checkpoint(step, val_loss, elapsed)
            t_last, step_last = time.time(), step  # evaluation time is not training time
        if step == cfg.max_iters:
            break

        lr = learning_rate(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        offsets = train_data.offsets((cfg.gradient_accumulation_steps, cfg.batch_size), step_seed(cfg, step, 0))
        torch.manual_seed(step_seed(cfg, step, 1 + rank))  # dropout masks
        loss_sum = torch.zeros((), device=device)
        for micro in range(micro_steps):
            x, y = train_data.batch(offsets[rank * micro_steps + micro], device)
            if distributed:  # average gradients across processes on the last micro-batch only
                ddp_model.require_backward_grad_sync = micro == micro_steps - 1
            with autocast:
                _, loss = ddp_model(x, y)
            loss = loss / micro_steps
            scaler.scale(loss).backward()
            loss_sum += loss.detach()
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        if (step + 1) % cfg.log_interval == 0 or step + 1 == cfg.max_iters:
            if distributed:  # the step's loss over every process's micro-batches, not rank 0's alone
                dist.all_reduce(loss_sum)
                loss_sum /= world
            train_loss = loss_sum.item()  # waits for the GPU, so the timing below is true
            if not math.isfinite(train_loss):
                raise TrainingError(diverged("training", train_loss, step + 1))
            now = time.time()
            ms_per_step = 1000 * (now - t_last) / (step + 1 - step_last)
            t_last, step_last = now, step + 1
            tokens_per_sec = 1000 * tokens_per_step / ms_per_step
            mfu = flops_per_step / (ms_per_step / 1000) / (peak * 1e12 * world) if peak else None
            eta = duration(ms_per_step / 1000 * (cfg.max_iters - step - 1))
            log(f"iter {step + 1}/{cfg.max_iters} | loss {train_loss:.4f} | lr {lr:.2e} | {ms_per_step:.1f} ms | "
                f"{tokens_per_sec / 1000:,.1f}k tok/s" + (f" | MFU {100 * mfu:.1f}%" if mfu else "") + f" | ETA {eta}")
            record(iter=step + 1, train_loss=train_loss, lr=lr, ms_per_iter=round(ms_per_step, 3),
                   tokens_per_sec=round(tokens_per_sec), mfu=mfu, elapsed_s=round(elapsed_before + now - t_start, 2))

    log(f"done: best val loss {best_val:.4f}, {duration(elapsed_before + time.time() - t_start)} "
        f"(checkpoints in {cfg.out_dir}/)")
    if master:
        log_file.close()
    if distributed:
        dist.destroy_process_group()
    return best_val


def main(argv):
    try:
        cfg, state = resolve_config(argv)
        train(cfg, state)
    except (ConfigError, TrainingError, TokenizerError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main(sys.argv[1:])
