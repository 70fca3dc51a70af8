"""The Trainer callback that makes checkpoints a run can resume from: frequent enough, durable, and named for their run.

Which checkpoint a run resumes, and whether it is complete, is utils/training.py's (latest_checkpoint).
"""

import json
import time
from pathlib import Path

from transformers import TrainerCallback

from utils import durable
from utils.training import CHECKPOINT_PREFIX


class CheckpointKeeper(TrainerCallback):
    """Besides the Trainer's saves (every save_steps, and at the end): a save when `minutes` have passed since the
    last one, so a slow machine loses minutes, not the run. Each checkpoint is flushed to the disk and gets the run's
    arguments (training_args.json, with its run_id), so a resume knows whose it is."""

    def __init__(self, arguments: dict, minutes: float):
        self.arguments = arguments
        self.minutes = minutes
        self.last = time.monotonic()

    def on_step_end(self, args, state, control, **kwargs):
        if self.minutes and any_rank(time.monotonic() - self.last >= self.minutes * 60, args.device):
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        self.last = time.monotonic()
        folder = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            durable.write_text(folder / "training_args.json", json.dumps(self.arguments, indent=2, default=str))
            durable.fsync_tree(folder)
            durable.fsync_path(folder.parent)


def any_rank(flag: bool, device) -> bool:
    """Whether any process says so: under torchrun every rank must take the same decision, a save being a
    collective step (each rank's clock alone could disagree by a step, and the ranks would wait on each other)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
