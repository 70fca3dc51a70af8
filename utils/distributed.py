"""Sharded launchers (accelerate with FSDP or DeepSpeed ZeRO-3): what finetune.py needs to save a whole adapter."""

import os
from typing import Optional

from utils.cli import UserError


def check_launcher() -> None:
    """Refuse FSDP1 before any model loads: it renames every wrapped layer (`_fsdp_wrapped_module.`), and peft 0.21
    then finds no LoRA layer to save, so the run would end with an empty adapter (tests/test_scale.py showed it)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and os.environ.get("FSDP_VERSION", "1") != "2":
        raise UserError("FSDP1 (fsdp_version 1) cannot save a LoRA adapter with this peft; launch with "
                        "configs/fsdp.yaml, or set fsdp_version: 2 in your accelerate config")


def gather_adapter(trainer) -> Optional[dict]:
    """The trainable (LoRA) weights whole, or None where each process already holds them whole (one process,
    DDP, ZeRO-2). Every rank must call this: under FSDP and ZeRO-3 each holds only a shard of each weight, and
    rank 0 saving alone hangs or fails (FSDP) or writes empty tensors (ZeRO-3)."""
    if trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
        # What the Trainer saves its own ZeRO-3 checkpoints with; the weights come back on rank 0.
        return trainer.model_wrapped._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
    if trainer.is_fsdp_enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # Only the trainable weights are gathered (FSDP2 holds each as a DTensor shard), onto every rank.
        options = StateDictOptions(full_state_dict=True, ignore_frozen_params=True)
        return get_model_state_dict(trainer.model, options=options)
    return None
