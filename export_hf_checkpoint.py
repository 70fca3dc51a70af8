"""Merge a LoRA adapter into its base and save a plain Hugging Face checkpoint: `python export_hf_checkpoint.py
--lora_weights ./lora-alpaca`. The result loads with `AutoModelForCausalLM.from_pretrained(output_dir)` alone.
"""

from utils.cli import log, run


def export(
    base_model: str = "",
    lora_weights: str = "",
    output_dir: str = "./exports/hf",
    dtype: str = "auto",
    max_shard_size: str = "5GB",
    overwrite_output_dir: bool = False,
):
    """Save base + adapter, merged, as safetensors shards with the tokenizer and generation config.

    A base in local safetensors files is merged tensor by tensor on the CPU (utils/merge_shards.py): memory stays
    near one --max_shard_size shard, so a 70B exports on a machine that could never load it.

    Args:
        base_model: {BASE_MODEL}
        lora_weights: LoRA adapter directory (finetune.py's output_dir) or Hub id; empty: export the base model alone.
        output_dir: Directory to create (it must not exist or be empty); written atomically.
        dtype: auto (the base's own) | float32 | float16 | bfloat16. The base is loaded unquantized in this dtype.
        max_shard_size: Largest safetensors file, e.g. 5GB; bigger models are split into numbered shards.
        overwrite_output_dir: Replace an existing export in output_dir (the old one is deleted only on success).
    """
    from utils.checks import check_values

    check_values(locals())  # first, before the imports below take their seconds
    from utils import export as ex
    from utils.merge_shards import merge_by_shards

    with ex.atomic_output_dir(output_dir, overwrite_output_dir) as tmp:
        base_model, base_path, adapter, config = ex.check_inputs(base_model, lora_weights)
        torch_dtype = ex.resolve_dtype(dtype, config)
        log(f"Merging {ex.describe(base_model, adapter)} in {ex.dtype_name(torch_dtype)}")
        if not merge_by_shards(ex.base_dir(base_path), adapter, torch_dtype, tmp, max_shard_size):
            log("Merging on the whole model (this base or adapter cannot be merged file by file)")
            model = ex.load_merged(base_path, adapter, torch_dtype)
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
        ex.save_tokenizer(base_path, tmp)
    log(f"Saved the merged model to {output_dir}")


if __name__ == "__main__":
    run(export)
