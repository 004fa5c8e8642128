"""
The device and precision policy of train.py, sample.py and bench.py: which device, which compute
precision, the GPU's peak for MFU, whether a run fits the machine's memory; and, under torchrun, which
process this is.
"""

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
# Imported here, before any process group exists, on purpose: its functions bind the world group as a
# default argument when the module is imported, and DDP would import it after init_process_group. A group
# held there outlives destroy_process_group, and its gloo threads then sometimes abort the exiting process.
import torch.distributed.nn  # noqa: F401

from support.configurator import UserError

# Dense bf16/fp16 tensor-core peaks from the vendors' datasheets, matched against the device name in
# this order (so "H100 PCIe" is found before "H100"). MFU is reported against the GPU actually used.
PEAK_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0),
               ("L40S", 362.0), ("L4", 121.0), ("A10G", 125.0), ("4090", 165.0), ("3090", 71.0)]
DTYPES = ("auto", "float32", "bfloat16", "float16")


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
# processes: one, or one of torchrun's

@dataclass
class Processes:
    rank: int           # this process's number, 0 to world - 1
    world: int          # how many processes train together
    device: torch.device
    distributed: bool   # started by torchrun: gradients and losses are averaged over the processes
    flags: object       # under torchrun, the group (over gloo, on the CPU) that stop flags travel through

    @property
    def master(self):
        """Only the first process writes the log and the checkpoints."""
        return self.rank == 0

    def end(self):
        if self.distributed:
            dist.destroy_process_group()


def start_processes(requested_device):
    """This process alone on --device, or one of torchrun's, with its own GPU where there are GPUs."""
    if int(os.environ.get("RANK", -1)) == -1:
        return Processes(0, 1, pick_device(requested_device), False, None)
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    # the stop flags travel over gloo: the world group on CPUs, a second group beside nccl on GPUs
    flags = dist.new_group(backend="gloo") if device.type == "cuda" else dist.group.WORLD
    return Processes(rank, world, device, True, flags)

