"""
Generate text from a trained model.

    python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=2
    python sample.py --out_dir=out-books --start=FILE:prompt.txt --max_new_tokens=200

The checkpoint carries its own tokenizer (a character vocabulary, or GPT-2's BPE), so a sample needs
nothing but the checkpoint folder. By default the weights with the lowest validation loss (best.pt).
"""

import dataclasses
import sys
from pathlib import Path

import torch

from configurator import ConfigError, parse_overrides, run_cli
from runtime import autocast_for, load_checkpoint, model_from_checkpoint, pick_device, pick_dtype
from tokenizer import from_meta


@dataclasses.dataclass
class SampleConfig:
    out_dir: str = "out"           # the training run's folder
    checkpoint: str = "best"       # "best" (lowest validation loss) or "ckpt" (the latest)
    start: str = ""                # the prompt, or FILE:path to read it; "" starts from a newline
                                   # (characters) or <|endoftext|> (GPT-2), i.e. unprompted
    num_samples: int = 3
    max_new_tokens: int = 500
    temperature: float = 0.8       # < 1 sharpens the distribution, > 1 flattens it
    top_k: int | None = 200        # sample only among the k likeliest tokens; None: all of them
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"


def prompt_ids(start, tokenizer):
    if start.startswith("FILE:"):
        path = Path(start[5:])
        if not path.is_file():
            raise ConfigError(f"prompt file {path} not found")
        start = path.read_text(encoding="utf-8")
    if start:
        return tokenizer.encode(start)
    return [tokenizer.end_of_text] if tokenizer.kind == "gpt2" else tokenizer.encode("\n")


def sample(cfg):
    """The generated texts, prompts included."""
    if cfg.checkpoint not in ("best", "ckpt"):
        raise ConfigError(f"checkpoint={cfg.checkpoint!r}; expected 'best' or 'ckpt'")
    state = load_checkpoint(Path(cfg.out_dir) / f"{cfg.checkpoint}.pt")
    tokenizer = from_meta(state["tokenizer"])
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    model = model_from_checkpoint(state).to(device).eval()
    ids = prompt_ids(cfg.start, tokenizer)
    if len(ids) > model.config.block_size:
        print(f"note: the prompt has {len(ids)} tokens; the model sees only the last {model.config.block_size}",
              file=sys.stderr)
    torch.manual_seed(cfg.seed)
    x = torch.tensor(ids, dtype=torch.long, device=device)[None, :].repeat(cfg.num_samples, 1)  # (N, T)
    with autocast_for(device, dtype):
        y = model.generate(x, cfg.max_new_tokens, cfg.temperature, cfg.top_k, vocab_limit=tokenizer.vocab_size)
    prompt = tokenizer.decode(ids) if cfg.start else ""
    texts = []
    for row in y.tolist():
        new = row[len(ids):]
        if tokenizer.kind == "gpt2" and tokenizer.end_of_text in new:  # a document ended: stop there
            new = new[:new.index(tokenizer.end_of_text)]
        texts.append(prompt + tokenizer.decode(new))
    return texts


def main(argv):
    texts = sample(SampleConfig(**parse_overrides(SampleConfig, argv)))
    for text in texts:
        print(text)
        print("-" * 40)


if __name__ == "__main__":
    run_cli(main, SampleConfig, __doc__, sys.argv[1:])
