"""
Variable reassignment: a generated, offline, character-level task in which a stored value must be
replaced without disturbing the values that were copied from it.

    python data/reassign/prepare.py                  # data/reassign/ at the default difficulty
    python data/reassign/prepare.py --variables=6 --statements=24 --chain_depth=5 --out_dir=data/reassign_hard

Each example is one line: a program of assignments, then a query for every variable's final value.

    d=4;k=d;d=7;q=k;k=1;?k=1,d=7,q=4

A statement writes a digit (`d=4`) or copies another variable (`k=d`). A copy takes the value the
source holds at copy time: after `k=d;d=7` k still holds 4, and q, copied from k, still holds 4 after
k becomes 1. Whatever holds "d's value" in the model must therefore be overwritten when d is
reassigned, while the copies made from it keep theirs: the operation DDL's erase term (`- k·x`) is
built for, where an additive residual stream has to cancel the old value by adding its negative.
meta.json says how far shortcuts get on val ("val_shortcut_accuracies"): reading a copy as a
reference to its source, which ignores copy time, gets about a third of the answers wrong.

The answer tokens are the digits after `=` in the query. Every variable is asked for, so each line
gives as many answers as it has variables; in a random order, so that the model must read which
variable it is asked about rather than count query slots. The names are a fresh random choice of
letters on each line, so no letter is tied to a role, and every letter and digit is in the
vocabulary (meta.json "chars") whatever the settings or seed.

Difficulty:
- `variables`: distinct variables per program (1 to 26);
- `statements`: assignments per program, at least one per variable; the rest are reassignments;
- `chain_depth`: how many copies a value may pass through after its literal (`a=3;b=a;c=b` gives c a
  value of depth 2); 0 means no copies. A copy whose source is already at the limit is not drawn;
- `copy_share`: the chance that a statement is a copy, where one is allowed.

Files, in data/reassign/ or --out_dir: train.bin and val.bin (uint16 character ids, the lines one
after another), meta.json (the tokenizer, the settings under "task", counts) and train_answers.bin /
val_answers.bin with one uint16 per token: 0 for a token that is not an answer, else n > 0, its
distance from the first character of its line, so that a scorer can tell whether the whole line is
inside its context window. No val program occurs in train: train draws that repeat one are redrawn.
Running it again with the same settings is harmless (the same dataset is left as it is); a folder that
holds a different dataset, made with other settings, is replaced only with --overwrite=True.
"""

import dataclasses
import random
import string
import sys
from collections import Counter
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # the project root, for data/prepare.py and configurator.py

from support.configurator import ConfigError, parse_overrides, run_cli  # noqa: E402
from data.prepare import encode, write_dataset  # noqa: E402
from support.tokenizer import CharTokenizer  # noqa: E402

NAMES, DIGITS = string.ascii_lowercase, string.digits
# Every character the format can use, whatever the settings or seed, so that models trained on
# different difficulties share one vocabulary.
CHARS = "".join(sorted(NAMES + DIGITS + "=;?,\n"))
MAX_DISTANCE = 2**16 - 1  # answer distances are stored as uint16


@dataclasses.dataclass
class ReassignConfig:
    variables: int = 4              # distinct variables per program
    statements: int = 12            # assignments per program
    chain_depth: int = 3            # most copies between a literal and a variable holding its value
    copy_share: float = 0.6         # chance that a statement copies a variable (when a copy is allowed)
    train_examples: int = 750_000   # config/reassign.py's 3000 steps see each line about once
    val_examples: int = 10_000      # examples held out for validation (none of their programs is in train)
    seed: int = 1337                # the draws of both splits (each from its own stream)
    out_dir: str = ""               # default: this folder (data/reassign)
    overwrite: bool = False         # replace a different dataset already there (the same one is always left as it is)


def check(cfg):
    """Raise ConfigError, naming the setting and what to do, for settings that make no task."""
    if not 1 <= cfg.variables <= len(NAMES):
        raise ConfigError(f"--variables={cfg.variables}: the names are the letters a-z; use 1 to {len(NAMES)}")
    if cfg.statements < cfg.variables:
        raise ConfigError(f"--statements={cfg.statements} is fewer than --variables={cfg.variables}: every variable "
                          f"needs a value before the query asks for it; use --statements={cfg.variables} or more")
    if cfg.chain_depth < 0:
        raise ConfigError(f"--chain_depth={cfg.chain_depth}: use 0 (literals only) or more")
    if not 0.0 <= cfg.copy_share <= 1.0:
        raise ConfigError(f"--copy_share={cfg.copy_share}: it is a probability; use a number from 0 to 1")
    for key in ("train_examples", "val_examples"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"--{key}={getattr(cfg, key)}: use 1 or more")
    longest = 4 * cfg.statements + 1 + 4 * cfg.variables  # "x=y;" per statement, "?", "x=7," per answer
    if longest > MAX_DISTANCE:
        raise ConfigError(f"--statements={cfg.statements}: lines of {longest:,} characters are longer than the "
                          f"{MAX_DISTANCE:,} that uint16 answer distances hold; use fewer statements")


def generate_example(rng, cfg):
    """One line: program, query and answers, drawn from `rng` (a random.Random) for the task in `cfg`."""
    names = rng.sample(NAMES, cfg.variables)
    targets = names + [rng.choice(names) for _ in range(cfg.statements - cfg.variables)]
    rng.shuffle(targets)  # every variable is assigned at least once, in no fixed order
    value, depth, statements = {}, {}, []
    for target in targets:
        sources = [v for v in value if v != target and depth[v] < cfg.chain_depth]
        if sources and rng.random() < cfg.copy_share:
            source = rng.choice(sources)
            value[target], depth[target] = value[source], depth[source] + 1
            statements.append(f"{target}={source};")
        else:
            value[target], depth[target] = rng.choice(DIGITS), 0
            statements.append(f"{target}={value[target]};")
    asked = rng.sample(names, len(names))
    return "".join(statements) + "?" + ",".join(f"{v}={value[v]}" for v in asked) + "\n"


