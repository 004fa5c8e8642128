"""
Measure training speed and memory of the residual modes side by side, on random tokens.

    python bench.py                                    # GPT-2 small shape: add, delta, delta d_v=4
    python bench.py --n_layer=6 --n_embd=384 --n_head=6 --block_size=256 --batch_size=64 --modes=add,delta

Each mode runs `warmup` full training steps (forward, backward, gradient clipping, AdamW; compiled
where train.py would compile), then `steps` timed ones; the table gives the median step time,
tokens/s, MFU, peak memory (on CUDA; n/a elsewhere), and each mode's throughput as a ratio to the first mode's.
"""

import dataclasses
import statistics
import sys
import time

import torch

from configurator import ConfigError, parse_overrides, run_cli
from ddl_gpt import GPT, GPTConfig
from runtime import (autocast_for, check_memory, check_speed_settings, compile_blocker, device_name, kernel_blocker,
                     peak_tflops, pick_device, pick_dtype, use_kernels)


@dataclasses.dataclass
class BenchConfig:
    modes: str = "add,delta,delta:4"  # residual[:d_v], comma-separated; the first is the reference
    n_layer: int = 12                 # GPT-2 small's shape by default
    n_head: int = 6                   # heads of 128: what the fused attention kernels like
    n_embd: int = 768                 # model width
    block_size: int = 1024            # context length
    batch_size: int = 16              # sequences per step
    vocab_size: int = 50304           # GPT-2's vocabulary, padded to a multiple of 64
    warmup: int = 10                  # untimed steps first (compilation, allocator warm-up)
    steps: int = 30                   # timed steps; the table shows their median
    device: str = "auto"              # auto picks cuda > mps > cpu
    dtype: str = "auto"               # auto: bfloat16 on GPUs that have it, else float32
    compile: bool | None = None       # torch.compile; None: on CUDA where Triton exists
    state_dtype: str = "float32"      # the residual state's storage: float32 or bfloat16
    compile_mode: str = "auto"        # torch.compile mode; auto: reduce-overhead (CUDA graphs) on a GPU, as train.py
    fused: bool | None = None         # delta writes in ddl_kernels.py's fused kernel; None: when not compiling
    grad_clip: float = 1.0            # max gradient norm, as in train.py; 0 turns clipping off (nanoGPT's bench.py has none)
    gpu_peak_tflops: float | None = None  # the GPU's peak, for MFU on a GPU missing from the table


def bench_mode(cfg, residual, d_v, device, dtype, use_compile):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                          vocab_size=cfg.vocab_size, residual=residual, d_v=d_v,
                          state_dtype=cfg.state_dtype)).to(device)
    fused, _ = use_kernels(model, cfg.fused, use_compile)
    optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), device.type)
    mode = cfg.compile_mode if cfg.compile_mode != "auto" else "reduce-overhead" if device.type == "cuda" else "default"
    step_model = torch.compile(model, mode=mode) if use_compile else model
    autocast = autocast_for(device, dtype)
    x = torch.randint(cfg.vocab_size, (cfg.batch_size, cfg.block_size), device=device)  # (B, T)
    y = torch.randint(cfg.vocab_size, (cfg.batch_size, cfg.block_size), device=device)  # (B, T)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    t_compile = time.time()
    for i in range(cfg.warmup + cfg.steps):
        sync()
        t0 = time.time()
        with autocast:
            _, loss = step_model(x, y)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if i == 0:
            t_compile = time.time() - t_compile
        if i >= cfg.warmup:
            times.append(time.time() - t0)
    # only CUDA's allocator counts a peak per run; the CPU's would be the whole process's, every mode so far
    memory = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else "n/a"
    return statistics.median(times), memory, t_compile, model.flops_per_token(), model.num_params(), fused


def parse_modes(text):
    """[(residual, d_v)] from "add,delta,delta:4"."""
    modes = []
    for item in text.split(","):
        residual, _, d_v = item.strip().partition(":")
        try:
            modes.append((residual, int(d_v) if d_v else 1))
            GPTConfig(residual=residual, d_v=modes[-1][1])
        except ValueError as error:
            raise ConfigError(f"--modes: {item!r} is not a mode ({error}); write residual[:d_v], e.g. add,delta,delta:4") from None
    return modes


def main(argv):
    cfg = BenchConfig(**parse_overrides(BenchConfig, argv))
    modes = parse_modes(cfg.modes)
    for key in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "vocab_size", "steps"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"--{key}={getattr(cfg, key)}: must be at least 1")
    for key in ("warmup", "grad_clip"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"--{key}={getattr(cfg, key)}: must not be negative")
    check_speed_settings(cfg.compile_mode, cfg.gpu_peak_tflops)
    try:
        shape = GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                          vocab_size=cfg.vocab_size, d_v=max(d_v for _, d_v in modes), state_dtype=cfg.state_dtype)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    for residual, d_v in modes:
        blocker = kernel_blocker(device, dataclasses.replace(shape, residual=residual, d_v=d_v))
        if cfg.fused and blocker and residual != "add":
            raise ConfigError(f"--fused=True: {blocker}; use --fused=False")
    check_memory(shape, cfg.batch_size, device, "Lower --batch_size and --block_size, or run it on a GPU.")
    blocker = compile_blocker(device)
    if cfg.compile and blocker:
        raise ConfigError(f"--compile=True: {blocker}; use --compile=False")
    use_compile = cfg.compile if cfg.compile is not None else device.type == "cuda" and blocker is None
    torch.set_float32_matmul_precision("high")
    peak = peak_tflops(device, cfg.gpu_peak_tflops) if dtype != "float32" else None
    print(f"{device_name(device)}, torch {torch.__version__}, {dtype}, compile {use_compile}; {cfg.n_layer}L "
          f"d={cfg.n_embd} {cfg.n_head} heads, T={cfg.block_size}, B={cfg.batch_size}", flush=True)
    rows, reference = [], None
    for residual, d_v in modes:
        seconds, memory, t_compile, flops, params, fused = bench_mode(cfg, residual, d_v, device, dtype, use_compile)
        tokens_per_sec = cfg.batch_size * cfg.block_size / seconds
        reference = reference or tokens_per_sec
        mfu = f"{100 * flops * tokens_per_sec / (peak * 1e12):.1f}%" if peak else "-"
        path = "-" if residual == "add" else "fused" if fused else "plain"
        rows.append(f"| {residual} d_v={d_v} | {path} | {params / 1e6:.2f}M | {1000 * seconds:.1f} | "
                    f"{tokens_per_sec / 1000:,.1f}k | {mfu} | {memory} | {tokens_per_sec / reference:.2f}x | "
                    f"{t_compile:.0f} s |")
        print(rows[-1], flush=True)
    print("\n| mode | delta writes | params | ms/step | tokens/s | MFU | peak memory | throughput vs first | first step |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    run_cli(main, BenchConfig, __doc__, sys.argv[1:])
