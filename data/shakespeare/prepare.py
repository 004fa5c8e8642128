"""
Prepare tiny Shakespeare with GPT-2's tokenizer, for --dataset=shakespeare: the same 90/10 split by
characters as shakespeare_char, 301,966 train and 36,059 val tokens.

    python data/shakespeare/prepare.py                        # downloads input.txt next to this file
    python data/shakespeare/prepare.py --input=PATH           # offline: a local copy of input.txt

Writes train.bin, val.bin and meta.json next to this file. Running it again is harmless: the same
dataset is left as it is; a different one already there (another text) is replaced only with
--overwrite=True. GPT-2's tokenizer (tiktoken) downloads its two files once; offline, point
TIKTOKEN_CACHE_DIR at a folder holding tiktoken's cache.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from prepare import prepare_known_text  # noqa: E402  (data/prepare.py)

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"

if __name__ == "__main__":
    prepare_known_text(sys.argv[1:], __doc__, URL, HERE, tokenizer="gpt2")
