"""
The speed plan that train.py and bench.py share: whether to compile the model, in which torch.compile
mode, and whether the delta writes run in ddl_kernels.py's fused kernel or as ddl_gpt.py's plain code.
"""

import importlib.util
import shutil
from dataclasses import dataclass

import torch

import ddl_kernels
from support.configurator import ConfigError

COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_speed_settings(compile_mode, gpu_peak_tflops):
    """The checks of --compile_mode and --gpu_peak_tflops, before anything is loaded."""
    if compile_mode not in COMPILE_MODES:
        raise ConfigError(f"--compile_mode={compile_mode!r}: expected one of {', '.join(COMPILE_MODES)}")
    if gpu_peak_tflops is not None and gpu_peak_tflops <= 0:
        raise ConfigError(f"--gpu_peak_tflops={gpu_peak_tflops}: must be positive, or None")


def compile_blocker(device):
    """Why torch.compile cannot run on this device here, or None if it can."""
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "torch.compile on CUDA needs Triton (pip install triton)"
    if device.type == "cpu" and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        return "torch.compile on the CPU needs a C++ compiler (g++ or clang++)"
    if device.type == "mps":
        return "torch.compile does not support MPS well yet"
    return None


@dataclass
class CompilePlan:
    on: bool    # whether to torch.compile the model
    mode: str   # the torch.compile mode, when on
    why: str    # when the default left compile off: why, so that a user knows what --compile=True would do


def compile_plan(compile, compile_mode, device, micro_steps=1, distributed=False):
    """Whether and how to compile: --compile (None: on CUDA where Triton exists) and --compile_mode
    (auto: CUDA graphs on one GPU with one micro-batch per step, else the default mode)."""
    if compile_mode in ("reduce-overhead", "max-autotune") and micro_steps > 1:
        raise ConfigError(f"--compile_mode={compile_mode} (CUDA graphs) does not work with "
                          f"{micro_steps} micro-batches per step; use --compile_mode=default or auto")
    blocker = compile_blocker(device)
    if compile and blocker:
        raise ConfigError(f"--compile=True: {blocker}; use --compile=False")
    on = compile if compile is not None else device.type == "cuda" and blocker is None
    why = ""
    if compile is None and not on:
        # On a 2-core CPU the first compilation took about 55 s for a 30% faster step: it does not pay in a
        # run of a minute (README, Laptop CPU). Later runs reuse the kernels, cached on disk.
        why = f" ({blocker})" if blocker else (" (off by default on the CPU: the first compilation takes "
                                               "longer than a short run saves; --compile=True turns it on)")
    # CUDA graphs replay a whole step in one launch: at the baby GPT's size, where launching kernels
    # takes longer than running them, that is a third off the step. Under DDP they would capture
    # the gradient hooks, so several processes keep the default mode.
    # With several micro-batches per step the graphs' reused output buffers are overwritten
    # before the accumulated backward is done with them, so accumulation keeps the default mode.
    mode = compile_mode if compile_mode != "auto" else (
        "reduce-overhead" if device.type == "cuda" and not distributed and micro_steps == 1 else "default")
    return CompilePlan(on, mode, why)


def kernel_blocker(device, config):
    """Why ddl_kernels.py's fused delta write cannot run for this model's state here, or None if it can."""
    if not ddl_kernels.available(torch.empty(0, 1, 1, config.d_v, device=device)):
        return (f"the fused delta write runs on CUDA with Triton, for d_v in 1, 2, 4, 8 "
                f"(here: {device.type}, d_v={config.d_v})")
    return None


def check_fused(fused, device, config):
    """Refuse --fused=True where the fused kernel cannot run for this model."""
    blocker = "residual=add has no delta write" if config.residual == "add" else kernel_blocker(device, config)
    if fused and blocker:
        raise ConfigError(f"--fused=True: {blocker}; use --fused=False")


def use_kernels(model, fused, compiled, generation=False):
    """Turn the fused delta write (ddl_kernels.py) on or off, and with it generation's attention-input kernel.
    fused=None picks it wherever it can run, compiled or not. torch.compile keeps the kernel as one operator
    that nothing fuses into, where it would fuse the plain code with its neighbours; measured on an H200, the
    kernel was still faster in two cases of four, the baby GPT's loop (delta: 6.9 against 7.7 ms/iter) and
    GPT-2 small's step (d_v = 4: 52.7 against 55.3 ms; 48.4 with the current launch settings, in a later call),
    even in one (baby d_v = 4: 11.9 against 11.8) and slower in one (GPT-2 small delta: 38.5 against 37.4)
    (docs/PERFORMANCE.md). A compiled decode step (generation=True) keeps the plain code, which the compiler
    fuses into few kernels, as measured; the kernels there were not. fused=False runs the plain code.
    Returns whether the kernels are on, and the line that says which code runs the writes."""
    blocker = kernel_blocker(next(model.parameters()).device, model.config)
    on = blocker is None and (fused is True or (fused is None and not (compiled and generation)))
    model.use_kernels(on)  # also attention's inputs in generation, in every mode
    if model.config.residual == "add":
        return on, "residual=add: no delta writes"
    if not on:
        why = blocker if blocker and fused is None else "fused by torch.compile" if fused is None else ""
        return False, "delta writes: plain PyTorch (ddl_gpt.py)" + (f"; {why}" if why else "")
    where = " inside the compiled model" if compiled else ""
    return True, f"delta writes: fused Triton kernel (ddl_kernels.py){where}"
