"""
Tiny Shakespeare with GPT-2's tokenizer: the same 90/10 split by characters as shakespeare_char,
301,966 train and 36,059 val tokens.

    python data/shakespeare/prepare.py                        # downloads input.txt next to this file
    python data/shakespeare/prepare.py --input=PATH           # offline: a local copy of input.txt
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from prepare import main  # noqa: E402  (data/prepare.py)

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"

if __name__ == "__main__":
    main(sys.argv[1:], download=(URL, HERE / "input.txt"), tokenizer="gpt2", out_dir=str(HERE))
