"""Merge a LoRA adapter into its base and save one GGUF file for llama.cpp (and Ollama): `python export_gguf.py
--lora_weights ./lora-alpaca --outtype q4_k_m`, then `llama-cli -m exports/alpaca-lora-q4_k_m.gguf` or
`ollama create alpaca-lora -f exports/alpaca-lora-q4_k_m.Modelfile`. llama.cpp's own converter and quantizer do the
writing (utils/llamacpp.py), so the file is what llama.cpp itself makes; the tokenizer travels inside it.
"""

from utils.cli import log, run


def export(
    base_model: str = "",
    lora_weights: str = "",
    output_file: str = "",
    outtype: str = "f16",
    adapter_only: bool = False,
    pre_tokenizer: str = "",
    overwrite: bool = False,
):
    """Save base + adapter, merged, as a llama.cpp GGUF file (tokenizer embedded), or the adapter alone as a GGUF LoRA.

    Beside a merged file, NAME.Modelfile for Ollama: the conversation template the adapter was trained with, its stop
    strings and its default system prompt.

    Args:
        base_model: {BASE_MODEL} Any architecture llama.cpp's converter knows (llama, qwen2, qwen3, gemma2, gemma3, mistral, …).
        lora_weights: LoRA adapter directory (finetune.py's output_dir) or Hub id; empty: export the base model alone.
        output_file: GGUF file to create; default ./exports/alpaca-lora-OUTTYPE.gguf (…-adapter-OUTTYPE.gguf with --adapter_only). Written atomically.
        outtype: f32 | f16 | bf16 | q8_0 (llama.cpp's converter) | q4_k_m | q5_k_m | q6_k | q4_0 (llama.cpp's quantizer). Norms stay f32.
        adapter_only: Write the adapter alone as a GGUF LoRA (f32 | f16 | bf16 | q8_0), for llama.cpp's --lora on the base's GGUF, instead of merging.
        pre_tokenizer: llama.cpp's name for how the tokenizer splits text (llama-bpe, qwen2, gpt-2, smollm, …), needed only for a byte-level BPE tokenizer its converter does not recognise (one trained anew).
        overwrite: Replace an existing output_file (the old one is replaced only on success).
    """
    import time
    from pathlib import Path

    from utils import export as ex
    from utils.export_gguf import (check_adapter_only, check_gguf, merge_dtype, model_name, resolve_outtype, write_gguf,
                                   write_gguf_lora)
    from utils.llamacpp import converter_dir

    outtype = resolve_outtype(outtype, adapter_only)
    kind = "adapter-" if adapter_only else ""
    output_file = output_file or f"./exports/alpaca-lora-{kind}{outtype}.gguf"
    start = time.perf_counter()
    with ex.atomic_output_file(output_file, overwrite) as tmp:
        base_model, base_path, adapter, config = ex.check_inputs(base_model, lora_weights)
        if adapter_only:
            check_adapter_only(adapter)
        check_gguf(config, converter_dir())  # llama.cpp installed, its converter at hand, before the slow merge
        if adapter_only:
            write_gguf_lora(Path(adapter), ex.base_dir(base_path), tmp, outtype)
        else:
            dtype = merge_dtype(outtype, ex.resolve_dtype("auto", config))
            log(f"Merging {ex.describe(base_model, adapter)} in {ex.dtype_name(dtype)}")
            write_gguf(ex.load_merged(base_path, adapter, dtype), base_path, tmp, outtype, pre_tokenizer,
                       model_name(base_model, adapter))
        size = tmp.stat().st_size
    log(f"Saved {output_file} ({outtype}, {size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s")
    if not adapter_only:
        from utils.models import load_tokenizer
        from utils.ollama import write_modelfile

        modelfile = write_modelfile(Path(output_file), adapter, load_tokenizer(base_path))
        if modelfile:
            log(f"Saved {modelfile} for Ollama: ollama create alpaca-lora -f {modelfile}")


if __name__ == "__main__":
    run(export)
