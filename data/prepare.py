"""
Turn your own text into a dataset that train.py reads with --dataset=NAME.

    python data/prepare.py --input=my_book.txt --name=my_book                  # characters
    python data/prepare.py --input=folder_of_txt_files --name=books --tokenizer=gpt2

Writes data/NAME/train.bin and val.bin (token ids as uint16) and data/NAME/meta.json (the tokenizer,
the character vocabulary, token counts, which files went where). One file is split by position (the
first 90% trains); a folder of .txt files is split by document, whole files held out for validation,
so that validation text is never seen in training. Line endings are normalized to "\\n" and a
byte-order mark at the start of a file is dropped. Nothing is written until every input has been read
and encoded, so a bad input leaves no partial dataset.

Preparing the same dataset again (the same text and settings) leaves the folder as it is, so a setup
command can be rerun; a folder that holds a different dataset is refused unless --overwrite=True.
"""

import dataclasses
import json
import os
import sys
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the scripts in data/*/ import this file and the project's modules

from support.configurator import UserError, parse_overrides, run_cli  # noqa: E402
from support.tokenizer import CharTokenizer, GPT2Tokenizer  # noqa: E402

MAX_VOCAB = 2**16  # ids are stored as uint16


class DataError(UserError):
    pass


@dataclasses.dataclass
class PrepareConfig:
    input: str = ""              # a UTF-8 text file, or a folder of .txt files
    name: str = ""               # dataset name: files go to data/NAME/ (or out_dir)
    tokenizer: str = "char"      # "char" or "gpt2"
    val_fraction: float = 0.1    # share of the text (by characters) held out for validation
    val_files: str = ""          # comma-separated file names to hold out; default: the last files by name
    out_dir: str = ""            # where to write; default data/NAME
    overwrite: bool = False      # replace a different dataset already there (the same one is always left as it is)


def read_documents(path):
    """[(file name, text)] of a file or of the .txt files of a folder, sorted by name."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".txt" and p.is_file())
        if not files:
            raise DataError(f"{path} holds no .txt files; put your text in files ending in .txt")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"{path} does not exist; --input takes a text file or a folder of .txt files")
    documents = []
    for file in files:
        raw = file.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"{file} is not UTF-8 text ({error}); convert it, or move it out of the input") from None
        if "\x00" in text:
            raise DataError(f"{file} contains NUL bytes: it looks binary, not text")
        # a byte-order mark says how the file was saved (some Windows editors add one); it is not part of the text
        text = text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
        if text.strip():
            documents.append((file.name, text))
    if not documents:
        raise DataError(f"{path} holds no text: every input file is empty")
    return documents


def split_documents(documents, val_fraction, val_files=""):
    """(train texts, val texts, val file names). One document splits by position, several by file."""
    if len(documents) == 1:
        name, text = documents[0]
        cut = int(len(text) * (1 - val_fraction))
        return [text[:cut]], [text[cut:]], []
    names = [name for name, _ in documents]
    if val_files:
        held = [n.strip() for n in val_files.split(",") if n.strip()]
        unknown = sorted(set(held) - set(names))
        if unknown:
            raise DataError(f"--val_files names files that are not in the input: {', '.join(unknown)}")
    else:
        total, held, size = sum(len(t) for _, t in documents), [], 0
        for name, text in reversed(documents):  # the last files by name, until the share is reached
            if size >= val_fraction * total:
                break
            held.append(name)
            size += len(text)
    if len(held) == len(names):
        raise DataError("every file would be held out for validation; add files or lower --val_fraction")
    train = [text for name, text in documents if name not in held]
    val = [text for name, text in documents if name in held]
    return train, val, sorted(held)


def encode(texts, tokenizer):
    """uint16 token ids of several documents, separated by <|endoftext|> (GPT-2) or a newline (char)."""
    if tokenizer.kind == "gpt2":
        ids = []
        for i, text in enumerate(texts):
            ids += ([tokenizer.end_of_text] if i else []) + tokenizer.encode_ordinary(text)
    else:
        ids = tokenizer.encode("\n".join(texts))
    return np.array(ids, dtype=np.uint16)


def write_atomically(path, data):
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def describes(path, meta):
    """Whether the meta.json at `path` describes the dataset of `meta`, wherever its text was read from."""
    try:
        old = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False  # damaged
    anywhere = {"source": None}
    return isinstance(old, dict) and old | anywhere == json.loads(json.dumps(meta)) | anywhere


def write_dataset(out, files, meta, overwrite=False):
    """Write `files` ({name: bytes}) and `meta` (as meta.json) into the folder `out`; returns False, writing
    nothing, when `out` already holds this very dataset (the same text from another copy counts as the
    same). A different dataset there is replaced only with `overwrite`. meta.json goes first and comes
    back last, so that a write cut off half way never leaves a dataset that looks complete."""
    changed = [name for name, data in files.items() if (out / name).exists() and (out / name).read_bytes() != data]
    if (out / "meta.json").exists() and not describes(out / "meta.json", meta):
        changed.append("meta.json")
    if changed and not overwrite:
        raise DataError(f"{out} already holds another dataset ({', '.join(changed)} would change); add "
                        "--overwrite=True to replace it, or choose another --out_dir")
    if not changed and all((out / name).exists() for name in [*files, "meta.json"]):
        return False
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "meta.json").unlink(missing_ok=True)
        for name, data in files.items():
            write_atomically(out / name, data)
        write_atomically(out / "meta.json", json.dumps(meta, indent=1).encode("utf-8"))
    except OSError as error:
        raise DataError(f"cannot write the dataset into {out} ({error.strerror or error}); choose a folder you can "
                        "write to with --out_dir, or free some space") from None
    return True


def prepare(input, name="", tokenizer="char", val_fraction=0.1, val_files="", out_dir="", overwrite=False):
    """Build the dataset; returns its metadata."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction}; expected a number between 0 and 1")
    if tokenizer not in ("char", "gpt2"):
        raise DataError(f"tokenizer={tokenizer!r}; expected 'char' or 'gpt2'")
    if not out_dir and not name:
        raise DataError("give the dataset a --name (files go to data/NAME/) or an --out_dir")
    if not out_dir and (Path(name).name != name or name in (".", "..")):
        raise DataError(f"--name={name!r} must be a plain folder name (files go to data/NAME/); "
                        "use --out_dir to write somewhere else")
    out = Path(out_dir) if out_dir else ROOT / "data" / name
    documents = read_documents(input)
    train_texts, val_texts, held = split_documents(documents, val_fraction, val_files)
    if tokenizer == "char":
        chars = "".join(sorted(set("".join(text for _, text in documents))))
        if len(chars) > MAX_VOCAB:
            raise DataError(f"the text has {len(chars):,} distinct characters, more than the {MAX_VOCAB:,} "
                            "that uint16 token ids can hold; use --tokenizer=gpt2")
        coder = CharTokenizer(chars)
    else:
        coder = GPT2Tokenizer()
    train_ids, val_ids = encode(train_texts, coder), encode(val_texts, coder)
    if min(len(train_ids), len(val_ids)) < 2:
        raise DataError(f"{input} gives {len(train_ids)} train and {len(val_ids)} val tokens: too little text to "
                        "train and validate on; add text")
    meta = coder.meta() | {
        "train_tokens": len(train_ids), "val_tokens": len(val_ids),
        "source": str(input), "train_files": [n for n, _ in documents if n not in held] if held else [],
        "val_files": held, "split": "by file" if held else f"by position ({1 - val_fraction:.0%} train)",
    }
    written = write_dataset(out, {"train.bin": train_ids.tobytes(), "val.bin": val_ids.tobytes()}, meta, overwrite)
    print(f"{out}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens, "
          f"{coder.kind} tokenizer, vocabulary {coder.vocab_size:,}, split {meta['split']}"
          + ("" if written else " (already prepared: left as it was)"))
    return meta


def fetch(url, dest):
    """`dest`, downloaded from `url` first if it is not there yet."""
    dest = Path(dest)
    if not dest.exists():
        print(f"downloading {url}")
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                write_atomically(dest, response.read())
        except OSError as error:
            raise DataError(f"could not download {url} ({error}). Offline? Get the file another way and "
                            f"pass it with --input=PATH") from None
    return dest


@dataclasses.dataclass
class KnownTextConfig:
    input: str = ""              # a local copy of the text; default: input.txt next to the script, downloaded once
    out_dir: str = ""            # where to write; default: the script's folder
    overwrite: bool = False      # replace a different dataset already there (the same one is always left as it is)


def prepare_known_text(argv, doc, url, folder, tokenizer):
    """Command line of a data/*/prepare.py script that turns one known text, from `url`, into the dataset
    in its `folder`, with `tokenizer` and the default 90/10 split; `doc` is the script's --help."""
    def run(argv):
        cfg = KnownTextConfig(**parse_overrides(KnownTextConfig, argv))
        prepare(input=cfg.input or fetch(url, folder / "input.txt"), tokenizer=tokenizer,
                out_dir=cfg.out_dir or str(folder), overwrite=cfg.overwrite)

    run_cli(run, KnownTextConfig, doc, argv)


def main(argv):
    def prepare_from(argv):
        settings = parse_overrides(PrepareConfig, argv)
        if not settings.get("input"):
            raise DataError("give the text with --input=FILE_OR_FOLDER")
        prepare(**settings)

    run_cli(prepare_from, PrepareConfig, __doc__, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
