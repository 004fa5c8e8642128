"""
Tiny Shakespeare (1.1 MB of plays), one token per character: 65 symbols, the first 90% for training.

    python data/shakespeare_char/prepare.py                   # downloads input.txt next to this file
    python data/shakespeare_char/prepare.py --input=PATH      # offline: a local copy of input.txt
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from prepare import main  # noqa: E402  (data/prepare.py)

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"

if __name__ == "__main__":
    main(sys.argv[1:], download=(URL, HERE / "input.txt"), tokenizer="char", out_dir=str(HERE))
