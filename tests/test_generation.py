"""
Generation (generate.py) with the KV cache (GPT.prefill, GPT.decode_step) against the uncached reference
(GPT.forward), in every residual mode and state precision; sampling (pick, Draws): the same tokens cached or
not, alone or in a batch; and sample.py: streaming, the loaded-checkpoint line, batching, bad settings, Ctrl-C.
"""

import copy
import dataclasses
import signal
import subprocess
import sys

import pytest
import tiktoken
import torch

from support.configurator import run_cli
from conftest import REPO, SUBPROCESS_ENV, TINY_MODEL, tiny_gpt
from generate import KVCache, cast_weights, generate, pick
from support.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
import sample
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
each_state_dtype = pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
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


def generated(model, idx, max_new_tokens, **settings):
    """generate's new tokens as one tensor (B, max_new_tokens)."""
    steps = list(generate(model, idx, max_new_tokens, **settings))     # max_new_tokens lists of B ids
    return torch.tensor(steps, dtype=torch.long).T.reshape(idx.size(0), max_new_tokens)


def cached_logits(model, idx, prompt_length, fixed_shapes=False):
    """The logits (B, T - prompt_length + 1, vocab) after each position from prompt_length on: the prompt
    idx[:, :prompt_length] read by prefill, then one decode step per further token, as generate runs them.
    fixed_shapes: the decode steps read every slot through a mask, as they do when replayed as CUDA graphs."""
    cache = KVCache(model.config, idx.size(0), idx.device)
    cache.fixed_shapes = fixed_shapes
    logits = [model.prefill(idx[:, :prompt_length], cache)]             # (B, vocab)
    for t in range(prompt_length, idx.size(1)):
        logits.append(model.decode_step(idx[:, t:t + 1], cache))        # (B, vocab)
        cache.length += 1
    return torch.stack(logits, dim=1)


def forward_logits(model, idx, prompt_length):
    """The same logits from GPT.forward on the whole sequence so far, every time."""
    return torch.stack([model(idx[:, :t])[0][:, -1] for t in range(prompt_length, idx.size(1) + 1)], dim=1)


@pytest.mark.parametrize("fixed_shapes", [False, True], ids=["slots_filled", "every_slot_masked"])
@each_state_dtype
@each_mode
@torch.no_grad()
def test_prefill_then_each_decode_step_gives_the_logits_of_forward_on_the_whole_sequence_so_far(mode, state_dtype,
                                                                                             fixed_shapes):
    model = trained_like_gpt(state_dtype=state_dtype, **mode)
    idx = prompt(length=32)                   # to the end of the cache: a 3-token prompt, then 29 decode steps
    cached, reference = cached_logits(model, idx, 3, fixed_shapes), forward_logits(model, idx, 3)
    assert cached.shape == reference.shape == (2, 30, VOCAB)
    # the same state_dtype both ways: a bf16 state rounds the same numbers at the same places, so the paths agree
    # to far less than one bf16 step of the logits (2^-8 of their size, about 0.01 here)
    tolerance = 1e-5 if state_dtype == "float32" else 2e-3
    torch.testing.assert_close(cached, reference, rtol=0, atol=tolerance)


@each_mode
@torch.no_grad()
def test_cached_greedy_generation_picks_the_uncached_tokens_also_past_block_size(mode):
    model, idx = trained_like_gpt(block_size=16, **mode), prompt(length=10)
    cached = generated(model, idx, 20, temperature=0)   # 30 tokens > block_size 16: the last 16 are read afresh
    assert torch.equal(cached, generated(model, idx, 20, temperature=0, use_cache=False))
    assert cached.unique().numel() > 1                  # the model does not just repeat one token


