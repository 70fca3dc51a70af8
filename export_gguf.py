"""Merge a LoRA adapter into its base and save one GGUF file for llama.cpp: `python export_gguf.py
--lora_weights ./lora-alpaca --outtype q8_0`, then `llama-cli -m exports/alpaca-lora-q8_0.gguf`. The tokenizer
travels inside the file.
"""

from utils.cli import log, run


def export(
    base_model: str = "",
    lora_weights: str = "",
    output_file: str = "",
    outtype: str = "f16",
    overwrite: bool = False,
):
    """Save base + adapter, merged, as a llama.cpp GGUF file (llama architecture, tokenizer embedded).

    Args:
        base_model: Hub id, local HF directory or .gguf file of a LLaMA-architecture model; default: the embedded SmolLM2-135M-Instruct.
        lora_weights: LoRA adapter directory (finetune.py's output_dir) or Hub id; empty: export the base model alone.
        output_file: GGUF file to create; default ./exports/alpaca-lora-OUTTYPE.gguf. Written atomically.
        outtype: f32 | f16 | bf16 | q8_0 (8-bit blocks, about half the size of f16). Norms are always f32.
        overwrite: Replace an existing output_file (the old one is replaced only on success).
    """
    import time

    from utils import export as ex
    from utils.export_gguf import check_gguf, merge_dtype, resolve_outtype, write_gguf

    outtype = resolve_outtype(outtype)
    output_file = output_file or f"./exports/alpaca-lora-{outtype}.gguf"
    start = time.perf_counter()
    with ex.atomic_output_file(output_file, overwrite) as tmp:
        base_path, adapter, config = ex.check_inputs(base_model, lora_weights)
        check_gguf(config)
        log(f"Merging {ex.describe(base_model, adapter)} in {ex.dtype_name(merge_dtype(outtype))}")
        model = ex.load_merged(base_path, adapter, merge_dtype(outtype))
        write_gguf(model, tmp, outtype, base_path, name=ex.describe(base_model, adapter))
        size = tmp.stat().st_size
    log(f"Saved {output_file} ({outtype}, {size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run(export)