def program_of(line):
    """The statements of a line, before the query: the part that decides its answers."""
    return line.partition("?")[0]


def answer_positions(line):
    """Positions in `line` of its answer tokens: the characters after '=' in the query."""
    start = line.index("?")
    return [i + 1 for i in range(start, len(line)) if line[i] == "="]


def answer_depths(line):
    """For each answer of `line`, in query order: how many copies its value went through (0: a literal)."""
    depth = {}
    for statement in program_of(line).split(";")[:-1]:
        target, source = statement.split("=")
        depth[target] = depth[source] + 1 if source in NAMES else 0
    return [depth[line[i - 2]] for i in answer_positions(line)]


def shortcut_accuracies(lines):
    """Expected answer accuracy, over `lines`, of three ways to answer without tracking values right:
    - "digit_of_the_line": a uniform guess among the digits the program writes (no tracking at all);
    - "latest_literal": the digit last written to the variable itself, copies ignored;
    - "copies_as_references": a copy follows its source's later reassignments, as if nothing had been
      stored at copy time (a cycle such as `a=b;b=a` leaves no value).
    Where a way gives no value, it guesses among the line's digits. Chance is 0.1."""
    scores, count = dict.fromkeys(("digit_of_the_line", "latest_literal", "copies_as_references"), 0.0), 0
    for line in lines:
        statements = [statement.split("=") for statement in program_of(line).split(";")[:-1]]
        digits = {source for _, source in statements if source in DIGITS}
        last = dict(statements)  # each variable's last right-hand side
        literal = {target: source for target, source in statements if source in DIGITS}
        for position in answer_positions(line):
            name, answer = line[position - 2], line[position]
            guess = (answer in digits) / len(digits)
            followed, seen = name, set()
            while last[followed] in NAMES and followed not in seen:
                seen.add(followed)
                followed = last[followed]
            scores["digit_of_the_line"] += guess
            scores["latest_literal"] += literal[name] == answer if name in literal else guess
            scores["copies_as_references"] += last[followed] == answer if last[followed] in DIGITS else guess
            count += 1
    return {way: round(score / count, 4) for way, score in scores.items()}


def generate_lines(rng, cfg, count, excluded=frozenset()):
    """`count` lines whose programs (which alone decide the answers) are not in `excluded`."""
    lines, redrawn = [], 0
    # A draw lands in `excluded` as often as those programs are likely; where they are most of what the
    # settings can produce, redrawing would crawl or never end, so it stops with a message instead.
    while len(lines) < count:
        line = generate_example(rng, cfg)
        if program_of(line) in excluded:
            redrawn += 1
            if redrawn > 1000 and redrawn > len(lines):
                raise ConfigError(f"these settings allow too few distinct programs to keep train apart from val "
                                  f"({redrawn:,} of {redrawn + len(lines):,} train draws repeated a val program); "
                                  "raise --statements or --variables, or lower --val_examples")
            continue
        lines.append(line)
    return lines


def answers_array(lines):
    """uint16 per character of "".join(lines): 0, or an answer's distance from its line's start."""
    answers, start = np.zeros(sum(len(line) for line in lines), dtype=np.uint16), 0
    for line in lines:
        for position in answer_positions(line):
            answers[start + position] = position
        start += len(line)
    return answers


def prepare(cfg):
    """Write the dataset; returns its metadata."""
    check(cfg)
    out = Path(cfg.out_dir) if cfg.out_dir else HERE
    # Separate streams, so val does not change when only --train_examples does.
    val = generate_lines(random.Random(f"reassign {cfg.seed} val"), cfg, cfg.val_examples)
    train = generate_lines(random.Random(f"reassign {cfg.seed} train"), cfg, cfg.train_examples,
                           excluded={program_of(line) for line in val})
    coder = CharTokenizer(CHARS)
    splits = {name: (encode(["".join(lines)], coder), answers_array(lines)) for name, lines in
              (("train", train), ("val", val))}
    depths = Counter(d for line in val for d in answer_depths(line))
    task = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out_dir", "overwrite")}
    meta = coder.meta() | {
        "task": task,
        "train_tokens": len(splits["train"][0]), "val_tokens": len(splits["val"][0]),
        "train_answers": int(np.count_nonzero(splits["train"][1])),
        "val_answers": int(np.count_nonzero(splits["val"][1])),
        "val_answers_by_depth": [depths[d] for d in range(max(depths) + 1)],
        "val_shortcut_accuracies": shortcut_accuracies(val),
    }
    files = {}
    for name, (ids, answers) in splits.items():
        files[f"{name}.bin"], files[f"{name}_answers.bin"] = ids.tobytes(), answers.tobytes()
    written = write_dataset(out, files, meta, cfg.overwrite)
    print(f"{out}: {cfg.train_examples:,} train and {cfg.val_examples:,} val examples "
          f"({meta['train_tokens']:,} and {meta['val_tokens']:,} tokens, {meta['val_answers']:,} val answers, "
          f"by chain depth {meta['val_answers_by_depth']}), vocabulary {coder.vocab_size}"
          f"{'' if written else ' (already prepared: left as it was)'}\n"
          f"accuracy of answering without tracking values right: {meta['val_shortcut_accuracies']}")
    return meta


def main(argv):
    run_cli(lambda argv: prepare(ReassignConfig(**parse_overrides(ReassignConfig, argv))), ReassignConfig, __doc__,
            argv)


if __name__ == "__main__":
    main(sys.argv[1:])
