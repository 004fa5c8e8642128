"""
Generate text from a trained model.

    python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=2
    python sample.py --out_dir=out-books --start=FILE:prompt.txt --max_new_tokens=200
    python sample.py --bench          # new tokens/s with and without the KV cache (no checkpoint needed)

The checkpoint carries its own tokenizer: a character vocabulary, which needs nothing else, or GPT-2's BPE,
which needs tiktoken's two files (vocab.bpe, encoder.json): tiktoken downloads them once into its cache;
offline, point TIKTOKEN_CACHE_DIR at a folder that holds them. By default the weights with the lowest
validation loss (best.pt). One line on stderr first says which checkpoint was loaded. The samples run
together as one batch (at most --max_batch at a time; each sample draws from its own random stream, so it
is the same in any batch); the first sample of a batch is printed token by token, the others once complete.
Generation (generate.py) reads the prompt once, then each new token with a cache of attention's keys and
values; on a CUDA GPU each token's step is replayed as a CUDA graph (--compile=True fuses it first, for
long generations).
"""

import time

STARTED = time.perf_counter()  # before torch is imported: --bench reports the time to the first token from here

import dataclasses  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from ddl_gpt import GPT, GPTConfig  # noqa: E402
from generate import cast_weights, generate  # noqa: E402
from support.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from support.configurator import ConfigError, parse_overrides, run_cli  # noqa: E402
from support.device import pick_device, pick_dtype  # noqa: E402
from support.speed import check_fused, compile_blocker, use_kernels  # noqa: E402
from support.tokenizer import from_meta  # noqa: E402


@dataclasses.dataclass
class SampleConfig:
    out_dir: str = "out"           # the training run's folder
    checkpoint: str = "best"       # "best" (lowest validation loss) or "ckpt" (the latest)
    start: str = ""                # the prompt, or FILE:path to read it; "" starts from a newline
                                   # (characters) or <|endoftext|> (GPT-2), i.e. unprompted
    num_samples: int = 3           # how many samples: the first of a batch printed token by token, the rest when done
    max_new_tokens: int = 500      # 0 prints the prompt alone
    temperature: float = 0.8       # < 1 sharpens the distribution, > 1 flattens it; 0 takes the likeliest token
    top_k: int | None = 200        # sample only among the k likeliest tokens; None: all of them
    seed: int = 1337               # sample i draws from its own random stream of (seed, i)
    max_batch: int = 64            # samples generated together at most; lower it if memory runs short
    device: str = "auto"           # auto picks cuda > mps > cpu
    dtype: str = "auto"            # auto: bfloat16 on GPUs that have it, else float32
    fused: bool | None = None      # ddl_kernels.py's Triton kernels (delta writes, attention inputs); None: where they run
                                   # and the step is not compiled
    compile: bool = False          # torch.compile the decode step: fewer kernels per token, for tens of seconds at
                                   # the start (pays off over thousands of tokens; docs/PERFORMANCE.md)
    bench: bool = False            # tokens/s with and without the KV cache (random baby-GPT weights unless --out_dir)


def check(cfg):
    """Refuse impossible settings before anything is loaded."""
    if cfg.checkpoint not in ("best", "ckpt"):
        raise ConfigError(f"--checkpoint={cfg.checkpoint!r}; expected 'best' or 'ckpt'")
    for key in ("num_samples", "max_batch"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"--{key}={getattr(cfg, key)}; expected 1 or more")
    if cfg.max_new_tokens < 0:
        raise ConfigError(f"--max_new_tokens={cfg.max_new_tokens}; expected 0 or more")
    if cfg.temperature < 0:
        raise ConfigError(f"--temperature={cfg.temperature}; expected > 0, or 0 for the likeliest token")
    if cfg.top_k is not None and cfg.top_k < 1:
        raise ConfigError(f"--top_k={cfg.top_k}; expected 1 or more, or None for all tokens")
    if not 0 <= cfg.seed < 2**31:  # each sample's stream is seeded with seed * 1,000,003 + i, which must fit 64 bits
        raise ConfigError(f"--seed={cfg.seed}; expected an integer in [0, 2^31)")


def read_prompt(start):
    """The prompt text: `start` itself, or the contents of the file that FILE:path names."""
    if not start.startswith("FILE:"):
        return start
    if not start[5:]:
        raise ConfigError("--start=FILE: names no file; write --start=FILE:path/to/prompt.txt")
    path = Path(start[5:]).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"prompt file {path} not found") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"prompt file {path} is not UTF-8 text (byte {error.start}); save it as UTF-8") from None
    except OSError as error:
        raise ConfigError(f"prompt file {path} cannot be read ({error.strerror or error})") from None


