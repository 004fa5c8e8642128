"""
The variable-reassignment task (data/reassign/prepare.py): its answers against Python running the same
program, the copy-depth limit, the answer file a scorer reads, reproducibility, train/val separation
and the errors its command line gives.
"""

import json
import random
import subprocess
import sys

import numpy as np
import pytest

from support.configurator import read_config_file
from conftest import REPO, SUBPROCESS_ENV
import data.reassign.prepare as reassign
from data.reassign.prepare import (CHARS, ReassignConfig, answer_depths, answer_positions, answers_array,
                                   generate_example, generate_lines, main, prepare, program_of, shortcut_accuracies)

FILES = ("train.bin", "val.bin", "meta.json", "train_answers.bin", "val_answers.bin")

# From one variable without copies to every letter with long chains and nothing but copies allowed.
DIFFICULTIES = [
    dict(variables=1, statements=4, chain_depth=0),
    dict(variables=2, statements=6, chain_depth=1, copy_share=0.5),
    dict(),  # the defaults
    dict(variables=5, statements=30, chain_depth=6, copy_share=1.0),
    dict(variables=26, statements=40, chain_depth=2, copy_share=0.3),
]


def small_dataset(out_dir, **settings):
    return prepare(ReassignConfig(**dict(train_examples=300, val_examples=100, out_dir=str(out_dir)) | settings))


def statements_of(line):
    """[(target, source)] of a line's program, parsed here rather than by the module under test."""
    return [tuple(statement.split("=")) for statement in line.split("?")[0].split(";") if statement]


def query_of(line):
    """{variable: answer digit} as the line's query states it."""
    return dict(pair.split("=") for pair in line.rstrip("\n").split("?")[1].split(","))


# --- the task ------------------------------------------------------------------------------------

def describe(task):
    return ",".join(f"{key}={value}" for key, value in task.items()) or "defaults"


@pytest.mark.parametrize("task", DIFFICULTIES, ids=describe)
def test_answers_agree_with_python_running_the_program(task):
    cfg = ReassignConfig(**task)
    rng = random.Random(7)
    for _ in range(200):
        line = generate_example(rng, cfg)
        namespace = {}
        exec(line.split("?")[0], {"__builtins__": {}}, namespace)  # "a=3;b=a;" is Python as it stands
        query = query_of(line)
        assert len(query) == cfg.variables == len(line.split("?")[1].split(","))   # each variable asked once
        assert {name: int(digit) for name, digit in query.items()} == namespace, line
        assert len(statements_of(line)) == cfg.statements


@pytest.mark.parametrize("depth", [0, 1, 2, 4])
def test_no_value_goes_through_more_copies_than_chain_depth(depth):
    cfg = ReassignConfig(variables=5, statements=30, chain_depth=depth, copy_share=1.0)  # copy whenever allowed
    rng, deepest = random.Random(depth), 0
    for _ in range(200):
        copies = {}  # how many copies each variable's current value has gone through
        for target, source in statements_of(generate_example(rng, cfg)):
            copies[target] = copies[source] + 1 if source.isalpha() else 0
            deepest = max(deepest, copies[target])
    assert deepest == depth   # the limit holds and is reached


def test_copies_keep_the_value_of_copy_time_so_following_references_fails_often():
    rng = random.Random(3)
    shortcuts = shortcut_accuracies([generate_example(rng, ReassignConfig()) for _ in range(2000)])
    assert shortcuts["copies_as_references"] < 0.75   # a quarter of the answers or more need the value of copy time
    assert shortcuts["digit_of_the_line"] < shortcuts["latest_literal"] < 0.7   # and literals alone do not suffice


def test_the_docstring_example_has_the_answers_positions_and_depths_it_states():
    line = "d=4;k=d;d=7;q=k;k=1;?k=1,d=7,q=4\n"
    assert line.strip() in reassign.__doc__
    assert [line[i] for i in answer_positions(line)] == ["1", "7", "4"]
    assert answer_depths(line) == [0, 0, 2]   # q=k copied k's copy of d's 4


def test_shortcut_accuracies_of_a_worked_example():
    # digits {3, 7}: a guess is right half the time. latest literal: a=7 right, b and c have none (guess).
    # references: b -> a -> 7 and c -> b -> a -> 7, both wrong.
    assert shortcut_accuracies(["a=3;b=a;a=7;c=b;?a=7,b=3,c=3\n"]) == {
        "digit_of_the_line": 0.5, "latest_literal": round(2 / 3, 4), "copies_as_references": round(1 / 3, 4)}