@each_mode
@torch.no_grad()
def test_sampled_generation_with_one_seed_gives_the_same_tokens_cached_and_uncached(mode):
    model, idx = trained_like_gpt(block_size=16, **mode), prompt(length=4)
    settings = dict(temperature=0.8, top_k=10, seed=7)
    cached = generated(model, idx, 20, **settings)
    assert torch.equal(cached, generated(model, idx, 20, use_cache=False, **settings))
    assert not torch.equal(cached, generated(model, idx, 20, temperature=0.8, top_k=10, seed=8))  # the seed counts


@torch.no_grad()
def test_a_batch_of_samples_equals_each_sample_run_alone_with_its_sample_number():
    model, idx = trained_like_gpt(block_size=16, residual="delta", d_v=4), prompt(batch=4, length=3)
    idx[2] = idx[0]                                     # two samples of one prompt: only the sample number differs
    for use_cache in (True, False):
        batch = generated(model, idx, 20, temperature=0.8, top_k=10, seed=3, use_cache=use_cache)
        alone = torch.cat([generated(model, idx[i:i + 1], 20, temperature=0.8, top_k=10, seed=3, first_sample=i,
                                     use_cache=use_cache) for i in range(4)])
        assert torch.equal(batch, alone)
        assert not torch.equal(batch[0], batch[2])      # each sample draws from its own stream


@torch.no_grad()
def test_temperature_zero_takes_the_likeliest_token_as_top_k_1_does():
    model, idx = trained_like_gpt(block_size=16), prompt()
    for use_cache in (True, False):
        greedy = generated(model, idx, 20, temperature=0, use_cache=use_cache)
        assert torch.equal(greedy, generated(model, idx, 20, top_k=1, seed=5, use_cache=use_cache))
    first = model(idx)[0][:, -1].argmax(-1)             # (B,): the likeliest next token
    assert torch.equal(greedy[:, 0], first)


@torch.no_grad()
def test_vocab_limit_keeps_generated_ids_below_the_limit():
    model, idx, limit = tiny_gpt().eval(), prompt(batch=8, length=4), 5   # fresh: nearly uniform over 65 ids
    for use_cache in (True, False):
        limited = generated(model, idx, 20, vocab_limit=limit, use_cache=use_cache)
        assert (limited < limit).all() and (limited > 0).any()
        assert (generated(model, idx, 20, use_cache=use_cache) >= limit).any()  # without it, ids above the limit
    assert (generated(model, idx, 5, temperature=0, vocab_limit=limit) < limit).all()


def test_pick_inverts_the_cumulative_distribution_at_the_uniform_number():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])          # cumulative: 0.1, 0.3, 0.6, 1.0
    logits = probs.log().expand(7, -1)                  # (7, 4)
    u = torch.tensor([0.0, 0.05, 0.15, 0.29, 0.31, 0.65, 0.999])[:, None]  # (7, 1)
    assert pick(logits, 1.0, None, None, u)[:, 0].tolist() == [0, 0, 1, 1, 2, 3, 3]
    # top_k=2 keeps 0.3 and 0.4: cumulative 3/7, 1
    assert pick(logits[:4], 1.0, 2, None, u[[1, 2, 4, 5]])[:, 0].tolist() == [2, 2, 2, 3]
    # temperature 0.5 squares the probabilities: 1, 4, 9, 16 (/30), cumulative 0.033, 0.167, 0.467, 1
    assert pick(logits[:4], 0.5, None, None, torch.tensor([[0.02], [0.1], [0.3], [0.5]]))[:, 0].tolist() == [0, 1, 2, 3]
    # vocab_limit=2 keeps 0.1 and 0.2: cumulative 1/3, 1
    assert pick(logits[:2], 1.0, None, 2, torch.tensor([[0.3], [0.4]]))[:, 0].tolist() == [0, 1]
    assert pick(logits[:1], 0, None, None, None)[:, 0].tolist() == [3]   # temperature 0: the likeliest


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", [GENERATION_MODES["delta_dv4_expand_conv"], GENERATION_MODES["add"]],
                         ids=["delta_dv4_expand_conv", "add"])
