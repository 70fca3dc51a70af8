"""Merge a LoRA adapter into its base and save it in Meta's original layout (consolidated.NN.pth + params.json +
tokenizer.model; LLaMA 1/2's, or Llama 3's for a byte-level BPE base) for Meta's reference code: `python export_state_dict_checkpoint.py
--lora_weights ./lora-alpaca`. Works for any LLaMA size: every parameter comes from the model's config.
"""

from utils.cli import log, run


def export(
    base_model: str = "",
    lora_weights: str = "",
    output_dir: str = "./exports/meta",
    num_shards: int = 1,
    dtype: str = "auto",
    overwrite_output_dir: bool = False,
):
    """Save base + adapter, merged, as Meta's consolidated.NN.pth shards with params.json.

    Args:
        base_model: {BASE_MODEL} A LLaMA-architecture model.
        lora_weights: LoRA adapter directory (finetune.py's output_dir) or Hub id; empty: export the base model alone.
        output_dir: Directory to create (it must not exist or be empty); written atomically.
        num_shards: Model-parallel ranks to split the weights over, as Meta's checkpoints are: 1 for 7B, 2 for 13B, 4 for 30B/33B, 8 for 65B/70B. Meta's code must then run with this many processes (torchrun --nproc_per_node N).
        dtype: auto (the base's own) | float32 | float16 | bfloat16 (Meta published LLaMA-2 in bfloat16).
        overwrite_output_dir: Replace an existing export in output_dir (the old one is deleted only on success).
    """
    from utils.checks import check_values

    check_values(locals())  # first, before the imports below take their seconds
    from utils import export as ex
    from utils.export_meta import check_meta, write_meta

    with ex.atomic_output_dir(output_dir, overwrite_output_dir) as tmp:
        base_model, base_path, adapter, config = ex.check_inputs(base_model, lora_weights)
        check_meta(config, num_shards)
        torch_dtype = ex.resolve_dtype(dtype, config)
        log(f"Merging {ex.describe(base_model, adapter)} in {ex.dtype_name(torch_dtype)}")
        model = ex.load_merged(base_path, adapter, torch_dtype)
        layout = write_meta(model, tmp, num_shards, base_path)
    log(f"Saved Meta's {layout} layout ({num_shards} shard{'s' if num_shards > 1 else ''}) to {output_dir}")


if __name__ == "__main__":
    run(export)
