"""
Generation with the KV cache (GPT.forward_cached, GPT.stream) against the uncached reference (GPT.forward),
in every residual mode; and sample.py: streaming, the loaded-checkpoint line, bad settings, Ctrl-C.
"""

import signal
import subprocess
import sys

import pytest
import torch

from support.configurator import run_cli
from conftest import REPO, SUBPROCESS_ENV, TINY_MODEL, tiny_gpt
from ddl_gpt import KVCache
from support.checkpoint import load_checkpoint, model_from_checkpoint
from sample import SampleConfig, main, new_text
from support.tokenizer import from_meta

GENERATION_MODES = {
    "add": dict(residual="add"),
    "delta": dict(residual="delta"),
    "delta_dv4_expand_conv": dict(residual="delta", d_v=4, expand_conv=True),
    "delta_dv4_no_expand_conv": dict(residual="delta", d_v=4, expand_conv=False),
    "write": dict(residual="write"),
}
each_mode = pytest.mark.parametrize("mode", list(GENERATION_MODES.values()), ids=list(GENERATION_MODES))
VOCAB = TINY_MODEL["vocab_size"]


def trained_like_gpt(block_size=32, **mode):
    """A tiny GPT in eval mode with every parameter moved off its init (identity-started pieces such as
    the EC convolution and the compressor mixes included), so that no path is trivially the identity."""
    model = tiny_gpt(block_size=block_size, **mode).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def prompt(batch=2, length=5, seed=0):
    return torch.randint(VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))  # (B, T)


@each_mode
@torch.no_grad()
def test_each_cached_step_gives_the_logits_of_a_full_forward_pass(mode):
    model = trained_like_gpt(**mode)
    idx = prompt(length=24)
    cache = KVCache()
    cached = [model.forward_cached(idx[:, :2], cache)]  # 2 tokens: the EC's first taps fall before the start
    cached += [model.forward_cached(idx[:, t:t + 1], cache) for t in range(2, 24)]
    reference = [model(idx[:, :t + 1])[0] for t in range(1, 24)]
    torch.testing.assert_close(torch.cat(cached, 1), torch.cat(reference, 1), rtol=0, atol=1e-5)


@each_mode
@torch.no_grad()
def test_cached_and_uncached_greedy_generation_pick_the_same_tokens(mode):
    model, idx = trained_like_gpt(**mode), prompt()
    cached = model.generate(idx, max_new_tokens=20, temperature=0)
    assert torch.equal(cached, model.generate(idx, max_new_tokens=20, temperature=0, use_cache=False))
    assert cached[:, 5:].unique().numel() > 1   # the model does not just repeat one token


@each_mode
@torch.no_grad()
def test_generation_past_block_size_matches_the_uncached_reference_that_crops_the_context(mode):
    model, idx = trained_like_gpt(block_size=16, **mode), prompt(length=10)
    cached = model.generate(idx, max_new_tokens=20, top_k=1)   # 30 tokens > block_size: the cache refills
    assert torch.equal(cached, model.generate(idx, max_new_tokens=20, top_k=1, use_cache=False))


@torch.no_grad()
def test_a_cache_extended_by_several_tokens_at_once_matches_forward():
    model, idx = trained_like_gpt(residual="delta", d_v=4), prompt(length=12)
    cache = KVCache()
    model.forward_cached(idx[:, :5], cache)
    torch.testing.assert_close(model.forward_cached(idx[:, 5:], cache), model(idx)[0], rtol=0, atol=1e-5)


@torch.no_grad()
def test_temperature_zero_takes_the_likeliest_token():
    model, idx = trained_like_gpt(), prompt()
    torch.manual_seed(0)
    assert torch.equal(model.generate(idx, max_new_tokens=10, temperature=0),
                       model.generate(idx, max_new_tokens=10, top_k=1))