# --- the files -----------------------------------------------------------------------------------

def read(out_dir, split):
    """(text, answers) of a split: the decoded characters and the uint16 answer marks."""
    chars = json.loads((out_dir / "meta.json").read_text())["chars"]
    ids = np.fromfile(out_dir / f"{split}.bin", dtype=np.uint16)
    return "".join(chars[i] for i in ids), np.fromfile(out_dir / f"{split}_answers.bin", dtype=np.uint16)


@pytest.mark.parametrize("split", ["train", "val"])
def test_answer_files_mark_exactly_the_answers_with_their_distance_from_the_line_start(tmp_path, split):
    small_dataset(tmp_path)
    text, answers = read(tmp_path, split)
    assert len(answers) == len(text)
    expected, line_start = np.zeros(len(text), dtype=np.uint16), 0
    for position, char in enumerate(text):
        if char.isdigit() and text.rfind("?", line_start, position) >= 0:   # a digit in the query
            expected[position] = position - line_start
        if char == "\n":
            line_start = position + 1
    assert np.array_equal(answers, expected)
    for position in np.flatnonzero(answers):   # how a scorer uses them: the line starts n tokens earlier
        start = position - answers[position]
        assert (start == 0 or text[start - 1] == "\n") and "\n" not in text[start:position]
        assert query_of(text[start:text.index("\n", position) + 1])[text[position - 2]] == text[position]


def test_meta_records_the_full_vocabulary_the_settings_and_the_counts(tmp_path):
    meta = small_dataset(tmp_path, variables=1, statements=2, chain_depth=0)
    assert meta == json.loads((tmp_path / "meta.json").read_text())
    assert meta["tokenizer"] == "char" and meta["chars"] == CHARS and meta["vocab_size"] == 41
    assert set("0123456789abcdefghijklmnopqrstuvwxyz=;?,\n") == set(CHARS)   # whatever these settings use
    assert meta["task"] == dict(variables=1, statements=2, chain_depth=0, copy_share=0.6, train_examples=300,
                                val_examples=100, seed=1337)
    line = 4 * 2 + 1 + 4 * 1
    assert (meta["train_tokens"], meta["val_tokens"]) == (300 * line, 100 * line)
    assert (meta["train_answers"], meta["val_answers"]) == (300, 100)
    assert meta["val_answers_by_depth"] == [100]


def test_the_same_seed_writes_identical_files_and_another_seed_different_ones(tmp_path):
    for name, seed in (("first", 5), ("again", 5), ("other", 6)):
        small_dataset(tmp_path / name, seed=seed)
    files = {name: {file: (tmp_path / name / file).read_bytes() for file in FILES}
             for name in ("first", "again", "other")}
    assert files["first"] == files["again"]
    assert all(files["first"][file] != files["other"][file] for file in ("train.bin", "val.bin"))


def test_val_does_not_change_with_the_number_of_training_examples(tmp_path):
    small_dataset(tmp_path / "fewer", train_examples=100)
    small_dataset(tmp_path / "more", train_examples=300)
    assert (tmp_path / "fewer" / "val.bin").read_bytes() == (tmp_path / "more" / "val.bin").read_bytes()


def test_no_val_program_occurs_in_train(tmp_path):
    # One variable, two literal statements: 2,600 programs, so independent draws would repeat val ones.
    task = dict(variables=1, statements=2, chain_depth=0)
    small_dataset(tmp_path, train_examples=2000, val_examples=300, **task)
    val = {program_of(line) for line in read(tmp_path, "val")[0].splitlines(keepends=True)}
    train = {program_of(line) for line in read(tmp_path, "train")[0].splitlines(keepends=True)}
    assert not train & val
    unfiltered = generate_lines(random.Random(0), ReassignConfig(**task), 2000)
    assert any(program_of(line) in val for line in unfiltered)   # the separation is not luck