def prompt_ids(start, tokenizer):
    if start:
        return tokenizer.encode(start)
    return [tokenizer.end_of_text] if tokenizer.kind == "gpt2" else tokenizer.encode("\n")


def describe(path, state):
    """One line about a checkpoint: where, when in training, how good, which model."""
    args, val = state.get("model_args", {}), state.get("val_loss", state.get("best_val_loss"))
    loss = f"val loss {val:.4f}" if isinstance(val, float) else "no val loss"
    return (f"loaded {path}: iter {state.get('iter_num', '?')}, {loss}, "
            f"residual={args.get('residual', '?')}, d_v={args.get('d_v', '?')}")


def new_text(tokenizer, ids, shown):
    """What the decoding of ids adds to `shown` (the decoding so far), or "" while it ends inside a
    character: a GPT-2 token can end part-way through a multi-byte character, which decodes to U+FFFD."""
    text = tokenizer.decode(ids)
    return "" if text.endswith("\ufffd") else text[len(shown):]


def pick_device_for(cfg):
    """The device to generate on (--device), refusing --compile=True where torch.compile cannot run there."""
    device = pick_device(cfg.device)
    if cfg.compile and compile_blocker(device):
        raise ConfigError(f"--compile=True: {compile_blocker(device)}; use --compile=False")
    return device


def prepare_model(model, cfg, device, dtype):
    """The model on its device, in evaluation mode, its matrix weights stored in the generation's dtype, with the
    fused kernels where they can run (or as --fused says); and whether they run."""
    check_fused(cfg.fused, device, model.config)
    model = cast_weights(model.to(device).eval(), dtype)
    return model, use_kernels(model, cfg.fused, compiled=cfg.compile, generation=True)[0]


def sample(cfg, out=None):
    """The generated texts, prompts included; with `out` (a text stream), each is written there in order: the
    first sample of each batch token by token, the others as soon as they are complete."""
    check(cfg)
    start = read_prompt(cfg.start)
    device = pick_device_for(cfg)
    dtype = pick_dtype(cfg.dtype, device)
    path = Path(cfg.out_dir) / f"{cfg.checkpoint}.pt"  # the configurator has expanded a leading ~
    state = load_checkpoint(path)
    print(describe(path, state), file=sys.stderr, flush=True)
    tokenizer = from_meta(state["tokenizer"])
    ids = prompt_ids(start, tokenizer)
    model, _ = prepare_model(model_from_checkpoint(state), cfg, device, dtype)
    if len(ids) > model.config.block_size:
        print(f"note: the prompt has {len(ids)} tokens; the model sees only the last {model.config.block_size}",
              file=sys.stderr)

    def write(text):
        if out is not None:
            out.write(text)
            out.flush()

    prompt = tokenizer.decode(ids) if start else ""
    end = tokenizer.end_of_text if tokenizer.kind == "gpt2" else None  # a GPT-2 document ended: the sample stops
    texts = []
    for first in range(0, cfg.num_samples, cfg.max_batch):
        B = min(cfg.max_batch, cfg.num_samples - first)
        x = torch.tensor(ids, dtype=torch.long, device=device).expand(B, -1)  # (B, T)
        new, done, shown = [[] for _ in range(B)], [False] * B, ""

        def print_complete(everything=False):
            """Print the batch's samples, in order, that are complete (or, with everything, all that are left)."""
            while len(texts) < first + B and (everything or done[len(texts) - first]):
                i = len(texts) - first
                texts.append(finish(prompt, tokenizer.decode(new[i]), i == 0, shown, write))

        write(prompt)  # the batch's first sample is printed token by token, the others once complete
        try:
            for step in generate(model, x, cfg.max_new_tokens, cfg.temperature, cfg.top_k, tokenizer.vocab_size,
                                 cfg.seed, first, dtype, compile=cfg.compile):
                for i, token in enumerate(step):
                    done[i] = done[i] or token == end
                    if not done[i]:
                        new[i].append(token)
                if not done[0]:
                    piece = new_text(tokenizer, new[0], shown)
                    write(piece)
                    shown += piece
                print_complete()
                if all(done):
                    break
        finally:  # at the end, or on Ctrl-C: what the batch's remaining samples have so far
            print_complete(everything=True)
    return texts


