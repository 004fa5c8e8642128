"""
What train.py, sample.py and bench.py share: the device and precision policy, and checkpoints.

Checkpoints are plain dicts of tensors, numbers and strings, written atomically (a temporary file,
then a rename) and read with `torch.load(weights_only=True)`, which unpickles no code. Each carries a
SHA-256 of its contents, so bytes damaged on disk are reported instead of trained on.
"""

import hashlib
import importlib.util
import os
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch

import ddl_kernels
from configurator import ConfigError, UserError
from ddl_gpt import GPT, GPTConfig

CHECKPOINT_FORMAT = "ddl-gpt/2"

# Dense bf16/fp16 tensor-core peaks from the vendors' datasheets, matched against the device name in
# this order (so "H100 PCIe" is found before "H100"). MFU is reported against the GPU actually used.
PEAK_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0),
               ("L40S", 362.0), ("L4", 121.0), ("A10G", 125.0), ("4090", 165.0), ("3090", 71.0)]
DTYPES = ("auto", "float32", "bfloat16", "float16")
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class CheckpointError(UserError):
    pass


# ----------------------------------------------------------------------------------------------
# device and precision

def pick_device(requested):
    """The torch.device for --device: "auto" picks cuda > mps > cpu; a named one must exist here."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise UserError(f"--device={requested!r} is not a device; use auto, cpu, mps, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device={requested}: this machine has no usable CUDA GPU; use --device=auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device={requested}: there are {torch.cuda.device_count()} GPU(s), "
                            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device={requested}: MPS (Apple-silicon GPU) is not available here; use --device=auto")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device={requested}: ddl-gpt runs on cpu, mps or cuda")
    if device.type != "cuda" and device.index:
        raise UserError(f"--device={requested}: there is one {device.type} device; use --device={device.type}")
    return device


def pick_dtype(requested, device):
    """The compute precision: bf16 autocast on GPUs that have it, fp16 on older CUDA GPUs, else fp32.
    CPU: bf16 autocast is slower than fp32 on most CPUs. MPS: fp32 works on every macOS version;
    --dtype=bfloat16 or float16 may be faster on recent ones."""
    if requested not in DTYPES:
        raise UserError(f"--dtype={requested!r}; expected one of {', '.join(DTYPES)}")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def autocast_for(device, dtype):
    """The mixed-precision context for the forward pass (none for float32)."""
    return torch.autocast(device.type, dtype=getattr(torch, dtype)) if dtype != "float32" else nullcontext()


def compile_blocker(device):
    """Why torch.compile cannot run on this device here, or None if it can."""
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "torch.compile on CUDA needs Triton (pip install triton)"
    if device.type == "cpu" and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        return "torch.compile on the CPU needs a C++ compiler (g++ or clang++)"
    if device.type == "mps":
        return "torch.compile does not support MPS well yet"
    return None


def check_speed_settings(compile_mode, gpu_peak_tflops):
    """The checks of --compile_mode and --gpu_peak_tflops that train.py and bench.py share."""
    if compile_mode not in COMPILE_MODES:
        raise ConfigError(f"--compile_mode={compile_mode!r}: expected one of {', '.join(COMPILE_MODES)}")
    if gpu_peak_tflops is not None and gpu_peak_tflops <= 0:
        raise ConfigError(f"--gpu_peak_tflops={gpu_peak_tflops}: must be positive, or None")


def kernel_blocker(device, config):
    """Why ddl_kernels.py's fused delta write cannot run for this model here, or None if it can."""
    if config.residual == "add":
        return "residual=add has no delta write"
    if not ddl_kernels.available(torch.empty(0, 1, 1, config.d_v, device=device)):
        return (f"the fused delta write runs on CUDA with Triton, for d_v in 1, 2, 4, 8 "
                f"(here: {device.type}, d_v={config.d_v})")
    return None


def use_kernels(model, fused, compiled):
    """Turn the fused delta write (ddl_kernels.py) on or off. fused=None picks it where it can run and the model
    is not compiled: torch.compile fuses the plain code with its neighbours, which measured faster (README).
    Returns whether the kernel runs, and the line that says which code runs the writes."""
    if model.config.residual == "add":
        return False, "residual=add: no delta writes"
    blocker = kernel_blocker(next(model.parameters()).device, model.config)
    on = blocker is None and (fused is True or (fused is None and not compiled))
    model.use_kernels(on)
    if not on:
        why = blocker if blocker and fused is None else "fused by torch.compile" if compiled else ""
        return False, "delta writes: plain PyTorch (ddl_gpt.py)" + (f"; {why}" if why else "")
    partly = model.config.dropout > 0 and model.config.dropout_at == "write"
    return True, "delta writes: fused Triton kernel (ddl_kernels.py)" + (
        "; in evaluation only, since training drops elements of the write (dropout)" if partly else "")


def peak_tflops(device, override=None):
    """The GPU's dense bf16 peak, for MFU; None where unknown (CPU, MPS, a GPU not in the table)."""
    if device.type != "cuda":
        return None
    if override:
        return override
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def training_memory_gb(config, batch_size):
    """A rough upper estimate of what one training step holds in memory, in GB: weights, gradients and
    AdamW's two moments in fp32; about 40 saved fp32 activations per feature, token and layer (more with
    the expanded state); attention weights when they are materialized; fp32 logits and their gradient."""
    tokens = batch_size * config.block_size
    params = 12 * config.n_layer * config.n_embd**2 + config.vocab_size * config.n_embd
    per_layer = tokens * config.n_embd * (40 + 8 * config.d_v) + batch_size * config.n_head * config.block_size**2
    return 4 * (4 * params + config.n_layer * per_layer + 3 * tokens * config.vocab_size) / 1e9


def check_memory(config, batch_size, device, fix):
    """On the CPU, refuse a run that would need more memory than the machine has (before it starts
    and is killed), with `fix` saying what to lower. GPUs report their own out-of-memory clearly."""
    if device.type != "cpu" or not hasattr(os, "sysconf"):
        return
    try:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError):
        return
    try:
        needed = training_memory_gb(config, batch_size)
    except OverflowError:  # sizes such as --n_embd=1e200
        needed = float("inf")
    if needed > 0.8 * available:
        raise UserError(f"this run needs about {needed:.0f} GB of memory and this machine has {available:.0f} GB: "
                        f"it is sized for a GPU. {fix}")


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


# ----------------------------------------------------------------------------------------------
# checkpoints

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
        raise CheckpointError(f"the checkpoint's weights do not fit its model settings: {str(error)[:300]}") from None
    if missing or unexpected:
        raise CheckpointError(f"the checkpoint's weights do not match its model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return model
