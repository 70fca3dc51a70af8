"""Command-line plumbing shared by every script: one-line errors, rank-aware printing."""

import logging
import os
import sys
import warnings
from typing import Any, Callable

# On CPUs with AVX512-BF16, importing bitsandbytes (which transformers' Trainer does) warns that an optional fast
# 4-bit kernel could not be fetched from the Hugging Face Hub and tells the user to install `kernels`. Its built-in
# CPU kernel works without it, and fetching would need the network: the warning is noise in every one-line error.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# peft 0.21 still asks every model for the renamed `is_gradient_checkpointing`: a warning about peft's code that a
# user of these scripts can do nothing about, printed on every run.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


class UserError(Exception):
    """A problem with the user's input or environment: printed as one line, never as a traceback."""


def is_main_process() -> bool:
    """True on the only process, or on rank 0 under torchrun/accelerate."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 0


def log(*args: Any) -> None:
    """print() on the main process only, so torchrun ranks do not repeat every line."""
    if is_main_process():
        print(*args, flush=True)


def run(entry: Callable) -> None:
    """fire.Fire(entry), turning a UserError into `error: ...` on stderr and exit status 2."""
    import fire

    try:
        fire.Fire(entry)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
