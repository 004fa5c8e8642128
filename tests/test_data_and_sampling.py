"""
Turning text into datasets (data/prepare.py) and trained checkpoints back into text (sample.py).
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import tiktoken

from conftest import REPO, SHARED_DATA, SUBPROCESS_ENV, run_training, tiny_run_settings, tiny_text
import data.prepare
from data.prepare import MAX_VOCAB, DataError, prepare
from sample import SampleConfig, sample
from support.tokenizer import CharTokenizer, TokenizerError

DATASET_FILES = ("train.bin", "val.bin", "meta.json")


def decoded(out_dir, split):
    """The text of out_dir's train or val tokens, decoded with the dataset's own character vocabulary."""
    meta = json.loads((out_dir / "meta.json").read_text())
    return CharTokenizer(meta["chars"]).decode(np.fromfile(out_dir / f"{split}.bin", dtype=np.uint16).tolist())


def assert_prepare_fails_and_writes_nothing(input, out_dir, error, message, **settings):
    with pytest.raises(error, match=message):
        prepare(input=str(input), out_dir=str(out_dir), **settings)
    assert not any((out_dir / name).exists() for name in DATASET_FILES)


# --- data/prepare.py -----------------------------------------------------------------------------

def test_a_single_char_file_is_split_by_position_ninety_ten(tmp_path):
    text = ("abcdefghij" * 99) + "klmnopqrs\n"             # 1,000 characters, 20 distinct
    (tmp_path / "book.txt").write_text(text)
    meta = prepare(input=str(tmp_path / "book.txt"), out_dir=str(tmp_path / "out"))
    assert (meta["train_tokens"], meta["val_tokens"]) == (900, 100)
    assert (decoded(tmp_path / "out", "train"), decoded(tmp_path / "out", "val")) == (text[:900], text[900:])
    on_disk = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert on_disk["tokenizer"] == "char"
    assert on_disk["chars"] == "".join(sorted(set(text))) and on_disk["vocab_size"] == 20


def test_windows_line_endings_are_normalized_to_newlines(tmp_path):
    (tmp_path / "book.txt").write_bytes(b"first line\r\nsecond line\r\nthird\rline\r\n" * 10)
    meta = prepare(input=str(tmp_path / "book.txt"), out_dir=str(tmp_path / "out"))
    assert "\r" not in meta["chars"]
    text = decoded(tmp_path / "out", "train") + decoded(tmp_path / "out", "val")
    assert text == "first line\nsecond line\nthird\nline\n" * 10


def test_a_byte_order_mark_at_the_start_of_each_file_is_dropped_not_a_character(tmp_path):
    texts = {"a.txt": tiny_text(60, seed=1), "b.txt": tiny_text(20, seed=2)}
    for name, text in texts.items():
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))   # how some editors save UTF-8
    meta = prepare(input=str(tmp_path), out_dir=str(tmp_path / "out"))
    assert "\ufeff" not in meta["chars"]
    assert decoded(tmp_path / "out", "train") == texts["a.txt"] and decoded(tmp_path / "out", "val") == texts["b.txt"]


def test_an_overwrite_cut_off_half_way_leaves_no_dataset_that_looks_complete(tmp_path, monkeypatch):
    (tmp_path / "old.txt").write_text(tiny_text(20, seed=1))
    (tmp_path / "new.txt").write_text(tiny_text(20, seed=2))
    prepare(input=str(tmp_path / "old.txt"), out_dir=str(tmp_path / "out"))
    written = data.prepare.write_atomically

    def disk_full_at_val(path, content):
        if path.name == "val.bin":
            raise OSError(28, "No space left on device")
        written(path, content)

    monkeypatch.setattr(data.prepare, "write_atomically", disk_full_at_val)
    with pytest.raises(DataError, match="cannot write the dataset"):
        prepare(input=str(tmp_path / "new.txt"), out_dir=str(tmp_path / "out"), overwrite=True)
    assert not (tmp_path / "out" / "meta.json").exists()   # train.py then says "not prepared", not a mixed dataset


def test_a_folder_is_split_by_whole_files(tmp_path):
    texts = {"a.txt": tiny_text(60, seed=1), "b.txt": tiny_text(30, seed=2), "c.txt": tiny_text(15, seed=3)}
    for name, text in texts.items():
        (tmp_path / name).write_text(text)
    meta = prepare(input=str(tmp_path), out_dir=str(tmp_path / "out"))
    assert (meta["train_files"], meta["val_files"]) == (["a.txt", "b.txt"], ["c.txt"])
    assert decoded(tmp_path / "out", "val") == texts["c.txt"]
    assert decoded(tmp_path / "out", "train") == texts["a.txt"] + "\n" + texts["b.txt"]


def test_named_validation_files_are_the_ones_held_out(tmp_path):
    for name, seed in (("a.txt", 1), ("b.txt", 2), ("c.txt", 3)):
        (tmp_path / name).write_text(tiny_text(20, seed=seed))
    meta = prepare(input=str(tmp_path), out_dir=str(tmp_path / "out"), val_files="a.txt")
    assert (meta["train_files"], meta["val_files"]) == (["b.txt", "c.txt"], ["a.txt"])
    assert decoded(tmp_path / "out", "val") == (tmp_path / "a.txt").read_text()


def test_an_empty_folder_is_refused_and_nothing_is_written(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_prepare_fails_and_writes_nothing(tmp_path / "empty", tmp_path / "out", DataError, "no .txt files")


def test_a_binary_file_is_refused_and_nothing_is_written(tmp_path):
    (tmp_path / "good.txt").write_text(tiny_text(20))
    (tmp_path / "image.txt").write_bytes(bytes(range(256)) * 4)
    assert_prepare_fails_and_writes_nothing(tmp_path, tmp_path / "out", DataError, "image.txt is not UTF-8")


def distinct_characters(count):
    """`count` distinct characters from U+0020 up: no line breaks (normalized) and no surrogates (not UTF-8)."""
    code_points = (i for i in range(0x20, 0x110000) if not 0xD800 <= i <= 0xDFFF)
    return "".join(chr(next(code_points)) for _ in range(count))


def test_more_distinct_characters_than_uint16_ids_hold_is_refused_and_nothing_is_written(tmp_path):
    (tmp_path / "symbols.txt").write_text(distinct_characters(MAX_VOCAB + 1), encoding="utf-8")
    assert_prepare_fails_and_writes_nothing(tmp_path / "symbols.txt", tmp_path / "out", DataError, "65,537")


def test_a_vocabulary_of_exactly_65536_characters_fits(tmp_path):
    text = distinct_characters(MAX_VOCAB)
    (tmp_path / "symbols.txt").write_text(text, encoding="utf-8")
    meta = prepare(input=str(tmp_path / "symbols.txt"), out_dir=str(tmp_path / "out"))
    assert meta["vocab_size"] == MAX_VOCAB
    assert decoded(tmp_path / "out", "train") + decoded(tmp_path / "out", "val") == text


def test_a_gpt2_tokenizer_that_cannot_load_is_reported_and_nothing_is_written(tmp_path, monkeypatch):
    def offline(name):
        raise ConnectionError("openaipublic.blob.core.windows.net is unreachable")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    (tmp_path / "book.txt").write_text(tiny_text(20))
    assert_prepare_fails_and_writes_nothing(tmp_path / "book.txt", tmp_path / "out", TokenizerError,
                                            "TIKTOKEN_CACHE_DIR", tokenizer="gpt2")


def test_tiny_shakespeare_with_gpt2_tokens_gives_the_known_split(tmp_path, gpt2_tokenizer):
    shakespeare = SHARED_DATA / "tinyshakespeare" / "input.txt"
    if not shakespeare.is_file():
        pytest.skip(f"{shakespeare} is not here")
    meta = prepare(input=str(shakespeare), out_dir=str(tmp_path / "out"), tokenizer="gpt2")
    assert (meta["train_tokens"], meta["val_tokens"]) == (301_966, 36_059)


# --- sample.py -----------------------------------------------------------------------------------

SEPARATOR = "-" * 40 + "\n"


def run_sample_script(*arguments):
    return subprocess.run([sys.executable, "sample.py", *arguments], cwd=REPO, env=SUBPROCESS_ENV,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("from_file", [False, True], ids=["prompt", "prompt_file"])
def test_sample_script_continues_the_prompt(trained_run, tmp_path, from_file):
    prompt = "The delta rule"
    (tmp_path / "prompt.txt").write_text(prompt)
    start = f"FILE:{tmp_path / 'prompt.txt'}" if from_file else prompt
    result = run_sample_script(f"--out_dir={trained_run}", f"--start={start}", "--max_new_tokens=20",
                               "--num_samples=2", "--device=cpu")
    assert result.returncode == 0, result.stderr
    samples = result.stdout.split(SEPARATOR)
    assert len(samples) == 3 and samples[-1] == ""
    for text in samples[:2]:
        assert text.startswith(prompt) and len(text) == len(prompt) + 20 + 1   # 20 characters and print's newline


def test_sample_script_piped_into_a_reader_that_stops_early_ends_quietly(trained_run):
    """python sample.py | head -1: no traceback, no error line, and the status of a writer ended by SIGPIPE."""
    process = subprocess.Popen([sys.executable, "sample.py", f"--out_dir={trained_run}", "--max_new_tokens=2000",
                                "--num_samples=50", "--device=cpu"], cwd=REPO, env=SUBPROCESS_ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.readline()
    process.stdout.close()  # the reader goes away, as head does after its lines
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == 141, stderr
    assert "Traceback" not in stderr and "error" not in stderr.lower(), stderr


def test_sample_script_rejects_a_prompt_outside_the_vocabulary(trained_run):
    result = run_sample_script(f"--out_dir={trained_run}", "--start=Zoë's €", "--max_new_tokens=5", "--device=cpu")
    assert result.returncode != 0
    assert all(repr(ch) in result.stderr for ch in "ë€Z'")   # every missing character is named
    assert result.stdout == ""


def test_a_gpt2_token_checkpoint_samples_text_that_continues_the_prompt(tmp_path, gpt2_tokenizer):
    sentences = [f"Sentence {i} says that the delta rule rewrites one direction of the stream." for i in range(40)]
    (tmp_path / "text.txt").write_text(" ".join(sentences))
    prepare(input=str(tmp_path / "text.txt"), out_dir=str(tmp_path / "data" / "gpt2_text"), tokenizer="gpt2")
    out_dir = run_training(tiny_run_settings(dict(data_dir=str(tmp_path / "data"), dataset="gpt2_text"),
                                             tmp_path / "run", max_iters=2, eval_interval=2))
    texts = sample(SampleConfig(out_dir=str(out_dir), start="The delta rule", num_samples=2, max_new_tokens=8,
                                device="cpu"))
    assert len(texts) == 2
    assert all(isinstance(text, str) and text.startswith("The delta rule") for text in texts)
