"""
Measure training speed and memory of the residual modes side by side, on random tokens.

    python bench.py                                    # GPT-2 small shape: add, delta, delta d_v=4
    python bench.py --n_layer=6 --n_embd=384 --n_head=6 --block_size=256 --batch_size=64 --modes=add,delta

Each mode runs `warmup` full training steps (forward, backward, AdamW; compiled where train.py would
compile), then `steps` timed ones; the table gives the median step time, tokens/s, MFU, peak memory,
and each mode's throughput as a ratio to the first mode's.
"""

import dataclasses
import statistics
import sys
import time
from contextlib import nullcontext

import torch

from configurator import ConfigError, parse_overrides
from ddl_gpt import GPT, GPTConfig
from train import peak_tflops, pick_device, pick_dtype


@dataclasses.dataclass
class BenchConfig:
    modes: str = "add,delta,delta:4"  # residual[:d_v], comma-separated; the first is the reference
    n_layer: int = 12
    n_head: int = 6
    n_embd: int = 768
    block_size: int = 1024
    batch_size: int = 16
    vocab_size: int = 50304
    warmup: int = 10
    steps: int = 30
    device: str = "auto"
    dtype: str = "auto"
    compile: bool | None = None
    gpu_peak_tflops: float | None = None


def bench_mode(cfg, residual, d_v, device, dtype, use_compile):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=cfg.block_size,
                          vocab_size=cfg.vocab_size, residual=residual, d_v=d_v)).to(device)
    optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.95), device.type)
    step_model = torch.compile(model) if use_compile else model
    autocast = torch.autocast(device.type, dtype=getattr(torch, dtype)) if dtype != "float32" else nullcontext()
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
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if i == 0:
            t_compile = time.time() - t_compile
        if i >= cfg.warmup:
            times.append(time.time() - t0)
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times), memory, t_compile, model.flops_per_token(), model.num_params()


def main(argv):
    try:
        cfg = BenchConfig(**parse_overrides(BenchConfig, argv))
        modes = [(m.split(":")[0], int(m.split(":")[1]) if ":" in m else 1) for m in cfg.modes.split(",")]
        device = pick_device(cfg.device)
        dtype = pick_dtype(cfg.dtype, device)
    except (ConfigError, ValueError) as error:
        sys.exit(f"error: {error}")
    use_compile = cfg.compile if cfg.compile is not None else device.type == "cuda"
    torch.set_float32_matmul_precision("high")
    peak = peak_tflops(cfg, device) if dtype != "float32" else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    print(f"{name}, torch {torch.__version__}, {dtype}, compile {use_compile}; {cfg.n_layer}L d={cfg.n_embd} "
          f"{cfg.n_head} heads, T={cfg.block_size}, B={cfg.batch_size}")
    rows, reference = [], None
    for residual, d_v in modes:
        seconds, memory, t_compile, flops, params = bench_mode(cfg, residual, d_v, device, dtype, use_compile)
        tokens_per_sec = cfg.batch_size * cfg.block_size / seconds
        reference = reference or tokens_per_sec
        mfu = f"{100 * flops * tokens_per_sec / (peak * 1e12):.1f}%" if peak else "-"
        rows.append(f"| {residual} d_v={d_v} | {params / 1e6:.2f}M | {1000 * seconds:.1f} | {tokens_per_sec / 1000:,.1f}k | "
                    f"{mfu} | {memory:.1f} GiB | {tokens_per_sec / reference:.2f}x | {t_compile:.0f} s |")
        print(rows[-1], flush=True)
    print("\n| mode | params | ms/step | tokens/s | MFU | peak memory | throughput vs first | first step |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
