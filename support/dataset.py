"""
A prepared dataset as train.py reads it: meta.json, and train.bin and val.bin (token ids as uint16)
read through memory maps, checked against each other before any training starts.
"""

from pathlib import Path

import numpy as np
import torch

from support.configurator import TrainingError
from support.readback import read_json

PREPARE_AGAIN = "prepare the dataset again"


class TokenFile:
    """One split of a dataset: token ids (uint16) and, for tasks with answers, which tokens are answers
    (a uint16 file beside it: 0, or how many tokens back the answer's example starts)."""

    def __init__(self, path, block_size, recorded=None):
        self.tokens = self.read(path)
        self.block_size = block_size
        n = len(self.tokens)
        if recorded is not None and recorded != n:  # meta.json counts the tokens that prepare.py wrote
            fits = "" if n > block_size + 1 else f", too few for --block_size={block_size}"
            raise TrainingError(f"{path} holds {n:,} tokens{fits} but meta.json records {recorded:,}: the file is "
                                f"cut short or belongs to another dataset; {PREPARE_AGAIN}")
        if n <= block_size + 1:
            raise TrainingError(f"{path} holds {n:,} tokens, too few for block_size={block_size}; "
                                "lower --block_size or add text")
        answers = path.with_name(path.stem + "_answers.bin")
        self.answers = self.read(answers) if answers.is_file() else None
        if self.answers is not None and len(self.answers) != len(self.tokens):
            raise TrainingError(f"{answers} does not match {path} (lengths differ); {PREPARE_AGAIN}")

    @staticmethod
    def read(path):
        size = path.stat().st_size
        if size % 2:
            raise TrainingError(f"{path} is damaged (an odd number of bytes cannot hold uint16 tokens); {PREPARE_AGAIN}")
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


def read_meta(folder, dataset, data_dir):
    """meta.json of a dataset folder, checked; a missing one names the command that prepares it."""
    if not (folder / "meta.json").is_file():
        script = folder / "prepare.py"
        target = f"--name={dataset}" if Path(data_dir) == Path("data") else f"--out_dir={folder}"
        how = (f"python {script}" if script.is_file() else
               f"python data/prepare.py --input=YOUR_TEXT {target}  (a text file or a folder of .txt files)")
        raise TrainingError(f"dataset {dataset!r} is not prepared: {folder}/meta.json is missing. Run: {how}")
    meta = read_json(folder / "meta.json", PREPARE_AGAIN)
    try:
        vocab_size, tokenizer = meta["vocab_size"], meta["tokenizer"]
        counts = [meta.get(f"{split}_tokens", 0) for split in ("train", "val")]  # recorded by data/prepare.py
        if (type(vocab_size) is not int or not 1 <= vocab_size <= 2**16 or tokenizer not in ("char", "gpt2")
                or any(type(count) is not int for count in counts)):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise TrainingError(f"{folder}/meta.json is damaged; {PREPARE_AGAIN}") from None
    return meta


def open_dataset(cfg):
    """meta.json, and the train and validation TokenFiles of the dataset, checked against meta.json: as
    many tokens as it records, and every id inside its vocabulary (one past it would crash the embedding)."""
    folder = Path(cfg.data_dir) / cfg.dataset
    meta = read_meta(folder, cfg.dataset, cfg.data_dir)
    splits = []
    for split in ("train", "val"):
        path = folder / f"{split}.bin"
        if not path.is_file():
            raise TrainingError(f"{path} is missing; {PREPARE_AGAIN}")
        data = TokenFile(path, cfg.block_size, meta.get(f"{split}_tokens"))
        if data.tokens.max() >= meta["vocab_size"]:  # one pass over the file
            raise TrainingError(f"{path} holds token id {data.tokens.max()}, outside the vocabulary of "
                                f"{meta['vocab_size']} in meta.json: the files do not belong together; {PREPARE_AGAIN}")
        splits.append(data)
    return meta, *splits
