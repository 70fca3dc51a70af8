"""Shared by the export scripts: load a base model unquantized, merge a LoRA adapter into it, write atomically.

The format writers live beside this module: utils/export_meta.py (Meta's consolidated .pth), utils/export_gguf.py
(llama.cpp) and utils/export_onnx.py (ONNX Runtime).
"""

import importlib.util
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from itertools import takewhile
from pathlib import Path
from typing import ContextManager, Iterator, Optional

import torch

from utils import durable
from utils.checks import DTYPE_ALIASES, check_value
from utils.cli import UserError, log

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, config) -> torch.dtype:
    """--dtype: "auto" is the base's own dtype (from its config; float32 when it names none)."""
    check_value("dtype", name)
    key = DTYPE_ALIASES.get(str(name).lower(), str(name).lower())
    if key == "auto":  # transformers reads config.json's dtype (or the older torch_dtype) into config.dtype
        return config.dtype if config.dtype in DTYPES.values() else torch.float32
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def atomic_output_dir(output_dir: str, overwrite: bool = False) -> ContextManager[Path]:
    """A fresh directory beside output_dir to write into; renamed to output_dir only when the block finishes."""
    target = Path(output_dir).expanduser().absolute()
    if target.exists() and not target.is_dir():
        raise UserError(f"--output_dir {output_dir} is a file, not a directory")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise UserError(f"--output_dir {output_dir} is not empty: choose a new directory, "
                        "or pass --overwrite_output_dir to replace what is there")
    return staged(target, f"--output_dir {output_dir}", directory=True)


def atomic_output_file(output_file: str, overwrite: bool = False) -> ContextManager[Path]:
    """A temporary file beside output_file (GGUF) to write into; renamed over output_file when the block finishes."""
    target = Path(output_file).expanduser().absolute()
    if target.is_dir():
        raise UserError(f"--output_file {output_file} is a directory: name the file to write (e.g. model.gguf)")
    if target.exists() and not overwrite:
        raise UserError(f"--output_file {output_file} exists: choose a new name, or pass --overwrite to replace it")
    return staged(target, f"--output_file {output_file}", directory=False)


@contextmanager
def staged(target: Path, flag: str, directory: bool) -> Iterator[Path]:
    """A temporary directory or file beside target (utils.durable), moved into place when the block finishes. On any
    error (or Ctrl-C) it is removed, with the parent directories this call created: a failed export never leaves a
    half-written model where a runtime could pick it up. `flag`: the flag and value, for the error."""
    created = missing_parents(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        durable.sweep(target.parent, target.name)  # what an export killed before this one left
        tempfile.TemporaryFile(dir=target.parent).close()  # writable? (an unnamed file: nothing to clean up)
    except OSError as err:
        remove_empty(created)
        raise UserError(f"{flag} is not writable ({err.strerror})") from None
    try:
        with (durable.durable_dir if directory else durable.durable_file)(target) as tmp:
            yield tmp
            durable.make_readable(tmp)
    except BaseException:
        remove_empty(created)
        raise


def missing_parents(path: Path) -> list[Path]:
    """The ancestors of path that do not exist yet, deepest first (so they can be removed in order)."""
    return list(takewhile(lambda parent: not parent.exists(), path.parents))


def remove_empty(dirs: list[Path]) -> None:
    for path in dirs:
        try:
            path.rmdir()
        except OSError:
            break


def rope_parameters(config) -> dict:
    return getattr(config, "rope_parameters", None) or {}


def rope_theta(config) -> float:
    return float(rope_parameters(config).get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def unpermute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k rows from HF's rotary layout (the two halves of each head) back to Meta's (interleaved pairs).

    The inverse of `permute` in transformers' convert_llama_weights_to_hf.py; llama.cpp stores this order too.
    Pass n_kv_heads for k: with grouped-query attention it has fewer heads than q."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def check_inputs(base_model: str, lora_weights: Optional[str]):
    """(the base model's name, its path, adapter or None, base config) for an export, every mistake found before
    weights load. The base is models.choose_base_model's."""
    from transformers import AutoConfig

    from utils.models import check_adapter_dir, check_adapter_fits, choose_base_model, resolve_base_model

    adapter = None if lora_weights in (None, "", "none", "None", False) else str(lora_weights)
    if adapter:
        check_adapter_dir(adapter)
    else:
        log("No --lora_weights given: exporting the base model alone")
    base_model = choose_base_model(base_model, adapter)
    base_path = resolve_base_model(base_model)
    check_quantization(base_model, base_path)
    try:
        config = AutoConfig.from_pretrained(base_path)
    except OSError as err:
        raise UserError(f"could not load base model '{base_path}': {str(err).splitlines()[0]}") from None
    if adapter:
        check_adapter_fits(base_path, adapter)
    return base_model, base_path, adapter, config


def check_quantization(base_model: str, base_path: str) -> None:
    """A base saved pre-quantized is merged into after dequantizing it (bitsandbytes: transformers' dequantize());
    other methods' packed weights cannot be, and are refused: the adapter's delta would be lost or misapplied."""
    from utils.models import saved_quantization

    method = saved_quantization(base_path)
    if method and not method.startswith("bitsandbytes"):
        raise UserError(f"base model {base_model} is saved quantized ({method}): its packed weights cannot be "
                        "dequantized here to merge an adapter into; pass the unquantized base as --base_model")
    if method and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"base model {base_model} is saved in {method}: dequantizing it for the merge needs "
                        "bitsandbytes (pip install bitsandbytes), or pass the unquantized base as --base_model")


def load_merged(base_path: str, lora_weights: Optional[str], dtype: torch.dtype):
    """The base model, unquantized in `dtype` on the CPU, with every module the adapter adapts merged in.

    LoRA weights stay float32 and PEFT adds their delta in one rounding step, so merging into a 16-bit base
    loses nothing against merging in float32 and halves the memory (never 8/4-bit: merging into
    quantized weights rounds the delta away)."""
    from utils.models import load_model

    model = load_model(base_path, "none", "cpu", dtype=dtype)
    if getattr(model, "is_quantized", False):  # saved pre-quantized (check_quantization): integer weights
        model = model.dequantize().to(dtype)  # also drops config.quantization_config: the export is plain
        log(f"The base was saved quantized: dequantized to {dtype_name(dtype)} for the merge; the export is not quantized")
    if lora_weights:
        if tied_embeddings(model) and adapter_touches_embeddings(model, lora_weights):
            untie_embeddings(model)
        model = apply_adapter(model, lora_weights).merge_and_unload()
        bad = next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None)
        if bad:
            raise UserError(f"merging {lora_weights} made {bad} NaN or infinite: the adapter is broken (retrain it)")
    return model.eval()


