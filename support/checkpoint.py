"""
Checkpoints: writing them, reading them back, and the checks before a run resumes from one.

Checkpoints are plain dicts of tensors, numbers and strings, written atomically (a temporary file,
then a rename) and read with `torch.load(weights_only=True)`, which unpickles no code. Each carries a
SHA-256 of its contents, so bytes damaged on disk are reported instead of trained on.
"""

import dataclasses
import hashlib
import os
from pathlib import Path

import torch

from ddl_gpt import GPT, GPTConfig
from support.configurator import TrainingError, UserError

CHECKPOINT_FORMAT = "ddl-gpt/2"
MODEL_KEYS = {f.name for f in dataclasses.fields(GPTConfig)}  # settings a resumed run cannot change


class CheckpointError(UserError):
    pass


def _digest(value, sha):
    """Feed every tensor's bytes and every other value's repr into `sha`, in a fixed order."""
    if isinstance(value, dict):
        for key in sorted(value, key=str):
            sha.update(repr(key).encode())
            _digest(value[key], sha)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _digest(item, sha)
    elif isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        sha.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        sha.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        sha.update(repr(value).encode())
    return sha


def checksum(state):
    return _digest(state, hashlib.sha256()).hexdigest()


def save_checkpoint(path, state):
    """Write `state` (plus its format and checksum) to a temporary file, then rename it over `path`:
    a crash or a full disk mid-write leaves the previous file as it was."""
    path = Path(path)
    state = {"format": CHECKPOINT_FORMAT} | state
    state["checksum"] = checksum(state)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:
        # torch.save reports a failed write (disk full, file too large) as a RuntimeError of its zip
        # writer, raised while the OSError is being handled
        error = error if isinstance(error, OSError) else error.__context__
        if not isinstance(error, OSError):
            raise
        raise CheckpointError(f"could not write {path} ({error.strerror or error}); the previous checkpoint "
                              "there, if any, is intact. Free some space or fix the folder, then --resume") from None
    finally:
        tmp.unlink(missing_ok=True)


def save_run(out_dir, cfg, model, optimizer, scaler, meta, step, best_val, elapsed, val_loss=None):
    """ckpt.pt: everything --resume needs; and best.pt, the weights alone, when `val_loss` (this step's
    validation loss, if it was evaluated) is the best so far. A checkpoint saved without a val_loss
    tells --resume that this step's evaluation is still to do."""
    state = {"model_args": dataclasses.asdict(model.config), "model": model.state_dict(), "tokenizer": meta,
             "iter_num": step, "val_loss": val_loss, "best_val_loss": best_val, "elapsed_s": elapsed,
             "train_config": dataclasses.asdict(cfg)}
    if val_loss is not None and val_loss <= best_val:
        save_checkpoint(Path(out_dir) / "best.pt", state)
    save_checkpoint(Path(out_dir) / "ckpt.pt", state | {"optimizer": optimizer.state_dict(),
                                                        "scaler": scaler.state_dict()})


def load_checkpoint(path):
    path = Path(path)
    if not os.path.isfile(path):  # unlike Path.is_file, never raises (a name too long is simply not there)
        raise CheckpointError(f"no checkpoint at {path}; train one first (python train.py ...), or check --out_dir")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CheckpointError(f"{path} cannot be read ({type(error).__name__}: {first_line[:200]}); it is "
                              "truncated, corrupt or not a ddl-gpt checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a ddl-gpt checkpoint of format {CHECKPOINT_FORMAT!r} (found "
                              f"{found!r}); it was written by another program or another version of ddl-gpt")
    stored = state.pop("checksum", None)
    if stored != checksum(state):
        raise CheckpointError(f"{path} is damaged: its contents do not match the checksum written with it; "
                              "use another checkpoint (best.pt or ckpt.pt) or train again")
    return state


def model_from_checkpoint(state):
    """The GPT a checkpoint describes, with its weights loaded."""
    try:
        model = GPT(GPTConfig(**state["model_args"]))
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"the checkpoint's model settings do not fit this version of ddl_gpt.py: {error}") from None
    try:
        missing, unexpected = model.load_state_dict(state["model"], strict=False)
    except (KeyError, RuntimeError) as error:  # shapes that differ from the model's settings
        shown = " ".join(str(error).split())  # PyTorch lists each mismatch on its own line: one line here
        raise CheckpointError(f"the checkpoint's weights do not fit its model settings: {shown[:300]}") from None
    if missing or unexpected:
        raise CheckpointError(f"the checkpoint's weights do not match its model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return model


# ----------------------------------------------------------------------------------------------
# resuming

def resume_state(out_dir, resume):
    """The checkpoint that --resume=no/yes/auto continues from, or None to start afresh."""
    ckpt_path = Path(out_dir) / "ckpt.pt"
    exists = os.path.exists(ckpt_path)  # False, not an OSError, for a name the system refuses (too long)
    if resume == "no" or (resume == "auto" and not exists):
        if exists:
            raise TrainingError(f"{ckpt_path} exists: continue it with --resume, or choose another --out_dir "
                                "(or delete that folder) to start afresh")
        return None
    return load_checkpoint(ckpt_path)


def check_same_model(state, overrides):
    """Refuse settings asked on resume that would change the checkpoint's model."""
    saved = state["train_config"]
    changed = {k: (saved.get(k), v) for k, v in overrides.items() if k in MODEL_KEYS and saved.get(k) != v}
    if changed:
        listed = ", ".join(f"{k}: checkpoint {a!r}, asked {b!r}" for k, (a, b) in changed.items())
        raise TrainingError(f"cannot resume with a different model ({listed}); drop those settings or use another --out_dir")


def token_identity(meta):
    """What makes token ids mean the same text in two datasets: the tokenizer, its vocabulary, its characters."""
    return meta.get("tokenizer"), meta.get("vocab_size"), meta.get("chars")


def check_same_tokens(state, meta, dataset):
    """Refuse to resume on a dataset whose token ids mean other text than the checkpoint's."""
    if token_identity(state["tokenizer"]) != token_identity(meta):
        raise TrainingError(f"cannot resume on dataset {dataset!r}: its tokens are not the checkpoint's "
                            f"({meta['tokenizer']} tokenizer, vocabulary {meta['vocab_size']}, against "
                            f"{state['tokenizer']['tokenizer']}, {state['tokenizer']['vocab_size']}); resume with "
                            f"--dataset={state['train_config']['dataset']} or start afresh in another --out_dir")
