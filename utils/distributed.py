"""Sharded launchers (accelerate with FSDP2 or DeepSpeed ZeRO-3): how finetune.py loads a base that no single
process may hold whole, which combinations cannot work, and what it needs to save a whole adapter."""

import json
import os
from contextlib import suppress
from pathlib import Path
from typing import Optional

from utils.cli import UserError

# accelerate applies FSDP on accelerators only; on a CPU it runs plain DDP whatever the config says. The test-only
# start-up hook tests/fsdp_on_cpu/sitecustomize.py changes that decision and says so here, so that a CPU run knows
# whether its ranks will be sharded (and may start empty) or replicated (and must each load the weights).
FSDP_ON_CPU = "ALPACA_LORA_FSDP_ON_CPU"
PEAK_MEMORY = "ALPACA_LORA_PEAK_MEMORY"  # a directory: each rank writes rank-N.json with its peak memory there
MIXED_PRECISION = {"bf16": "bfloat16", "fp16": "float16"}  # accelerate's --mixed_precision -> the dtype it casts to


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def zero_stage() -> Optional[int]:
    """The ZeRO stage accelerate launched with: its flag, else the DeepSpeed config file's."""
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    config = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not stage and config and Path(config).is_file():
        stage = json.loads(Path(config).read_text()).get("zero_optimization", {}).get("stage")
    return int(stage) if str(stage).isdigit() else None


def sharding(device: str = "cuda") -> str:
    """"fsdp" or "zero3" when the launcher shards the weights over the processes, else "" (one process, DDP,
    ZeRO-1/2, or FSDP on a CPU, which accelerate runs as DDP)."""
    if _flag("ACCELERATE_USE_FSDP") and (device != "cpu" or _flag(FSDP_ON_CPU)):
        return "fsdp"
    if _flag("ACCELERATE_USE_DEEPSPEED") and zero_stage() == 3:
        return "zero3"
    return ""


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def loads_empty(shard: str) -> bool:
    """Under FSDP with fsdp_cpu_ram_efficient_loading, only rank 0 reads the weights: accelerate broadcasts each
    rank its shard when it shards the model, so the others start from an empty (meta) model. (transformers 5.24
    alone still reads the checkpoint on every rank; ZeRO-3's zero.Init loads on rank 0 by itself.)"""
    return shard == "fsdp" and _flag("FSDP_CPU_RAM_EFFICIENT_LOADING") and rank() != 0


def check_launcher() -> None:
    """Refuse FSDP1 before any model loads: it renames every wrapped layer (`_fsdp_wrapped_module.`), and peft 0.21
    then finds no LoRA layer to save, so the run would end with an empty adapter (tests/test_scale.py showed it)."""
    if _flag("ACCELERATE_USE_FSDP") and os.environ.get("FSDP_VERSION", "1") != "2":
        raise UserError("FSDP1 (fsdp_version 1) cannot save a LoRA adapter with this peft; launch with "
                        "configs/fsdp.yaml, or set fsdp_version: 2 in your accelerate config")


def check_sharded_quantization(shard: str, quantization: str, config: dict, dtype) -> None:
    """The combinations of sharding and quantization that cannot work, refused before anything loads.
    `config`: the base's config.json (models.read_config); `dtype`: the dtype the base computes (and 4-bit stores) in."""
    if not shard:
        return
    name = "FSDP" if shard == "fsdp" else "ZeRO-3"
    prequantized = (config.get("quantization_config") or {}).get("quant_method")
    if prequantized:
        raise UserError(f"the base is pre-quantized ({prequantized}): {name} cannot shard its packed weights; "
                        "train it with torchrun (DDP) or --device_map auto, or shard its 16-bit original")
    if quantization == "8bit":
        raise UserError(f"an 8-bit base cannot be sharded by {name} (its int8 weights and scales are not plain "
                        "tensors): pass --quantization 4bit (QLoRA, sharded) or --quantization none")
    mixed = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    wanted = str(dtype).removeprefix("torch.")
    if quantization == "4bit" and shard == "fsdp" and MIXED_PRECISION.get(mixed, wanted) != wanted:
        # FSDP casts every weight to its param dtype, the packed 4-bit bytes too: stored in one dtype and cast to
        # another, they turn to garbage.
        flag = {v: k for k, v in MIXED_PRECISION.items()}.get(wanted, "no")
        raise UserError(f"4-bit weights are stored as {wanted} (the compute dtype) but the launcher's mixed "
                        f"precision is {mixed}: launch with --mixed_precision {flag} "
                        "(configs/fsdp_qlora.yaml), or pass --bf16 to match it")


def materialize_trainable(model) -> None:
    """Give the trainable (LoRA) weights of an empty (meta) model real, uninitialised storage. accelerate matches
    the optimizer's weights to their shards by address, and every meta tensor has the same (0); their values
    arrive from rank 0 with the base's when the model is sharded."""
    import torch

    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.requires_grad and param.is_meta:
                setattr(module, name, torch.nn.Parameter(torch.empty_like(param, device="cpu")))


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


def memory_kib(field: str) -> int:
    """A /proc/self/status figure in KiB (VmRSS: resident now; VmHWM: the peak so far), 0 where there is none."""
    with suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def record_memory(stage: str) -> None:
    """With $ALPACA_LORA_PEAK_MEMORY set, add this rank's resident and peak memory at `stage` to its
    rank-N.json there (what tests/test_shard.py and docs/scale.md compare against the model's size)."""
    folder = os.environ.get(PEAK_MEMORY)
    if not folder:
        return
    path = Path(folder) / f"rank-{rank()}.json"
    figures = json.loads(path.read_text()) if path.is_file() and stage != "start" else {}
    figures[stage] = {"rss_kib": memory_kib("VmRSS"), "peak_kib": memory_kib("VmHWM")}
    import torch

    if torch.cuda.is_available():  # on GPUs, the figure the memory table (benchmarks/memory.py) predicts
        figures[stage]["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
    Path(folder).mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=1))


def memory_callback():
    """A TrainerCallback recording each rank's memory once the model is sharded (training starts) and after the
    first optimizer step, with record_memory; None without $ALPACA_LORA_PEAK_MEMORY."""
    if not os.environ.get(PEAK_MEMORY):
        return None
    from transformers import TrainerCallback

    class RecordMemory(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            record_memory("sharded")

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                record_memory("first_step")

    return RecordMemory()
