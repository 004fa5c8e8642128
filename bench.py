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

from ddl_gpt import GPT
from support.configurator import ConfigError, parse_overrides, run_cli
from support.device import autocast_for, check_memory, device_name, peak_tflops, pick_device, pick_dtype
from support.settings import MODE_SYNTAX, check_counts, model_config, parse_mode
from support.speed import check_fused, check_speed_settings, compile_plan, use_kernels


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
    fused: bool | None = None         # delta writes in ddl_kernels.py's fused kernel; None: wherever it runs
    grad_clip: float = 1.0            # max gradient norm, as in train.py; 0 turns clipping off (nanoGPT's bench.py has none)
    gpu_peak_tflops: float | None = None  # the GPU's peak, for MFU on a GPU missing from the table


def bench_mode(cfg, config, device, dtype, plan):
    torch.manual_seed(0)
    model = GPT(config).to(device)
    fused, _ = use_kernels(model, cfg.fused, plan.on)
    optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), device.type)
    step_model = torch.compile(model, mode=plan.mode) if plan.on else model
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


def mode_configs(cfg):
    """The GPTConfig of each mode of --modes ("add,delta,delta:4"), the settings' shape with its residual and d_v."""
    configs = []
    for item in cfg.modes.split(","):
        try:
            residual, d_v = parse_mode(item.strip())
            configs.append(model_config(cfg, residual=residual, d_v=d_v or 1))
        except (ValueError, ConfigError) as error:
            raise ConfigError(f"--modes: {item!r} is not a mode ({error}); write {MODE_SYNTAX}") from None
    return configs


def main(argv):
    cfg = BenchConfig(**parse_overrides(BenchConfig, argv))
    check_counts(cfg, at_least_one=["n_layer", "n_head", "n_embd", "block_size", "batch_size", "vocab_size", "steps"],
                 not_negative=["warmup", "grad_clip"])
    check_speed_settings(cfg.compile_mode, cfg.gpu_peak_tflops)
    model_config(cfg)  # the shape's own checks (head sizes, state_dtype) first, named as settings
    configs = mode_configs(cfg)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    for config in configs:
        if config.residual != "add":  # add runs as the reference whatever --fused says
            check_fused(cfg.fused, device, config)
    check_memory(max(configs, key=lambda config: config.d_v), cfg.batch_size, device,
                 "Lower --batch_size and --block_size, or run it on a GPU.")
    plan = compile_plan(cfg.compile, cfg.compile_mode, device)
    torch.set_float32_matmul_precision("high")
    peak = peak_tflops(device, cfg.gpu_peak_tflops) if dtype != "float32" else None
    print(f"{device_name(device)}, torch {torch.__version__}, {dtype}, compile {plan.on}; {cfg.n_layer}L "
          f"d={cfg.n_embd} {cfg.n_head} heads, T={cfg.block_size}, B={cfg.batch_size}", flush=True)
    rows, reference = [], None
    for config in configs:
        residual, d_v = config.residual, config.d_v
        seconds, memory, t_compile, flops, params, fused = bench_mode(cfg, config, device, dtype, plan)
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