def apply_adapter(model, lora_weights: str):
    """PeftModel with the adapter loaded; an adapter for another base fails with one line, not a traceback."""
    from utils.models import load_adapter

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = load_adapter(model, lora_weights)
        except ValueError as err:  # PEFT: target modules that this base does not have
            raise UserError(f"adapter {lora_weights} does not fit this base model: {str(err).splitlines()[0]}") from None
    if any("missing adapter keys" in str(w.message) for w in caught):
        raise UserError(f"adapter {lora_weights} was trained for another base model (its layers do not match); "
                        "pass the --base_model it was trained on")
    return model


def tied_embeddings(model) -> bool:
    out = model.get_output_embeddings()
    return out is not None and out.weight is model.get_input_embeddings().weight


def adapter_touches_embeddings(model, lora_weights: str) -> bool:
    """Does the adapter change the embedding or the output layer (LoRA target, modules_to_save, trainable tokens)?"""
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(lora_weights)
    fields = str([getattr(config, f, None) for f in ("target_modules", "modules_to_save", "trainable_token_indices")])
    names = {n for n, m in model.named_modules() if m in (model.get_input_embeddings(), model.get_output_embeddings())}
    return any(name.rsplit(".", 1)[-1] in fields for name in names)


def untie_embeddings(model) -> None:
    """Give the output layer its own copy of the embedding matrix: with tied weights, merging an adapter into one
    would silently change the other, unlike the adapter on the unmerged model."""
    out = model.get_output_embeddings()
    out.weight = torch.nn.Parameter(out.weight.detach().clone())
    model.config.tie_word_embeddings = False
    log("The adapter changes the (tied) embeddings: the export stores the output layer separately")


def base_file(base_path: str, name: str) -> Optional[Path]:
    """A file of the base model (local directory or hub cache), or None when the base has none."""
    local = Path(base_path) / name
    if Path(base_path).is_dir():
        return local if local.is_file() else None
    from transformers.utils.hub import cached_file

    found = cached_file(base_path, name, _raise_exceptions_for_missing_entries=False)
    return Path(found) if found else None


def base_dir(base_path: str) -> Path:
    """The base's folder on this machine; a Hub id's snapshot folder in the cache (which holds its weights only once
    they are downloaded: utils.merge_shards then finds none and the export loads the model instead)."""
    return base_file(base_path, "config.json").parent


def load_base_tokenizer(base_path: str):
    """The base's tokenizer exactly as published (no pad token invented), which every export embeds."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_path)


def save_tokenizer(base_path: str, out: Path) -> None:
    """The tokenizer files next to the weights, plus the SentencePiece model when the base has one (no fast
    tokenizer writes it, but Meta's code and llama.cpp read it)."""
    load_base_tokenizer(base_path).save_pretrained(out)
    sentencepiece = base_file(base_path, "tokenizer.model")
    if sentencepiece and not (out / "tokenizer.model").exists():
        shutil.copyfile(sentencepiece, out / "tokenizer.model")


def describe(base_model: str, lora_weights: Optional[str]) -> str:
    base = base_model or "the embedded SmolLM2-135M-Instruct"
    return base + (f" + {lora_weights}" if lora_weights else "")