@pytest.mark.parametrize("preset, whole_lines", [("reassign.py", 2), ("reassign_cpu.py", 1)])
def test_every_window_of_a_preset_scores_whole_lines_of_the_default_task(preset, whole_lines):
    block_size = read_config_file(REPO / "config" / preset)["block_size"]
    rng, cfg = random.Random(0), ReassignConfig()
    answers = answers_array([generate_example(rng, cfg) for _ in range(20)])
    positions = np.arange(block_size)
    scored = [np.count_nonzero((marks > 0) & (positions + 1 >= marks))   # the scorer's rule, target p at i + 1 + p
              for marks in (answers[i + 1:i + 1 + block_size] for i in range(len(answers) - block_size))]
    assert min(scored) >= whole_lines * cfg.variables


# --- the command line ----------------------------------------------------------------------------

BAD_SETTINGS = {
    "no_variables": (["--variables=0"], "--variables=0: the names are the letters a-z; use 1 to 26"),
    "more_variables_than_letters": (["--variables=27"], "--variables=27: the names are the letters a-z"),
    "fewer_statements_than_variables": (["--variables=5", "--statements=4"],
                                        "--statements=4 is fewer than --variables=5"),
    "negative_depth": (["--chain_depth=-1"], "--chain_depth=-1: use 0"),
    "share_above_one": (["--copy_share=1.5"], "--copy_share=1.5: it is a probability"),
    "no_examples": (["--train_examples=0"], "--train_examples=0: use 1 or more"),
    "not_a_number": (["--statements=many"], "--statements='many': expected int"),
    "misspelled": (["--variabels=3"], "did you mean --variables?"),
    "too_few_programs": (["--variables=1", "--statements=1", "--val_examples=3000", "--train_examples=100"],
                         "too few distinct programs"),
}


def run_prepare_script(*arguments):
    return subprocess.run([sys.executable, "data/reassign/prepare.py", *arguments], cwd=REPO, env=SUBPROCESS_ENV,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("case", ["no_variables", "more_variables_than_letters", "fewer_statements_than_variables"])
def test_a_bad_setting_on_the_command_line_exits_with_one_error_line_and_no_traceback(tmp_path, case):
    arguments, message = BAD_SETTINGS[case]
    result = run_prepare_script(f"--out_dir={tmp_path / 'out'}", *arguments)
    assert result.returncode != 0
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", BAD_SETTINGS)
def test_every_bad_setting_exits_naming_the_setting_and_the_fix_and_writes_nothing(tmp_path, case):
    arguments, message = BAD_SETTINGS[case]
    with pytest.raises(SystemExit) as stopped:   # what the command line prints and exits with
        main([f"--out_dir={tmp_path / 'out'}", *arguments])
    assert stopped.value.code.startswith("error: ") and "\n" not in stopped.value.code
    assert message in stopped.value.code
    assert not (tmp_path / "out").exists()


def test_an_out_dir_that_cannot_be_written_is_one_error_line(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(SystemExit) as stopped:
        main([f"--out_dir={tmp_path / 'a_file'}", "--train_examples=10", "--val_examples=10"])
    assert stopped.value.code.startswith(f"error: cannot write the dataset into {tmp_path / 'a_file'}")
    assert "--out_dir" in stopped.value.code
    assert "\n" not in stopped.value.code


def test_the_command_line_writes_every_file_into_out_dir(tmp_path):
    result = run_prepare_script(f"--out_dir={tmp_path}", "--train_examples=50", "--val_examples=20", "--seed=3")
    assert result.returncode == 0, result.stderr
    assert all((tmp_path / file).is_file() for file in FILES)
    assert json.loads((tmp_path / "meta.json").read_text())["task"]["seed"] == 3


def test_the_same_settings_again_leave_the_dataset_and_other_settings_need_overwrite(tmp_path):
    settings = [f"--out_dir={tmp_path}", "--train_examples=50", "--val_examples=20"]
    assert run_prepare_script(*settings).returncode == 0
    prepared = {file: (tmp_path / file).read_bytes() for file in FILES}
    again = run_prepare_script(*settings)
    assert again.returncode == 0 and "already prepared" in again.stdout, again.stderr
    refused = run_prepare_script(*settings, "--seed=4")
    assert refused.returncode == 1 and refused.stderr.count("\n") == 1, refused.stderr
    assert refused.stderr.startswith(f"error: {tmp_path} already holds another dataset"), refused.stderr
    assert "--overwrite=True" in refused.stderr
    assert {file: (tmp_path / file).read_bytes() for file in FILES} == prepared
    assert run_prepare_script(*settings, "--seed=4", "--overwrite").returncode == 0
    assert json.loads((tmp_path / "meta.json").read_text())["task"]["seed"] == 4
