"""Training plumbing around the Hugging Face Trainer: run directories, resuming, saving, guards."""

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from utils.cli import UserError, check_writable, log

CHECKPOINT_PREFIX = "checkpoint-"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
FSDP_WEIGHTS = "pytorch_model_fsdp_0"  # what the Trainer's FSDP checkpoints hold instead: the sharded weights


@dataclass(frozen=True)
class TrainSettings:
    """The schedule and switches the Trainer runs with (finetune.training_arguments turns them into its arguments)."""

    micro_batch_size: int
    grad_accum: int
    num_epochs: float
    max_steps: int
    learning_rate: float
    warmup_steps: int
    save_steps: int
    logging_steps: int
    group_by_length: bool = False
    packing: bool = True
    gradient_checkpointing: bool = False
    torch_compile: bool = False
    bf16: Optional[bool] = None
    report_to: tuple = ("none",)
    run_name: Optional[str] = None
    seed: int = 42
    world_size: int = 1
    loraplus_lr_ratio: Optional[float] = None  # LoRA+ (utils.methods): lora_B's learning rate over lora_A's

def check_batch_sizes(batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Gradient accumulation steps per process; the global batch must split evenly over micro-batches and ranks."""
    if micro_batch_size < 1 or batch_size < 1:
        raise UserError(f"--batch_size ({batch_size}) and --micro_batch_size ({micro_batch_size}) must be at least 1")
    per_pass = micro_batch_size * world_size
    if batch_size % per_pass:
        raise UserError(
            f"--batch_size {batch_size} is not a multiple of --micro_batch_size {micro_batch_size}"
            + (f" × {world_size} processes" if world_size > 1 else "")
            + f"; try --batch_size {max(1, batch_size // per_pass) * per_pass}"
        )
    return batch_size // per_pass


def optimizer_steps(num_records: int, micro_batch_size: int, grad_accum: int, world_size: int, num_epochs: float,
                    max_steps: int) -> int:
    """The optimizer steps the Trainer will take (its own arithmetic: a last, partial accumulation counts as a step)."""
    micro_batches = math.ceil(math.ceil(num_records / world_size) / micro_batch_size)
    per_epoch = max(math.ceil(micro_batches / grad_accum), 1)
    return max_steps if max_steps > 0 else math.ceil(num_epochs * per_epoch)


def steps_done(checkpoint: str) -> int:
    """The optimizer step a Trainer checkpoint was saved at."""
    return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"])


def is_complete_checkpoint(path: Path) -> bool:
    """The Trainer writes trainer_state.json last, so a checkpoint without it was interrupted mid-save."""
    weights = any((path / f).is_file() for f in ADAPTER_FILES) or (path / FSDP_WEIGHTS).is_dir()
    return (path / "trainer_state.json").is_file() and weights


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    checkpoints = [p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    complete = [p for p in checkpoints if is_complete_checkpoint(p)]
    return max(complete, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]), default=None)


def check_output_dir(output_dir: str, resuming: bool, overwrite: bool) -> Path:
    """Prove output_dir can be written and refuse to overwrite an earlier run by accident. Nothing is created yet
    (training does that), so a run stopped by a later check leaves nothing behind."""
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"--output_dir {output_dir} is a file, not a directory")
    if path.is_dir() and any(path.iterdir()) and not (resuming or overwrite):
        raise UserError(
            f"--output_dir {output_dir} already holds files from an earlier run: pass --resume_from_checkpoint "
            "to continue it, --overwrite_output_dir to replace it, or choose another --output_dir"
        )
    check_writable(output_dir, "output_dir")
    return path


def resolve_resume(resume_from_checkpoint: Union[None, bool, str], output_dir: Path) -> tuple[Optional[str], Optional[str]]:
    """(Trainer checkpoint to resume fully, adapter dir to warm-start from); never silently starts over."""
    if not resume_from_checkpoint:
        return None, None
    if resume_from_checkpoint is True or str(resume_from_checkpoint).lower() == "true":
        found = latest_checkpoint(output_dir)
        if found is None:
            raise UserError(f"--resume_from_checkpoint: no complete checkpoint-N directory in {output_dir} to resume")
        log(f"Resuming the full training state from {found}")
        return str(found), None
    path = Path(resume_from_checkpoint).expanduser()
    if not path.is_dir():
        raise UserError(f"--resume_from_checkpoint {resume_from_checkpoint} not found")
    if is_complete_checkpoint(path):
        log(f"Resuming the full training state (optimizer, scheduler, step, RNG) from {path}")
        return str(path), None
    if (path / "trainer_state.json").is_file() or path.name.startswith(CHECKPOINT_PREFIX):
        raise UserError(f"checkpoint {path} is incomplete (interrupted while saving); resume from an earlier one")
    if any((path / f).is_file() for f in ADAPTER_FILES):
        log(f"{path} is an adapter, not a Trainer checkpoint: starting a NEW run (step 0, fresh optimizer) from its weights")
        return None, str(path)
    raise UserError(f"--resume_from_checkpoint {path} holds neither a Trainer checkpoint nor an adapter")


def check_checkpoint_matches(checkpoint: str, lora_r: int, target_modules: list[str]) -> None:
    """A checkpoint trained with other LoRA shapes cannot resume; say which flag differs."""
    if not (Path(checkpoint) / "adapter_config.json").is_file():
        return  # an FSDP checkpoint: sharded weights, no adapter config to compare with
    config = json.loads((Path(checkpoint) / "adapter_config.json").read_text())
    if config.get("r") != lora_r:
        raise UserError(f"checkpoint {checkpoint} was trained with --lora_r {config.get('r')}, not {lora_r}")
    trained = sorted(config.get("target_modules") or [])
    if target_modules != ["all-linear"] and trained != sorted(target_modules):
        raise UserError(f"checkpoint {checkpoint} targets {trained}, not {sorted(target_modules)}: "
                        "pass the same --lora_target_modules")


def save_atomically(save, output_dir: Path) -> None:
    """Write with `save(tmpdir)`, then move each file into output_dir: an interruption never leaves a
    half-written adapter in place of a good one."""
    tmp = Path(tempfile.mkdtemp(dir=output_dir, prefix=".saving-"))
    try:
        save(tmp)
        for item in sorted(tmp.iterdir(), key=lambda p: p.suffix == ".json"):  # weights first, config last
            os.chmod(item, 0o644)  # mkdtemp's private mode must not leak onto the published files
            os.replace(item, output_dir / item.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def data_collator(tokenizer, packing: bool, model_config):
    """Padding-free rows (packing) or the original's per-batch padding to a multiple of 8."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    if not packing:
        return DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True)
    # Restarting position ids is what keeps records apart: SDPA/eager build a block-diagonal mask from
    # them (only without a KV cache, which training disables); flash-attention and utils.packing's per-record
    # SDPA take the record boundaries (cu_seqlens) instead.
    from utils.packing import NAME

    attention = str(getattr(model_config, "_attn_implementation", ""))
    flash = attention.startswith("flash") or attention == NAME
    return DataCollatorWithFlattening(return_position_ids=True, return_flash_attn_kwargs=flash)
