"""
From settings to the model: the GPTConfig that a script's settings describe, the `RESIDUAL[:D_V]`
mode syntax of bench.py and compare.py, and the checks of train.py's settings.
"""

import dataclasses

from ddl_gpt import RESIDUAL_MODES, GPTConfig
from support.configurator import ConfigError, fields_of
from support.speed import check_speed_settings

MODE_SYNTAX = f"RESIDUAL[:D_V] with RESIDUAL one of {', '.join(RESIDUAL_MODES)}, e.g. delta:4"


def model_config(settings, **changes):
    """The GPTConfig of a settings dataclass (its fields that GPTConfig has), with `changes` on top;
    the model's own checks (modes, head sizes, beta_init, ...) become a ConfigError."""
    try:
        return GPTConfig(**fields_of(GPTConfig, dataclasses.asdict(settings)) | changes)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def parse_mode(text):
    """(residual, d_v) from "RESIDUAL[:D_V]" ("delta:4" gives ("delta", 4)); d_v is None where the text
    names none. Raises ValueError naming the syntax."""
    residual, colon, d_v = text.partition(":")
    if residual not in RESIDUAL_MODES or (colon and not d_v.isdigit()):
        raise ValueError(f"expected {MODE_SYNTAX}")
    return residual, int(d_v) if colon else None


def check_counts(cfg, at_least_one=(), not_negative=()):
    """Raise ConfigError for the first setting of `at_least_one` below 1 or of `not_negative` below 0."""
    for key in at_least_one:
        if getattr(cfg, key) < 1:
            raise ConfigError(f"--{key}={getattr(cfg, key)}: must be at least 1")
    for key in not_negative:
        if getattr(cfg, key) < 0:
            raise ConfigError(f"--{key}={getattr(cfg, key)}: must not be negative")


def check_settings(cfg):
    """Raise ConfigError naming the first of train.py's settings that cannot work, and the fix."""
    check_counts(cfg, at_least_one=["n_layer", "n_head", "n_embd", "block_size", "batch_size",
                                    "gradient_accumulation_steps", "max_iters", "eval_interval", "eval_iters",
                                    "log_interval", "d_v", "ddp_bucket_mb"])
    ranges = {"dropout": (0.0, 1.0, "[0, 1)"), "beta1": (0.0, 1.0, "[0, 1)"), "beta2": (0.0, 1.0, "[0, 1)")}
    for key, (low, high, shown) in ranges.items():
        if not low <= getattr(cfg, key) < high:
            raise ConfigError(f"--{key}={getattr(cfg, key)}: must lie in {shown}")
    if cfg.learning_rate <= 0:
        raise ConfigError(f"--learning_rate={cfg.learning_rate}: must be positive")
    if not 0 <= cfg.min_lr <= cfg.learning_rate:
        raise ConfigError(f"--min_lr={cfg.min_lr}: must lie between 0 and --learning_rate={cfg.learning_rate}")
    check_counts(cfg, not_negative=["warmup_iters", "weight_decay", "grad_clip"])
    if cfg.lr_decay_iters is not None and cfg.lr_decay_iters < 1:
        raise ConfigError(f"--lr_decay_iters={cfg.lr_decay_iters}: must be at least 1, or None for max_iters")
    if not 0 <= cfg.seed < 2**31:  # step_seed() must stay inside the 64-bit seeds torch accepts
        raise ConfigError(f"--seed={cfg.seed}: must lie in [0, 2^31)")
    check_speed_settings(cfg.compile_mode, cfg.gpu_peak_tflops)
    if cfg.resume not in ("no", "yes", "auto"):
        raise ConfigError(f"--resume={cfg.resume!r}: expected no, yes (or a bare --resume) or auto")
    model_config(cfg)
