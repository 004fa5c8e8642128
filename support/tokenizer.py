"""
The two tokenizers a dataset can use, and how a dataset's meta.json names them:
- "char": one token per character; the vocabulary (a string of the characters) travels in meta.json
  and in every checkpoint, so that sampling needs nothing else;
- "gpt2": GPT-2's BPE through tiktoken (50,257 tokens, `<|endoftext|>` = 50256).
"""

import os

from support.configurator import UserError


class TokenizerError(UserError):
    pass


class CharTokenizer:
    kind = "char"

    def __init__(self, chars):
        self.chars = chars
        self.vocab_size = len(chars)
        self.index = {ch: i for i, ch in enumerate(chars)}

    def encode(self, text):
        missing = sorted(set(text) - self.index.keys())
        if missing:
            shown = " ".join(repr(ch) for ch in missing[:20]) + (" ..." if len(missing) > 20 else "")
            raise TokenizerError(f"{len(missing)} character(s) are not in this model's vocabulary: {shown}. "
                                 f"The vocabulary is the {self.vocab_size} characters of its training text.")
        return [self.index[ch] for ch in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

    def meta(self):
        return {"tokenizer": self.kind, "vocab_size": self.vocab_size, "chars": self.chars}


class GPT2Tokenizer:
    kind = "gpt2"
    end_of_text = 50256

    def __init__(self):
        import tiktoken
        try:
            self.encoding = tiktoken.get_encoding("gpt2")
        except Exception as error:  # tiktoken raises whatever its download raised
            cache = os.environ.get("TIKTOKEN_CACHE_DIR", "<unset>")
            raise TokenizerError(
                "could not load the GPT-2 tokenizer files (vocab.bpe and encoder.json): "
                f"{type(error).__name__}: {error}. tiktoken downloads them once and caches them; offline, "
                f"point TIKTOKEN_CACHE_DIR at a folder holding that cache (TIKTOKEN_CACHE_DIR={cache}).") from None
        self.vocab_size = self.encoding.n_vocab

    def encode(self, text):
        return self.encoding.encode(text, allowed_special={"<|endoftext|>"})

    def encode_ordinary(self, text):
        """Tokens of a document's text, in which "<|endoftext|>" is plain text, not the special token."""
        return self.encoding.encode_ordinary(text)

    def decode(self, ids):
        return self.encoding.decode(ids)

    def meta(self):
        return {"tokenizer": self.kind, "vocab_size": self.vocab_size}


def from_meta(meta):
    """The tokenizer that a dataset's (or checkpoint's) metadata describes."""
    kind = meta.get("tokenizer")
    if kind == "char":
        return CharTokenizer(meta["chars"])
    if kind == "gpt2":
        return GPT2Tokenizer()
    raise TokenizerError(f"unknown tokenizer {kind!r} in dataset metadata; expected 'char' or 'gpt2'")
