"""
Generate text from a trained model.

    python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=2
    python sample.py --out_dir=out-books --start=FILE:prompt.txt --max_new_tokens=200
    python sample.py --bench          # new tokens/s with and without the KV cache (no checkpoint needed)

The checkpoint carries its own tokenizer (a character vocabulary, or GPT-2's BPE), so a sample needs
nothing but the checkpoint folder. By default the weights with the lowest validation loss (best.pt).
Each sample is printed as it is generated (one line on stderr first says which checkpoint was loaded);
generation keeps a cache of attention's keys and values (GPT.generate), so each new token reads only itself.
"""

import dataclasses
import sys
import time
from pathlib import Path

import torch

from support.configurator import ConfigError, parse_overrides, run_cli
from ddl_gpt import GPT, GPTConfig
from support.checkpoint import load_checkpoint, model_from_checkpoint
from support.device import autocast_for, pick_device, pick_dtype
from support.tokenizer import from_meta


@dataclasses.dataclass
class SampleConfig:
    out_dir: str = "out"           # the training run's folder
    checkpoint: str = "best"       # "best" (lowest validation loss) or "ckpt" (the latest)
    start: str = ""                # the prompt, or FILE:path to read it; "" starts from a newline
                                   # (characters) or <|endoftext|> (GPT-2), i.e. unprompted
    num_samples: int = 3           # how many samples, each printed as it is generated
    max_new_tokens: int = 500      # 0 prints the prompt alone
    temperature: float = 0.8       # < 1 sharpens the distribution, > 1 flattens it; 0 takes the likeliest token
    top_k: int | None = 200        # sample only among the k likeliest tokens; None: all of them
    seed: int = 1337               # the sampling draws follow from it
    device: str = "auto"           # auto picks cuda > mps > cpu
    dtype: str = "auto"            # auto: bfloat16 on GPUs that have it, else float32
    bench: bool = False            # tokens/s with and without the KV cache (random baby-GPT weights unless --out_dir)


def check(cfg):
    """Refuse impossible settings before anything is loaded."""
    if cfg.checkpoint not in ("best", "ckpt"):
        raise ConfigError(f"--checkpoint={cfg.checkpoint!r}; expected 'best' or 'ckpt'")
    if cfg.num_samples < 1:
        raise ConfigError(f"--num_samples={cfg.num_samples}; expected 1 or more")
    if cfg.max_new_tokens < 0:
        raise ConfigError(f"--max_new_tokens={cfg.max_new_tokens}; expected 0 or more")
    if cfg.temperature < 0:
        raise ConfigError(f"--temperature={cfg.temperature}; expected > 0, or 0 for the likeliest token")
    if cfg.top_k is not None and cfg.top_k < 1:
        raise ConfigError(f"--top_k={cfg.top_k}; expected 1 or more, or None for all tokens")


def read_prompt(start):
    """The prompt text: `start` itself, or the contents of the file that FILE:path names."""
    if not start.startswith("FILE:"):
        return start
    if not start[5:]:
        raise ConfigError("--start=FILE: names no file; write --start=FILE:path/to/prompt.txt")
    path = Path(start[5:])
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


def sample(cfg, out=None):
    """The generated texts, prompts included; with `out` (a text stream), each is written there as it grows."""
    check(cfg)
    start = read_prompt(cfg.start)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    path = Path(cfg.out_dir) / f"{cfg.checkpoint}.pt"
    state = load_checkpoint(path)
    print(describe(path, state), file=sys.stderr, flush=True)
    tokenizer = from_meta(state["tokenizer"])
    ids = prompt_ids(start, tokenizer)
    model = model_from_checkpoint(state).to(device).eval()
    if len(ids) > model.config.block_size:
        print(f"note: the prompt has {len(ids)} tokens; the model sees only the last {model.config.block_size}",
              file=sys.stderr)

    def write(text):
        if out is not None:
            out.write(text)
            out.flush()

    torch.manual_seed(cfg.seed)
    x = torch.tensor(ids, dtype=torch.long, device=device)[None, :]  # (1, T)
    prompt = tokenizer.decode(ids) if start else ""
    texts = []
    for _ in range(cfg.num_samples):
        write(prompt)
        new, shown = [], ""
        with autocast_for(device, dtype):
            for next_id in model.stream(x, cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                                        vocab_limit=tokenizer.vocab_size):
                token = next_id.item()
                if tokenizer.kind == "gpt2" and token == tokenizer.end_of_text:  # a document ended: stop there
                    break
                new.append(token)
                piece = new_text(tokenizer, new, shown)
                write(piece)
                shown += piece
        text = tokenizer.decode(new)
        write(text[len(shown):] + "\n" + "-" * 40 + "\n")
        texts.append(prompt + text)
    return texts


def bench(cfg, from_checkpoint):
    """Print new tokens per second with and without the KV cache, greedy from a one-token prompt; the two
    paths take turns token by token, so that both see the same load on a shared machine. Past block_size
    both re-read the last block_size tokens for every new one: the cache helps within the context."""
    check(cfg)
    if cfg.max_new_tokens < 1:
        raise ConfigError("--bench times --max_new_tokens tokens: give 1 or more")
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)
    if from_checkpoint:
        model = model_from_checkpoint(load_checkpoint(Path(cfg.out_dir) / f"{cfg.checkpoint}.pt"))
    else:  # the shape of config/shakespeare_char.py, random weights
        model = GPT(GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65))
    model, c, n = model.to(device).eval(), model.config, cfg.max_new_tokens
    x = torch.zeros(1, 1, dtype=torch.long, device=device)  # (1, 1)
    streams = {use_cache: model.stream(x, n, temperature=0, use_cache=use_cache) for use_cache in (True, False)}
    tokens, seconds = {True: [], False: []}, {True: [], False: []}
    with autocast_for(device, dtype):
        model.generate(x, 8, temperature=0)  # warm-up
        for _ in range(n):
            for use_cache, stream in streams.items():
                t0 = time.perf_counter()
                tokens[use_cache].append(next(stream).item())
                seconds[use_cache].append(time.perf_counter() - t0)

    def rates(k):
        cached, uncached = k / sum(seconds[True][:k]), k / sum(seconds[False][:k])
        return f"with the cache {cached:.1f} tokens/s, without {uncached:.1f} ({cached / uncached:.1f}x)"

    print(f"{c.n_layer} layers x {c.n_embd} wide, block_size {c.block_size}, residual={c.residual}, d_v={c.d_v}, "
          f"{device.type} {dtype}; same tokens with and without the cache: {tokens[True] == tokens[False]}")
    if n >= c.block_size:  # the one-token prompt and block_size - 1 new ones fill the context
        print(f"  the first {c.block_size - 1} new tokens (within the context): {rates(c.block_size - 1)}")
    print(f"  all {n} new tokens: {rates(n)}")


def main(argv):
    overrides = parse_overrides(SampleConfig, argv)
    cfg = SampleConfig(**overrides)
    if cfg.bench:
        return bench(cfg, from_checkpoint="out_dir" in overrides)
    try:
        sample(cfg, out=sys.stdout)
    except KeyboardInterrupt:
        print(flush=True)  # end the partial sample's line; run_cli then says "interrupted" and exits 130
        raise


if __name__ == "__main__":
    run_cli(main, SampleConfig, __doc__, sys.argv[1:])
