"""Merge a LoRA adapter into its base and export it to ONNX, with the tokenizer files beside it: `python
export_onnx.py --lora_weights ./lora-alpaca`. The graph takes input_ids and attention_mask (any batch size and
length) and returns the logits; the export is checked in ONNX Runtime before it is published.
"""

from utils.cli import log, run


def export(
    base_model: str = "",
    lora_weights: str = "",
    output_dir: str = "./exports/onnx",
    verify: bool = True,
    overwrite_output_dir: bool = False,
):
    """Save base + adapter, merged, as a float32 ONNX graph (input_ids, attention_mask -> logits) plus tokenizer.

    Args:
        base_model: {BASE_MODEL}
        lora_weights: LoRA adapter directory (finetune.py's output_dir) or Hub id; empty: export the base model alone.
        output_dir: Directory to create (it must not exist or be empty); written atomically.
        verify: Run the graph in ONNX Runtime at a new batch size and length and refuse to publish it unless its logits match PyTorch's.
        overwrite_output_dir: Replace an existing export in output_dir (the old one is deleted only on success).
    """
    import torch

    from utils.checks import check_values

    check_values(locals())  # first, before the imports below take their seconds
    from utils import export as ex
    from utils.export_onnx import check_onnx, write_onnx

    with ex.atomic_output_dir(output_dir, overwrite_output_dir) as tmp:
        base_model, base_path, adapter, _ = ex.check_inputs(base_model, lora_weights)
        log(f"Merging {ex.describe(base_model, adapter)} in float32")
        model = ex.load_merged(base_path, adapter, torch.float32)  # ONNX Runtime's CPU kernels are float32
        path = write_onnx(model, tmp)
        if verify:
            check_onnx(model, path)
        ex.save_tokenizer(base_path, tmp)
    log(f"Saved the ONNX model and its tokenizer to {output_dir}")


if __name__ == "__main__":
    run(export)
