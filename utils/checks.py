"""The rule for every value a user sets, in one place: command-line flags of every script (by parameter name, so
`--batch_size` means the same check wherever it appears), the demo's sliders and the API's request fields.

Each rule is a predicate and what a valid value looks like; `check_value` turns a broken rule into one line.
"""

import math
import re
from typing import Any, Callable

from utils.cli import UserError


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def at_least(low) -> tuple[Callable, str]:
    return (lambda v: _number(v) and v >= low), f"at least {low}"


def above(low) -> tuple[Callable, str]:
    return (lambda v: _number(v) and v > low), f"above {low}"


def one_of(*choices: str) -> tuple[Callable, str]:
    shown = ", ".join(c or '""' for c in choices)
    return (lambda v: str(v).lower() in choices), f"one of {shown}"


# --dtype of the exports: torch's names and the short ones people type.
DTYPE_ALIASES = {"fp32": "float32", "f32": "float32", "fp16": "float16", "f16": "float16", "half": "float16",
                 "bf16": "bfloat16"}
PORT = (lambda v: _number(v) and 1 <= v <= 65535), "a port number from 1 to 65535"
DEVICE = (lambda v: re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(v)) is not None), "auto, cpu, mps, cuda or cuda:N"
SHARD_SIZE = (lambda v: re.fullmatch(r"\d+(\.\d+)?\s*([KMGT]i?B)?", str(v), re.I) is not None), "a size such as 5GB or 500MB"

RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    # training
    "batch_size": at_least(1),
    "micro_batch_size": at_least(1),
    "num_epochs": above(0),
    # Above 1 is a typo (3e4 for 3e-4): LoRA learning rates live between 1e-5 and 1e-2.
    "learning_rate": ((lambda v: _number(v) and 0 < v <= 1), "above 0 and at most 1, e.g. 3e-4"),
    "cutoff_len": at_least(1),
    "val_set_size": ((lambda v: _number(v) and v >= 0 and (v < 1 or float(v).is_integer())),
                     "a record count (0 for none) or a fraction below 1, e.g. 0.05"),
    "lora_r": at_least(1),
    "lora_alpha": above(0),
    "lora_dropout": ((lambda v: _number(v) and 0 <= v < 1), "at least 0 and below 1"),
    "max_steps": ((lambda v: _number(v) and (v == -1 or v >= 1)), "-1 (train for --num_epochs) or at least 1"),
    "warmup_steps": at_least(0),
    "save_steps": at_least(0),
    "eval_steps": at_least(0),
    "save_minutes": at_least(0),
    "logging_steps": at_least(1),
    "seed": ((lambda v: _number(v) and 0 <= v < 2**32), "from 0 to 2**32 - 1"),
    "quantization": one_of("auto", "8bit", "4bit", "none"),
    "device_map": one_of("", "auto", "balanced", "balanced_low_0", "sequential"),
    "wandb_watch": one_of("", "false", "gradients", "parameters", "all"),
    "wandb_log_model": one_of("", "false", "true", "end", "checkpoint"),
    "init_lora_weights": one_of("default", "gaussian", "pissa", "olora"),  # utils.methods.INITS
    "loraplus_lr_ratio": above(0),
    "density": ((lambda v: _number(v) and 0 < v <= 1), "above 0 and at most 1"),  # merge_adapters.py
    "svd_rank": at_least(0),
    # generation: generate.py, evaluate.py, the demo's sliders and the API
    # Between 0 and 1e-3 a temperature only overflows the scores it divides (1e-45: every one infinite).
    "temperature": ((lambda v: _number(v) and (v == 0 or v >= 1e-3)), "0 for greedy or at least 0.001"),
    "top_p": ((lambda v: _number(v) and 0 < v <= 1), "above 0 and at most 1"),
    "top_k": at_least(0),
    "num_beams": at_least(1),
    "no_repeat_ngram_size": at_least(0),
    "max_new_tokens": at_least(1),
    "concurrency_limit": at_least(1),
    "max_queue": at_least(0),
    "api_max_tokens": at_least(1),
    "api_max_input_tokens": at_least(0),
    "threads": at_least(0),
    "server_port": PORT,
    "device": DEVICE,
    # exports
    "num_shards": at_least(1),
    "max_shard_size": SHARD_SIZE,
    "dtype": one_of("auto", "float32", "float16", "bfloat16", *DTYPE_ALIASES),
}


def check_value(name: str, value: Any, flag: bool = True) -> None:
    """Raise a one-line UserError when `value` breaks the rule for `name` (no rule: nothing to check).

    None means "unset" (the script picks a default) and is always allowed. `flag` names it as --name."""
    rule = RULES.get(name)
    if rule is None or value is None:
        return
    valid, expected = rule
    if not valid(value):
        raise UserError(f"{'--' if flag else ''}{name} must be {expected}, not {value!r}")


def check_values(values: dict, flag: bool = True) -> None:
    for name, value in values.items():
        check_value(name, value, flag)
