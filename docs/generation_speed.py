"""
Where generation's time goes, on a CUDA GPU (docs/PERFORMANCE.md, Generation, quotes its output).

    python docs/generation_speed.py                      # whole generations, baby GPT shape, every mode
    python docs/generation_speed.py --what=steps         # one step's cost and its kernels
    python docs/generation_speed.py --what=steps --shape=gpt2 --batch_sizes=1,8
    python docs/generation_speed.py --what=compiled      # the decode step compiled (sample.py --compile=True)

Random weights (speed does not depend on them), greedy from a one-token prompt, the model prepared as
sample.py prepares it (weights stored in the generation's dtype; the fused kernels as sample.py picks them: on,
but off in a compiled step; --fused=False: off everywhere).
- whole: generate() alone for 500 tokens after a warm-up generation (Triton's kernels compiled): the time
  to the first token (prefill and the decode step's capture) and to the last, as a user waits for them.
- steps: one decode step and one re-read past block_size, each replayed as a CUDA graph, waiting for
  every step's tokens (no step launched ahead); and the kernels of one step, from the profiler.
- compiled: generate(compile=True) twice: the first time with its compilation, then again.
"""

import collections
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from ddl_gpt import GPT, GPTConfig  # noqa: E402
from generate import Decoder, Draws, KVCache, cast_weights, precision  # noqa: E402
from sample import rates, timed_generation  # noqa: E402
from support.configurator import ConfigError, parse_overrides, run_cli  # noqa: E402
from support.speed import use_kernels  # noqa: E402

SHAPES = {"baby": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65),
          "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)}
MODES = {"add": dict(residual="add"), "delta": dict(residual="delta"), "delta:4": dict(residual="delta", d_v=4)}


@dataclasses.dataclass
class SpeedConfig:
    what: str = "whole"          # whole, steps or compiled
    shape: str = "baby"          # baby (config/shakespeare_char.py) or gpt2 (GPT-2 small)
    modes: str = "add,delta,delta:4"
    dtypes: str = "bfloat16,float32"
    batch_sizes: str = "1,8"
    tokens: int = 500            # new tokens per generation (whole, compiled)
    fused: bool = True           # ddl_kernels.py's kernels as sample.py picks them; False: plain PyTorch everywhere


def model_for(shape, mode, dtype, fused=True, compiled=False):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SHAPES[shape], **MODES[mode])).cuda().eval()
    use_kernels(model, None if fused else False, compiled, generation=True)  # as sample.py decides
    return cast_weights(model, dtype)


def summary(model, batch, dtype, tokens, compile=False):
    """One cached generation of `tokens` tokens, as a user waits for it: the rate over all of them, then
    sample.py --bench's line (the first token, the rate after it, and within block_size)."""
    stamps = timed_generation(model, batch, tokens, dtype, use_cache=True, compile=compile)[1]
    overall = batch * len(stamps) / stamps[-1]
    return f"all {len(stamps)}: {overall:,.0f}/s; {rates(batch, stamps, model.config.block_size)}"


def ms_per_call(fn, calls):
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e3


def steps(model, batch, dtype):
    """ms per decode step and per re-read, graph-replayed, each waiting for its tokens; kernels per decode step."""
    decoder = Decoder(model, KVCache(model.config, batch, torch.device("cuda")), Draws(0, 0, batch, "cuda"),
                      (0, None, None), use_graph=True)
    with precision("cuda", dtype):
        decoder.prefill(torch.zeros(batch, 1, dtype=torch.long, device="cuda"))
        decoder.step()                                             # captures the decode step
        decode = ms_per_call(lambda: decoder.step().tolist(), min(200, model.config.block_size - 3))
        while decoder.cache.length < model.config.block_size:
            decoder.step()
        decoder.step()                                             # captures the re-read
        reread = ms_per_call(lambda: decoder.step().tolist(), 50)
        eager = Decoder(model, KVCache(model.config, batch, torch.device("cuda")), Draws(0, 0, batch, "cuda"),
                        (0, None, None), use_graph=False)
        eager.cache.fixed_shapes = True                            # the same kernels as the graph, one by one
        eager.prefill(torch.zeros(batch, 1, dtype=torch.long, device="cuda"))
        eager.step()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
            for _ in range(10):
                eager.step()
            torch.cuda.synchronize()
    kernels, count = collections.Counter(), 0          # GPU time (us) per kernel name, and launches, per step
    for event in profile.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name[:60]] += event.device_time / 10
            count += 1
    return decode, reread, count / 10, kernels


def main(argv):
    cfg = SpeedConfig(**parse_overrides(SpeedConfig, argv))
    if cfg.what not in ("whole", "steps", "compiled") or cfg.shape not in SHAPES:
        raise ConfigError(f"--what={cfg.what!r} --shape={cfg.shape!r}: expected whole, steps or compiled; baby or gpt2")
    modes, dtypes = cfg.modes.split(","), cfg.dtypes.split(",")
    if not set(modes) <= set(MODES) or not set(dtypes) <= {"float32", "bfloat16", "float16"}:
        raise ConfigError(f"--modes={cfg.modes!r} --dtypes={cfg.dtypes!r}: modes among {', '.join(MODES)}; "
                          f"dtypes among float32, bfloat16, float16")
    if not torch.cuda.is_available():
        raise ConfigError("this script times generation on a CUDA GPU, and none is here")
    batches = [int(b) for b in cfg.batch_sizes.split(",")]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, shape {cfg.shape}, "
          f"ddl_kernels {'on' if cfg.fused else 'off (--fused=False)'}")
    for mode in modes:
        for dtype in dtypes:
            model = model_for(cfg.shape, mode, dtype, cfg.fused, compiled=cfg.what == "compiled")
            for batch in batches:
                if cfg.what == "whole":
                    timed_generation(model, batch, cfg.tokens, dtype, use_cache=True)       # warm-up
                    line = summary(model, batch, dtype, cfg.tokens)
                elif cfg.what == "compiled":
                    torch._dynamo.reset()
                    first = summary(model, batch, dtype, cfg.tokens, compile=True)
                    line = f"first run: {first}\n    again: {summary(model, batch, dtype, cfg.tokens, compile=True)}"
                else:
                    decode, reread, count, kernels = steps(model, batch, dtype)
                    line = (f"decode step {decode:.3f} ms ({batch * 1e3 / decode:,.0f} tokens/s), "
                            f"re-read {reread:.3f} ms; "
                            f"{count:.0f} kernels per decode step, {sum(kernels.values()):.0f} us of GPU time:")
                    line += "".join(f"\n      {us:6.1f} us  {name}" for name, us in kernels.most_common(8))
                print(f"{mode} {dtype} batch {batch}: {line}", flush=True)
            del model
            torch.cuda.empty_cache()


if __name__ == "__main__":
    run_cli(main, SpeedConfig, __doc__, sys.argv[1:])