def test_incremental_decoding_holds_back_a_character_split_across_gpt2_tokens(gpt2_tokenizer):
    text = "Zoë 日本語 🙂 ok"
    ids, shown, pieces = gpt2_tokenizer.encode(text), "", []
    for n in range(1, len(ids) + 1):
        piece = new_text(gpt2_tokenizer, ids[:n], shown)
        shown += piece
        pieces.append(piece)
    assert shown == text and "\ufffd" not in shown
    assert "" in pieces   # some token ended inside a character and was held back


# --- sample.py -----------------------------------------------------------------------------------

def run_sample_script(*arguments):
    return subprocess.run([sys.executable, "sample.py", *arguments], cwd=REPO, env=SUBPROCESS_ENV,
                          capture_output=True, text=True, timeout=120)


def test_sample_script_says_which_checkpoint_it_loaded_and_prints_the_greedy_continuation(trained_run):
    result = run_sample_script(f"--out_dir={trained_run}", "--start=The delta", "--max_new_tokens=20",
                               "--num_samples=1", "--temperature=0", "--device=cpu")
    assert result.returncode == 0, result.stderr
    state = load_checkpoint(trained_run / "best.pt")
    first = result.stderr.splitlines()[0]
    assert first == (f"loaded {trained_run / 'best.pt'}: iter {state['iter_num']}, val loss {state['val_loss']:.4f}, "
                     "residual=delta, d_v=1")
    tokenizer, model = from_meta(state["tokenizer"]), model_from_checkpoint(state).eval()
    reference = model.generate(torch.tensor([tokenizer.encode("The delta")]), 20, temperature=0, use_cache=False)
    assert result.stdout == tokenizer.decode(reference[0].tolist()) + "\n" + "-" * 40 + "\n"


def test_sample_script_with_no_new_tokens_prints_the_prompt(trained_run, capsys):
    main([f"--out_dir={trained_run}", "--start=The delta", "--max_new_tokens=0", "--num_samples=1", "--device=cpu"])
    assert capsys.readouterr().out == "The delta\n" + "-" * 40 + "\n"


@pytest.mark.parametrize("setting, named", [
    ("--num_samples=0", "num_samples"),
    ("--temperature=-1", "temperature"),
    ("--top_k=0", "top_k"),
    ("--checkpoint=latest", "checkpoint"),
    ("--start=FILE:missing.txt", "missing.txt"),
    ("NON_UTF8_PROMPT", "UTF-8"),
    ("--max_new_tokens=-5", "max_new_tokens"),
], ids=["num_samples_0", "temperature_negative", "top_k_0", "unknown_checkpoint", "missing_prompt_file",
        "non_utf8_prompt_file", "max_new_tokens_negative"])
def test_a_bad_sample_setting_is_one_error_line_before_any_checkpoint_is_read(setting, named, tmp_path, capsys):
    if setting == "NON_UTF8_PROMPT":
        (tmp_path / "latin1.txt").write_bytes("Zoë".encode("latin-1"))
        setting = f"--start=FILE:{tmp_path / 'latin1.txt'}"
    no_run = tmp_path / "no-such-run"   # were a checkpoint read first, the error would be about this folder
    with pytest.raises(SystemExit) as exit:
        run_cli(main, SampleConfig, "", [f"--out_dir={no_run}", setting, "--device=cpu"])
    message = str(exit.value.code)
    assert message.startswith("error: ") and "\n" not in message and named in message
    assert "no-such-run" not in message
    assert capsys.readouterr().out == ""


def test_ctrl_c_while_sampling_keeps_the_partial_sample_and_exits_130_in_one_line(trained_run):
    process = subprocess.Popen([sys.executable, "sample.py", f"--out_dir={trained_run}", "--start=The",
                                "--max_new_tokens=1000000", "--device=cpu"],
                               cwd=REPO, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        streamed = process.stdout.read(10)   # the prompt and a few tokens, flushed as they come
        process.send_signal(signal.SIGINT)
        rest, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130
    assert streamed.startswith("The") and (streamed + rest).endswith("\n")
    assert stderr.splitlines()[-1] == "interrupted" and "Traceback" not in stderr
