"""Adapter methods beyond plain LoRA, all PEFT's own: DoRA (use_dora), rsLoRA (use_rslora: scale alpha/sqrt(r)),
PiSSA and OLoRA initialisation (init_lora_weights) and LoRA+ (a larger learning rate for lora_B). Here: which
combinations can run (checked before any model loads), the LoraConfig fields, the LoRA+ optimizer, and the
conversion that makes a PiSSA/OLoRA adapter apply to the unchanged base.
"""

import json
import math
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Optional

from utils.cli import UserError, is_main_process

INITS = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}  # flag value -> PEFT's
# Initialisations that move the top of each weight's spectrum (PiSSA: SVD, OLoRA: QR) out of the base into the
# adapter: the trained adapter applies to that changed base until it is converted (save_pretrained below).
BASE_CHANGING = ("pissa", "olora")


def describe(use_dora: bool = False, use_rslora: bool = False, init_lora_weights: str = "default",
             loraplus_lr_ratio: Optional[float] = None) -> str:
    """The method's name for logs and reports, e.g. "DoRA", "PiSSA + LoRA+" or "LoRA"."""
    parts = [{"pissa": "PiSSA", "olora": "OLoRA"}.get(init_lora_weights, ""), "DoRA" if use_dora else "",
             "rsLoRA" if use_rslora else "", "LoRA+" if loraplus_lr_ratio else ""]
    return " + ".join(part for part in parts if part) or "LoRA"


def check_methods(a: dict, quantization: str, sharded: bool, warm_start: Optional[str]) -> None:
    """finetune.py's method flags against each other and the run: one line, before any model loads. (Their values
    alone are utils.checks' rules.)"""
    init = a["init_lora_weights"]
    chosen = [f"--{key}" for key, off in (("use_dora", False), ("use_rslora", False), ("init_lora_weights", "default"))
              if a[key] != off]
    problems = [
        (warm_start and chosen, f"{', '.join(chosen)} shape a new adapter; {warm_start} brings its own method "
                                "(its adapter_config.json): drop the flag, or start a new run without it"),
        (init in BASE_CHANGING and quantization != "none",
         f"--init_lora_weights {init} decomposes the full-precision weights, not {quantization} ones: "
         "use --quantization none, or --init_lora_weights default"),
        (init in BASE_CHANGING and a["use_dora"], f"--init_lora_weights {init} with --use_dora cannot be converted to "
                                                  "an adapter for the unchanged base: choose one"),
        (init in BASE_CHANGING and sharded, f"--init_lora_weights {init} decomposes whole weights, which FSDP/ZeRO-3 "
                                            "shard: use --init_lora_weights default under these launchers"),
        (bool(a["loraplus_lr_ratio"]) and sharded, "--loraplus_lr_ratio builds its own optimizer, which FSDP/ZeRO-3 "
                                                   "do not accept: drop it under these launchers"),
    ]
    for bad, message in problems:
        if bad:
            raise UserError(message)


def lora_fields(use_dora: bool, use_rslora: bool, init_lora_weights: str) -> dict:
    """The LoraConfig fields of the method."""
    return dict(use_dora=use_dora, use_rslora=use_rslora, init_lora_weights=INITS[init_lora_weights])


def loraplus_optimizer(model, args, ratio: float):
    """PEFT's LoRA+ optimizer: AdamW as the Trainer would build it, lora_B at `ratio` times the learning rate."""
    import torch
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(model, optimizer_cls=torch.optim.AdamW, lr=args.learning_rate,
                                     loraplus_lr_ratio=ratio, weight_decay=args.weight_decay,
                                     betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)


def save_initial(model) -> Optional[str]:
    """A PiSSA/OLoRA adapter as initialised (before any step), in a temporary folder, for the conversion at save
    time (None for other methods). Initialisation is deterministic (SVD, QR of the base), so a resumed run saves the
    same one."""
    config = model.peft_config["default"]
    if str(config.init_lora_weights) not in BASE_CHANGING or not is_main_process():  # only rank 0 saves the adapter
        return None
    folder = Path(tempfile.mkdtemp(prefix="initial-adapter-")) / "initial"  # PEFT names the adapter by the folder
    model.save_pretrained(folder, save_embedding_layers=False)
    return str(folder)


def save_pretrained(model, folder: Path, initial: Optional[str], **kwargs) -> None:
    """PEFT's save_pretrained; a PiSSA/OLoRA adapter converted (rank 2r: the trained pair and the initial one,
    subtracted) so that it applies to the unchanged base, as every other adapter does."""
    with warnings.catch_warnings():
        # The conversion loads the initial adapter beside the trained one, which PEFT warns PiSSA should never be
        # (advising the very conversion it is doing).
        warnings.filterwarnings("ignore", message=".*changes the base weights of the model")
        model.save_pretrained(folder, path_initial_model_for_weight_conversion=initial, **kwargs)
    if initial:
        shutil.rmtree(Path(initial).parent, ignore_errors=True)


def adapter_config(lora_weights: str) -> dict:
    from utils.run_record import RunRecord

    return RunRecord.read(lora_weights).adapter_config


def check_llamacpp(lora_weights: str) -> None:
    """What llama.cpp cannot apply as a GGUF LoRA, refused in one line before any conversion."""
    config = adapter_config(lora_weights)  # {} for no adapter, or one not on this machine
    if config.get("use_dora"):
        raise UserError(f"{lora_weights} is a DoRA adapter: llama.cpp cannot apply its magnitude vector as a LoRA; "
                        "merge it into the base instead (export_gguf.py without --adapter_only)")


def check_unconverted(lora_weights: str, config: dict) -> None:
    """A PiSSA/OLoRA adapter as the Trainer checkpoints it applies only to the base that initialisation changed."""
    if str(config.get("init_lora_weights")) in BASE_CHANGING:
        raise UserError(f"{lora_weights} applies to the base as {config['init_lora_weights']} changed it (a Trainer "
                        "checkpoint): use the run's final adapter, which finetune.py converts for the unchanged base")


def llamacpp_ready(lora_weights: Path, work: Path) -> Path:
    """The adapter as llama.cpp's converter must read it: llama.cpp scales by alpha/r from the alpha it is given,
    so an rsLoRA adapter (alpha/sqrt(r)) is copied with alpha·sqrt(r) written in its place."""
    config = adapter_config(str(lora_weights))
    if not config.get("use_rslora"):
        return lora_weights
    copy = Path(shutil.copytree(lora_weights, work / "rslora-as-lora"))
    config.update(lora_alpha=config["lora_alpha"] * math.sqrt(config["r"]), use_rslora=False)
    (copy / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return copy
