"""Training plumbing around the Hugging Face Trainer: run directories, resuming, saving, guards."""

import contextlib
import errno
import json
import math
import os
import shutil
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
    eval_steps: int = 0  # 0: validate at the start and at the end only
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


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why a Trainer checkpoint cannot be resumed (what a kill or a full disk mid-save leaves), None when every
    file it needs is there and parses: its state, its weights and config, the optimizer's and scheduler's files."""
    from utils.durable import TEMP_PREFIX

    if not (path / "trainer_state.json").is_file():
        return "no trainer_state.json"
    if not (any((path / f).is_file() for f in ADAPTER_FILES) or (path / FSDP_WEIGHTS).is_dir()):
        return "no adapter weights"
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(TEMP_PREFIX)):
        problem = file_problem(file)
        if problem:
            return f"{file.relative_to(path)} {problem}"
    return None


def file_problem(file: Path) -> Optional[str]:
    """Why a checkpoint file does not parse (None when it does): JSON, safetensors' header, torch's zip archive."""
    import zipfile

    try:
        if file.suffix == ".json":
            json.loads(file.read_text())
        elif file.suffix == ".safetensors":
            return safetensors_problem(file)
        elif file.suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(file):
            return "is truncated (not a complete torch archive)"
    except (ValueError, UnicodeDecodeError):
        return "is not valid JSON (cut short)"
    return None


def safetensors_problem(file: Path) -> Optional[str]:
    """A safetensors file is an 8-byte header length, a JSON header, then the data its offsets span: all there?"""
    size = file.stat().st_size
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        try:
            header = json.loads(f.read(length)) if 0 < length <= size - 8 else None
        except (ValueError, UnicodeDecodeError):
            header = None
    if not isinstance(header, dict):
        return "is not a safetensors file (cut short or overwritten)"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    return None if size >= 8 + length + end else "is truncated"


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX):])


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    """The highest-numbered complete checkpoint; the incomplete ones above it are named, with what is taken instead."""
    checkpoints = [p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    for path in sorted(checkpoints, key=checkpoint_step, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log(f"Skipping {path.name}, incomplete (interrupted while saving): {problem}")
    return None


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
    problem = checkpoint_problem(path)
    if problem is None:
        log(f"Resuming the full training state (optimizer, scheduler, step, RNG) from {path}")
        return str(path), None
    if (path / "trainer_state.json").is_file() or path.name.startswith(CHECKPOINT_PREFIX):
        earlier = latest_checkpoint(path.parent) if path.name.startswith(CHECKPOINT_PREFIX) else None
        raise UserError(f"checkpoint {path} is incomplete (interrupted while saving): {problem}; resume from "
                        + (f"{earlier}, the latest complete one" if earlier else "an earlier one"))
    if any((path / f).is_file() for f in ADAPTER_FILES):
        log(f"{path} is an adapter, not a Trainer checkpoint: starting a NEW run (step 0, fresh optimizer) from its weights")
        return None, str(path)
    raise UserError(f"--resume_from_checkpoint {path} holds neither a Trainer checkpoint nor an adapter")


def check_lora_matches(adapter: str, lora: dict, target_modules: list[str], method: Optional[dict] = None) -> None:
    """Resuming or warm-starting continues the adapter's own LoRA layers: a differing --lora_r, --lora_alpha (which
    would rescale the trained weights), --lora_dropout or --lora_target_modules is refused, naming the value to pass.
    `lora`: lora_r, lora_alpha, lora_dropout as given; `method`: a checkpoint's LoraConfig method fields as given
    (utils.methods.lora_fields), which it resumes only with (another would load its weights into other layers or
    scale them otherwise)."""
    from utils.methods import INITS
    from utils.run_record import RunRecord

    config = RunRecord.read(adapter).adapter_config
    if not config:
        return  # an FSDP checkpoint: sharded weights, no adapter config to compare with
    trained = dict(lora_r=config.get("r"), lora_alpha=config.get("lora_alpha"), lora_dropout=config.get("lora_dropout"))
    for flag, value in lora.items():
        if trained[flag] is not None and not math.isclose(float(trained[flag]), float(value)):
            raise UserError(f"{adapter} was trained with --{flag} {trained[flag]}, not {value}: pass --{flag} "
                            f"{trained[flag]} to continue it (or train a new adapter without --resume_from_checkpoint)")
    modules = sorted(config.get("target_modules") or [])
    if target_modules != ["all-linear"] and modules != sorted(target_modules):
        raise UserError(f"{adapter} targets {modules}, not {sorted(target_modules)}: "
                        f"pass --lora_target_modules {','.join(modules)} to continue it")
    init_flag = {v: k for k, v in INITS.items()}
    for key, value in (method or {}).items():
        if config.get(key, value) != value:
            trained = init_flag.get(config[key], config[key]) if key == "init_lora_weights" else config[key]
            raise UserError(f"checkpoint {adapter} was trained with --{key} {trained}: pass the same to resume it")


def clear_earlier_checkpoints(output_dir: Path) -> None:
    """--overwrite_output_dir: the earlier run's checkpoint-N folders are deleted before this run saves its own, so
    --resume_from_checkpoint True can only find this run's."""
    earlier = sorted((p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir()), key=lambda p: p.name)
    for path in earlier:
        shutil.rmtree(path)
    if earlier:
        log(f"--overwrite_output_dir: deleted the earlier run's {', '.join(p.name for p in earlier)} from {output_dir}")


def run_id(checkpoint: Optional[str]) -> str:
    """A resumed run keeps the id its checkpoint recorded (utils.checkpoints.CheckpointKeeper); a new run gets one."""
    import uuid

    from utils.run_record import RunRecord

    return RunRecord.read(checkpoint).get("run_id") or uuid.uuid4().hex[:12]


@contextlib.contextmanager
def disk_errors(output_dir: Path):
    """A write the disk refuses (full, over quota, over the file size limit) while training or saving is one line:
    the durable writes left what was saved before intact, so the run can continue once there is room."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        refused = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        # torch.save reports a failed write as a RuntimeError from its zip writer, with no errno
        refused = refused or isinstance(err, RuntimeError) and "inline_container" in str(err)
        if not refused:
            raise
        why = err.strerror if isinstance(err, OSError) else "a write failed"
        raise UserError(f"the disk is full or refused a write ({why}) while saving in {output_dir}: what was saved "
                        "before is intact; free some space, then continue with --resume_from_checkpoint True") from None


def default_save_steps(total_steps: int) -> int:
    """Checkpoints every tenth of the run (and at its end): an interruption costs a tenth of it, not all of it."""
    return max(1, math.ceil(total_steps / 10))


def save_adapter(save, output_dir: Path) -> None:
    """Write with `save(staging_dir)`, then publish the files into output_dir durably, adapter_config.json last:
    a reader finds the old adapter whole, none, or the new one whole (utils.durable.publish_files)."""
    from utils import durable

    with durable.durable_files(output_dir, last="adapter_config.json") as staging:
        save(staging)


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