@torch.no_grad()
def test_every_generation_path_keeps_the_state_in_its_state_dtype(mode, dtype):
    """With state_dtype=bfloat16 the state entering and leaving every block is bf16 in prefill, decode_step, the
    re-read past block_size and the uncached path, also under bf16 autocast; and the cached logits are forward's."""
    model, idx = trained_like_gpt(block_size=16, state_dtype="bfloat16", **mode), prompt(length=10)
    seen = []
    for block in model.transformer.h:
        block.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
        block.register_forward_hook(lambda module, args, output: seen.append(output[0].dtype))
    cached = cached_logits(model, idx, 4)                # prefill and decode_step
    assert len(seen) == 2 * model.config.n_layer * 7 and set(seen) == {torch.bfloat16}
    seen.clear()
    torch.testing.assert_close(cached, forward_logits(model, idx, 4), rtol=0, atol=2e-3)
    assert len(seen) > 0 and set(seen) == {torch.bfloat16}
    for use_cache in (True, False):                     # 30 tokens > block_size: the re-read path too
        seen.clear()
        tokens = generated(model, idx, 20, temperature=0, dtype=dtype, use_cache=use_cache)
        assert tokens.shape == (2, 20) and len(seen) > 0 and set(seen) == {torch.bfloat16}


@each_mode
@torch.no_grad()
def test_weights_stored_in_bf16_give_the_logits_of_bf16_autocast_and_leave_the_embedding_in_fp32(mode):
    """cast_weights stores once what autocast casts every step; with gains of the q/k norms that bf16 holds exactly,
    the logits are bit for bit those of the model left in fp32. The LM head is untied: the embedding keeps fp32."""
    model, idx = trained_like_gpt(block_size=16, **mode), prompt(length=10)
    for block in model.transformer.h:
        for norm in (block.attn.q_norm, block.attn.k_norm):
            norm.weight.copy_(norm.weight.bfloat16().float())
    cast = cast_weights(copy.deepcopy(model), "bfloat16")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(forward_logits(cast, idx, 4), forward_logits(model, idx, 4))
    assert cast.transformer.h[0].mlp.c_fc.weight.dtype == cast.lm_head.weight.dtype == torch.bfloat16
    assert cast.transformer.wte.weight.dtype == torch.float32
    assert torch.equal(cast.transformer.wte.weight, model.transformer.wte.weight)
    assert torch.equal(cast.lm_head.weight, model.transformer.wte.weight.bfloat16())


@torch.no_grad()
def test_a_compiled_decode_step_picks_the_uncached_tokens_also_past_block_size():
    model, idx = trained_like_gpt(block_size=16, residual="delta", d_v=4), prompt(length=10)
    compiled = generated(model, idx, 20, temperature=0, compile=True)   # 30 tokens > block_size: the re-read too
    assert torch.equal(compiled, generated(model, idx, 20, temperature=0, use_cache=False))


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
    idx = torch.tensor([tokenizer.encode("The delta")])
    reference = idx[0].tolist() + [step[0] for step in generate(model, idx, 20, temperature=0, use_cache=False)]
    assert result.stdout == tokenizer.decode(reference) + "\n" + "-" * 40 + "\n"


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
    ("--max_batch=0", "max_batch"),
    ("--seed=99999999999999999999999", "seed"),
    ("--seed=-1", "seed"),
], ids=["num_samples_0", "temperature_negative", "top_k_0", "unknown_checkpoint", "missing_prompt_file",
        "non_utf8_prompt_file", "max_new_tokens_negative", "max_batch_0", "seed_too_large", "seed_negative"])
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


