"""Merge LoRA adapters trained on one base into one new adapter: `python merge_adapters.py --lora_weights
./lora-en,./lora-fr --output_dir ./lora-en-fr`. The result is an adapter directory like finetune.py's (with a
training_args.json), which generate.py, evaluate.py and every export take.
"""

from typing import Union

from utils.cli import log, run


def merge(
    lora_weights: Union[str, list[str]] = "",
    weights: Union[str, list[float]] = "",
    combination_type: str = "cat",
    density: float = 0.5,
    svd_rank: int = 0,
    base_model: str = "",
    output_dir: str = "./lora-merged",
    overwrite_output_dir: bool = False,
):
    """Combine adapters of the same base, layers (and, for some types, rank) with PEFT's add_weighted_adapter.

    Args:
        lora_weights: Two or more adapter directories, e.g. ./lora-en,./lora-fr.
        weights: One weight per adapter, e.g. 0.7,0.3; default: equal weights summing to 1.
        combination_type: cat (the exact weighted sum of the adapters' changes; rank: the sum of theirs) | svd (that sum cut to --svd_rank) | linear | ties | ties_svd | dare_linear | dare_ties | dare_linear_svd | dare_ties_svd | magnitude_prune | magnitude_prune_svd (PEFT's; linear, ties, dare_* and magnitude_prune combine the A and B factors and need equal ranks).
        density: The share of each adapter's weights that TIES, DARE and magnitude_prune keep (above 0, at most 1).
        svd_rank: The merged rank for the *svd types; 0: the largest parent rank.
        base_model: Hub id, local HF directory or .gguf file; default: $BASE_MODEL, else the base the adapters were trained on, else the embedded SmolLM2-135M-Instruct.
        output_dir: The new adapter directory (it must not exist or be empty); written atomically.
        overwrite_output_dir: Replace an existing adapter in output_dir (the old one is deleted only on success).
    """
    from utils import merging
    from utils.checks import check_values

    check_values(dict(density=density, svd_rank=svd_rank))
    adapters = merging.parse_list(lora_weights)
    merging.check_adapters(adapters, combination_type)
    factors = merging.parse_weights(weights, len(adapters))
    from utils import export as ex
    from utils.models import check_adapter_fits, choose_base_model, load_model, resolve_base_model

    with ex.atomic_output_dir(output_dir, overwrite_output_dir) as tmp:
        base_model = choose_base_model(base_model, adapters[0])
        base_path = resolve_base_model(base_model)
        for adapter in adapters:
            check_adapter_fits(base_path, adapter)
        log(f"Merging {len(adapters)} adapters of {ex.describe(base_model, '')} ({combination_type}, weights {factors})")
        model = merging.merge(load_model(base_path, "none", "cpu"), adapters, factors, combination_type, density,
                              svd_rank)
        merging.save(model, tmp, adapters, dict(output_dir=output_dir, combination_type=combination_type,
                                                weights=factors, density=density, base_model=base_model))
    log(f"Saved the merged adapter to {output_dir}")


if __name__ == "__main__":
    run(merge)