def finish(prompt, text, streamed, shown, write):
    """Write what is left of one sample (all of it, unless it was `streamed`, with `shown` already written) and its
    separator; return the sample, prompt included."""
    write((text[len(shown):] if streamed else prompt + text) + "\n" + "-" * 40 + "\n")
    return prompt + text


def timed_generation(model, batch, count, dtype, use_cache, compile=False):
    """The new tokens of one greedy generation of `count` tokens from a one-token prompt, and the time from its
    start to each token's arrival. Time one path at a time, never two taking turns: the cached path launches
    its next step before it hands out a token, and that step's work must not land in the other path's time."""
    x = torch.zeros(batch, 1, dtype=torch.long, device=next(model.parameters()).device)  # (B, 1)
    tokens, stamps, t0 = [], [], time.perf_counter()
    for step in generate(model, x, count, temperature=0, dtype=dtype, use_cache=use_cache, compile=compile):
        tokens.append(step)
        stamps.append(time.perf_counter() - t0)
    return tokens, stamps


def rates(batch, stamps, block_size):
    """The time to the first token, then the rate after it: over every later token, and within block_size."""
    line = f"first token after {stamps[0] * 1e3:,.1f} ms"
    if len(stamps) > 1:
        line += f", then {batch * (len(stamps) - 1) / (stamps[-1] - stamps[0]):,.0f}/s"
    if len(stamps) >= block_size:  # from the second token to the last that fits the cache without a re-read
        k = block_size - 1
        line += f" (tokens 2-{k}: {batch * (k - 1) / (stamps[k - 1] - stamps[0]):,.0f}/s)"
    return line


def bench(cfg, from_checkpoint):
    """Print new tokens per second with and without the KV cache, greedy from a one-token prompt, at batch 1 and
    batch 8 (new tokens of all samples per second): over all of them, and after the first (which carries the
    one-time costs: CUDA graph capture, Triton's and torch.compile's compilation); and the time from the
    script's start to the first token."""
    check(cfg)
    if cfg.max_new_tokens < 1:
        raise ConfigError("--bench times --max_new_tokens tokens: give 1 or more")
    device = pick_device_for(cfg)
    dtype = pick_dtype(cfg.dtype, device)
    if from_checkpoint:
        model = model_from_checkpoint(load_checkpoint(Path(cfg.out_dir) / f"{cfg.checkpoint}.pt"))
    else:  # the shape of config/shakespeare_char.py, random weights
        torch.manual_seed(cfg.seed)
        model = GPT(GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65))
    (model, fused), c, n = prepare_model(model, cfg, device, dtype), model.config, cfg.max_new_tokens

    def timed(batch, count, use_cache):
        return timed_generation(model, batch, count, dtype, use_cache, compile=cfg.compile and use_cache)

    before = time.perf_counter()
    first_token = before - STARTED + timed(1, 1, use_cache=True)[1][0]
    print(f"{c.n_layer} layers x {c.n_embd} wide, block_size {c.block_size}, residual={c.residual}, d_v={c.d_v}, "
          f"{device.type} {dtype}, {'kernels of ddl_kernels.py' if fused else 'plain PyTorch (no fused kernels)'}"
          f"{', decode step compiled' if cfg.compile else ''}")
    for batch in (1, 8):
        (cached, t_cached), (uncached, t_uncached) = timed(batch, n, True), timed(batch, n, False)
        speed = [batch * n / t[-1] for t in (t_cached, t_uncached)]
        print(f"  batch {batch}: {n} new tokens, cached {speed[0]:,.0f} tokens/s, uncached {speed[1]:,.0f} "
              f"({speed[0] / speed[1]:.1f}x); same tokens both ways: {cached == uncached}")
        print(f"    cached: {rates(batch, t_cached, c.block_size)}; uncached: {rates(batch, t_uncached, c.block_size)}")
    print(f"  from the script's start to the first new token: {first_token:.2f} s")


def main(argv):
    overrides = parse_overrides(SampleConfig, argv)
    cfg = SampleConfig(**overrides)
    if cfg.bench:
        return bench(cfg, from_checkpoint="out_dir" in overrides)
    sample(cfg, out=sys.stdout)  # on Ctrl-C it prints the partial samples; run_cli then says "interrupted", status 130


if __name__ == "__main__":
    run_cli(main, SampleConfig, __doc__, sys.argv[1:])