def test_sample_script_batching_does_not_change_the_samples(trained_run):
    runs = {}
    for max_batch in (1, 2, 3):
        result = run_sample_script(f"--out_dir={trained_run}", "--start=The", "--max_new_tokens=12",
                                   "--num_samples=3", f"--max_batch={max_batch}", "--device=cpu")
        assert result.returncode == 0, result.stderr
        runs[max_batch] = result.stdout
    assert runs[2] == runs[1] == runs[3]
    samples = runs[1].split("\n" + "-" * 40 + "\n")
    assert len(samples) == 4 and samples[-1] == ""      # three samples, each followed by its separator
    assert all(sample.startswith("The") for sample in samples[:3])
    assert len(set(samples[:3])) > 1                    # the samples differ: each has its own random stream


def test_sample_script_bench_times_batch_1_and_8_with_the_same_tokens_both_ways(trained_run):
    result = run_sample_script("--bench", f"--out_dir={trained_run}", "--device=cpu", "--max_new_tokens=3")
    assert result.returncode == 0, result.stderr
    rows = result.stdout.splitlines()
    assert [row.split(":")[0].strip() for row in rows[1:5:2]] == ["batch 1", "batch 8"]
    assert all(row.endswith("same tokens both ways: True") for row in rows[1:5:2])
    assert all(row.strip().startswith("cached: first token after") and "uncached: first token" in row
               for row in rows[2:6:2])
    assert "to the first new token" in rows[5]


def test_sample_script_bench_on_a_checkpoint_whose_weights_do_not_fit_its_settings_ends_in_one_line(trained_run,
                                                                                                   tmp_path):
    state = load_checkpoint(trained_run / "best.pt")
    state["model_args"] = state["model_args"] | {"n_embd": 64}   # the weights are 32 wide
    save_checkpoint(tmp_path / "best.pt", state)
    result = run_sample_script("--bench", f"--out_dir={tmp_path}", "--device=cpu", "--max_new_tokens=3")
    assert result.returncode != 0 and result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: ") and "weights do not fit" in result.stderr


def test_sample_script_refuses_fused_kernels_where_they_cannot_run_in_one_line(trained_run):
    result = run_sample_script(f"--out_dir={trained_run}", "--fused=True", "--device=cpu", "--max_new_tokens=2")
    assert result.returncode == 1 and result.stdout == ""
    last = result.stderr.splitlines()[-1]
    assert last.startswith("error: --fused=True") and "--fused=False" in last and "Traceback" not in result.stderr


def test_sample_compile_where_torch_compile_cannot_run_is_one_error_line_before_the_checkpoint_is_read(
        tmp_path, monkeypatch):
    monkeypatch.setattr(sample, "compile_blocker", lambda device: "torch.compile needs a C++ compiler")
    monkeypatch.setattr(sample, "load_checkpoint", lambda path: pytest.fail("the checkpoint was read"))
    with pytest.raises(SystemExit) as stop:
        run_cli(main, SampleConfig, sample.__doc__, [f"--out_dir={tmp_path}", "--device=cpu", "--compile=True"])
    assert stop.value.code == "error: --compile=True: torch.compile needs a C++ compiler; use --compile=False"


def test_sample_help_and_error_name_tiktokens_files_for_a_gpt2_checkpoint(tmp_path, monkeypatch, capsys):
    model = tiny_gpt(vocab_size=50304)
    save_checkpoint(tmp_path / "best.pt", {"model_args": dataclasses.asdict(model.config), "model": model.state_dict(),
                                           "tokenizer": {"tokenizer": "gpt2", "vocab_size": 50257}, "iter_num": 0,
                                           "val_loss": None})

    def offline(name):
        raise ConnectionError("openaipublic.blob.core.windows.net is unreachable")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)  # as on a machine without the files or a network
    with pytest.raises(SystemExit) as exit:
        run_cli(main, SampleConfig, "", [f"--out_dir={tmp_path}", "--device=cpu", "--max_new_tokens=2"])
    message = str(exit.value.code)
    assert message.startswith("error: ") and "\n" not in message and "TIKTOKEN_CACHE_DIR" in message
    run_cli(main, SampleConfig, sample.__doc__, ["--help"])
    assert "TIKTOKEN_CACHE_DIR" in capsys.readouterr().out
