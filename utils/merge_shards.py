"""Merge a LoRA adapter into a base checkpoint one safetensors tensor at a time, on the CPU, never holding the
whole model: what export_hf_checkpoint.py does for a base no single process can hold (a 70B is 140 GB in bf16).

Each merged weight is W + scale · B·A, added in float32 and rounded once to the export's dtype, as PEFT's
merge_and_unload does into a 16-bit base. Memory stays near one output shard (--max_shard_size) plus one tensor."""

import json
import math
from contextlib import suppress
from pathlib import Path
from typing import Optional

import torch

from utils.cli import UserError

INDEX = "model.safetensors.index.json"
# Adapter features whose merge is not W + scale·B·A on one weight: those adapters are merged by PEFT on the whole
# model instead (utils.export.load_merged).
UNSUPPORTED = ("use_dora", "modules_to_save", "trainable_token_indices", "lora_bias", "target_parameters",
               "rank_pattern", "alpha_pattern", "fan_in_fan_out")


def base_files(base: Path) -> list[Path]:
    """The base's safetensors files in order ([] for a .bin checkpoint or none)."""
    index = base / INDEX
    if index.is_file():
        return [base / name for name in dict.fromkeys(json.loads(index.read_text())["weight_map"].values())]
    return [base / "model.safetensors"] if (base / "model.safetensors").is_file() else []


def lora_deltas_source(lora_weights: str) -> Optional[tuple[dict, float]]:
    """(adapter tensors by base weight name, the adapter's scale), or None where the adapter needs PEFT."""
    from safetensors.torch import load_file

    path = Path(lora_weights)
    config = json.loads((path / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA" or any(config.get(key) for key in UNSUPPORTED):
        return None
    if not (path / "adapter_model.safetensors").is_file():
        return None
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    tensors = {}
    for key, value in load_file(path / "adapter_model.safetensors").items():
        module, _, part = key.removeprefix("base_model.model.").rpartition(".lora_")
        if part not in ("A.weight", "B.weight"):
            return None  # embeddings (lora_embedding_A/B) or another layout
        tensors.setdefault(f"{module}.weight", {})[part[0]] = value
    return tensors, scale


def plan(files: list[Path], dtype: torch.dtype, max_bytes: int) -> list[list[tuple[Path, str]]]:
    """The output shards: (file, name) of each tensor, in the base's order, each shard under max_bytes, read from
    the safetensors headers alone."""
    from safetensors import safe_open

    shards, size = [[]], 0
    for file in files:
        with safe_open(file, "pt") as f:
            for name in f.keys():
                header = f.get_slice(name)
                floating = header.get_dtype().startswith(("F", "BF"))  # cast to dtype; integer buffers kept
                nbytes = math.prod(header.get_shape()) * (dtype.itemsize if floating else 8)
                if shards[-1] and size + nbytes > max_bytes:
                    shards.append([])
                    size = 0
                shards[-1].append((file, name))
                size += nbytes
    return shards


def merged_tensor(tensor: torch.Tensor, name: str, dtype: torch.dtype, lora: dict, scale: float) -> torch.Tensor:
    if not tensor.is_floating_point():
        return tensor
    if name not in lora:
        return tensor.to(dtype)
    pair = lora[name]
    delta = scale * (pair["B"].float() @ pair["A"].float())
    merged = (tensor.float() + delta).to(dtype)
    if not torch.isfinite(merged).all():
        raise UserError(f"merging the adapter made {name} NaN or infinite: the adapter is broken (retrain it)")
    return merged


def merge_by_shards(base: Path, lora_weights: Optional[str], dtype: torch.dtype, out: Path, max_shard_size) -> bool:
    """Write base + adapter, merged, into `out` as safetensors shards with the config; False (nothing written)
    where this base or adapter needs the whole-model path (no local safetensors, a base saved quantized, adapter
    features beyond LoRA on linear weights, weights the checkpoint names otherwise)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers.utils.hub import convert_file_size_to_int

    from utils.models import saved_quantization

    files = base_files(base)
    source = lora_deltas_source(lora_weights) if lora_weights else ({}, 1.0)
    if not files or source is None or saved_quantization(str(base)):  # packed integer weights: dequantize first
        return False
    lora, scale = source
    shards = plan(files, dtype, convert_file_size_to_int(max_shard_size))
    if not set(lora) <= {name for shard in shards for _, name in shard}:
        return False
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    if len(shards) == 1:
        names = ["model.safetensors"]
    weight_map, total = {}, 0
    for shard, file_name in zip(shards, names):
        tensors = {}
        for file, name in shard:
            with safe_open(file, "pt") as f:  # opened per tensor: no file stays mapped while the shard grows
                tensors[name] = merged_tensor(f.get_tensor(name), name, dtype, lora, scale).contiguous()
        save_file(tensors, out / file_name, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, file_name))
    if len(shards) > 1:
        (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    save_configs(base, out, dtype)
    return True


def save_configs(base: Path, out: Path, dtype: torch.dtype) -> None:
    """config.json with the export's dtype (and no quantization), and the generation config as the base has it."""
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(base)
    config.dtype = dtype
    config.save_pretrained(out)
    with suppress(OSError):  # the base may have none
        GenerationConfig.from_pretrained(base).save_pretrained(out)
