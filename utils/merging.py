"""Combining LoRA adapters trained on one base into one adapter (PEFT's add_weighted_adapter): what merge_adapters.py
checks from the adapters' files alone, the merge itself, and the run record every later script reads."""

import json
import shutil
from pathlib import Path

from utils.cli import UserError

# PEFT's combination types. cat: the exact weighted sum of the adapters' changes (rank: the sum of theirs); svd: that
# sum cut back to a rank by SVD; linear, ties, dare_*, magnitude_prune: PEFT combines the A and B factors (equal
# ranks only), TIES/DARE/magnitude_prune keeping a --density share of each.
COMBINATIONS = ("cat", "svd", "linear", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
MERGED = "default"  # the merged adapter's name: PEFT saves the default adapter at the folder's top


def parse_list(value) -> list[str]:
    """[a,b], "a,b" or a tuple from the command line, as a list of non-empty strings."""
    items = value.split(",") if isinstance(value, str) else list(value or [])
    return [str(item).strip() for item in items if str(item).strip()]


def parse_weights(value, count: int) -> list[float]:
    """One weight per adapter; unset: equal weights summing to 1."""
    if value in (None, "", []):
        return [1 / count] * count
    try:
        weights = [float(w) for w in parse_list(value)]
    except ValueError:
        raise UserError(f"--weights must be numbers, one per adapter, e.g. 0.7,0.3; not {value!r}") from None
    if len(weights) != count:
        raise UserError(f"--weights has {len(weights)} value(s) for {count} adapters: give one per adapter")
    return weights


def check_adapters(adapters: list[str], combination_type: str) -> list[dict]:
    """The adapters' configs, once every adapter is found to be a LoRA for the same base, layers and (where the
    combination needs it) rank; one line naming the first that is not."""
    from utils.models import check_adapter_dir, embedded_as_empty
    from utils.run_record import RunRecord

    if len(adapters) < 2:
        raise UserError("--lora_weights needs at least two adapter directories to merge, e.g. ./lora-en,./lora-fr")
    if combination_type not in COMBINATIONS:
        raise UserError(f"unknown --combination_type {combination_type!r}: choose {', '.join(COMBINATIONS)}")
    configs = []
    for adapter in adapters:
        check_adapter_dir(adapter)
        record = RunRecord.read(adapter)
        config = record.adapter_config
        if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
            raise UserError(f"{adapter} is a {'DoRA' if config.get('use_dora') else config['peft_type']} adapter: "
                            "only LoRA adapters (rsLoRA, converted PiSSA/OLoRA and LoRA+ included) can be merged")
        base = embedded_as_empty(record.base_model or "")
        configs.append(dict(config, base=base, adapter=adapter))
    first = configs[0]
    for other in configs[1:]:
        pairs = [("base", "were trained on different base models", "merge adapters of one base"),
                 ("targets", "adapt different layers", "merge adapters trained with the same --lora_target_modules")]
        for key, problem, fix in pairs:
            values = [targets(c) if key == "targets" else c["base"] or "the embedded model" for c in (first, other)]
            if values[0] != values[1]:
                raise UserError(f"{first['adapter']} and {other['adapter']} {problem} ({values[0]} and {values[1]}): {fix}")
        if combination_type in SAME_RANK and other["r"] != first["r"]:
            raise UserError(f"{first['adapter']} has rank {first['r']} and {other['adapter']} rank {other['r']}: "
                            f"--combination_type {combination_type} needs equal ranks; use cat or svd")
    return configs


def targets(config: dict) -> str:
    value = config.get("target_modules")
    return ",".join(sorted(value)) if isinstance(value, list) else str(value)


def merge(model, adapters: list[str], weights: list[float], combination_type: str, density: float, svd_rank: int):
    """The base with the adapters loaded and combined into one adapter named MERGED; the parents removed."""
    from peft import PeftModel

    names = [f"parent{i}" for i in range(len(adapters))]
    model = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
    for name, adapter in zip(names[1:], adapters[1:]):
        model.load_adapter(adapter, adapter_name=name)
    extra = dict(density=density) if combination_type not in ("cat", "svd", "linear") else {}
    model.add_weighted_adapter(names, weights, MERGED, combination_type=combination_type,
                               svd_rank=svd_rank or None, **extra)
    model.set_adapter(MERGED)
    for name in names:
        model.delete_adapter(name)
    # Each parent's scale is in the merged weights; PEFT's merged config gives scale alpha/r = 1, which rsLoRA's
    # alpha/sqrt(r) (copied from the first parent) would break.
    model.peft_config[MERGED].use_rslora = False
    return model


def save(model, out: Path, adapters: list[str], record: dict) -> None:
    """The merged adapter, the first parent's tokenizer files and a training_args.json that generate.py,
    evaluate.py and the exports read (the first parent's, with how it was merged)."""
    from utils.run_record import RunRecord

    model.save_pretrained(out, save_embedding_layers=False)
    first = Path(adapters[0]).expanduser()
    for file in first.iterdir():
        if file.is_file() and (file.name.startswith(("tokenizer", "special_tokens")) or file.suffix == ".jinja"):
            shutil.copy(file, out / file.name)
    config = model.peft_config[MERGED]
    args = dict(RunRecord.read(adapters[0]).arguments, output_dir=str(record["output_dir"]), lora_r=config.r,
                lora_alpha=config.lora_alpha, use_dora=False, use_rslora=False, init_lora_weights="default",
                loraplus_lr_ratio=None, merged_from=[str(a) for a in adapters], **{k: v for k, v in record.items()
                                                                                  if k != "output_dir"})
    (out / "training_args.json").write_text(json.dumps(args, indent=2, default=str))
