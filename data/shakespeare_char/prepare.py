"""
Prepare tiny Shakespeare (1.1 MB of plays) with one token per character, for --dataset=shakespeare_char:
65 symbols, the first 90% of the text for training, the rest for validation.

    python data/shakespeare_char/prepare.py                   # downloads input.txt next to this file
    python data/shakespeare_char/prepare.py --input=PATH      # offline: a local copy of input.txt

Writes train.bin, val.bin and meta.json next to this file. Running it again is harmless: the same
dataset is left as it is; a different one already there (another text) is replaced only with
--overwrite=True. data/prepare.py turns any other text into a dataset.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from prepare import prepare_known_text  # noqa: E402  (data/prepare.py)

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"

if __name__ == "__main__":
    prepare_known_text(sys.argv[1:], __doc__, URL, HERE, tokenizer="char")
