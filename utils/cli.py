"""Command-line plumbing shared by every script: one-line errors, rank-aware printing."""

import os
import sys
from typing import Any, Callable


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
