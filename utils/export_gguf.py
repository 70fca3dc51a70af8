"""llama.cpp's GGUF, made by llama.cpp's own tools (utils/llamacpp.py): the merged model saved as a plain HF
checkpoint, converted by convert_hf_to_gguf.py (every architecture that converter knows: llama with Llama 3.1's
rope_freqs and 3.2's tied output, qwen2, qwen3, gemma2, gemma3, …), then quantized by llama.cpp's quantizer for
the K-quant types; or the adapter alone as a GGUF LoRA (convert_lora_to_gguf.py) for llama.cpp's --lora.
"""

import tempfile
from pathlib import Path

import torch

from utils.cli import UserError
from utils.export import head_dim, save_tokenizer
from utils.llamacpp import CONVERTER_TYPES, OUTTYPES, QUANT_TYPES, quantize, run_converter
from utils.methods import check_llamacpp, llamacpp_ready

OUTTYPE_ALIASES = {"float32": "f32", "fp32": "f32", "float16": "f16", "fp16": "f16", "half": "f16",
                   "bfloat16": "bf16", "q8": "q8_0", "q4_k": "q4_k_m", "q5_k": "q5_k_m"}


def resolve_outtype(outtype: str, adapter_only: bool = False) -> str:
    key = str(outtype).lower()
    key = OUTTYPE_ALIASES.get(key, key)
    if key not in OUTTYPES:
        raise UserError(f"unknown --outtype '{outtype}': choose {', '.join(OUTTYPES)}")
    if adapter_only and key not in CONVERTER_TYPES:
        raise UserError(f"--adapter_only writes a GGUF LoRA in {', '.join(CONVERTER_TYPES)}, not {key} "
                        "(llama.cpp quantizes whole models, not adapters)")
    return key


def check_adapter_only(lora_weights: str) -> None:
    """--adapter_only converts a local adapter directory (llama.cpp's converter reads it from disk) that llama.cpp
    can apply."""
    if not lora_weights:
        raise UserError("--adapter_only exports an adapter: pass its directory with --lora_weights")
    if not Path(lora_weights).expanduser().is_dir():
        raise UserError(f"--adapter_only needs the adapter as a local directory; {lora_weights} is not one "
                        "(download a Hub adapter first, e.g. with `hf download`)")
    check_llamacpp(lora_weights)


def check_gguf(config, converter: Path) -> None:
    """Refuse, before the slow merge, a model llama.cpp's converter cannot convert or llama.cpp would compute
    differently from transformers."""
    architecture = (getattr(config, "architectures", None) or [""])[0]
    registered = "".join(path.read_text() for path in (converter / "conversion").glob("*.py"))
    if architecture and f'"{architecture}"' not in registered:  # the converter's @ModelBase.register("...") names
        raise UserError(f"llama.cpp's converter (llama.cpp of llama-cpp-python {converter.name}) does not know "
                        f"{architecture}; export_hf_checkpoint.py and export_onnx.py take any causal LM")
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if config.model_type.startswith("gemma") and scalar not in (None, head_dim(config),
                                                                  config.hidden_size // config.num_attention_heads):
        raise UserError(f"llama.cpp scales Gemma's attention by its head size, not query_pre_attn_scalar={scalar}: "
                        "the GGUF would compute another model")


def merge_dtype(outtype: str, own: torch.dtype) -> torch.dtype:
    """The dtype to load and merge in: the output's own for 16-bit files (half the memory); for quantized files
    the base's own (the quantizer starts from a 16-bit or float32 file, as llama.cpp's docs do); else float32."""
    if outtype in QUANT_TYPES:
        return own
    return {"f16": torch.float16, "bf16": torch.bfloat16}.get(outtype, torch.float32)


def model_name(base_model: str, lora_weights: str = "") -> str:
    """The GGUF's general.name (what llama.cpp and Ollama show): the base as the user named it, plus the adapter's."""
    from utils.models import base_model_name

    base = Path(base_model_name(base_model)).name
    return f"{base} + {Path(lora_weights).name}" if lora_weights else base


def write_gguf(model, base_path: str, path: Path, outtype: str, pre_tokenizer: str = "", name: str = "") -> None:
    """The merged model, with the base's tokenizer, as one GGUF file at path; `name` its general.name (default: the
    converter's guess from the folder it reads, which is a temporary one here)."""
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".gguf-work-") as work:
        checkpoint = Path(work) / "hf"
        model.save_pretrained(checkpoint)
        save_tokenizer(base_path, checkpoint)
        if outtype in CONVERTER_TYPES:
            convert(checkpoint, path, outtype, pre_tokenizer, name)
            return
        unquantized = Path(work) / "model.gguf"
        convert(checkpoint, unquantized, "auto", pre_tokenizer, name)  # f16, or bf16 for a bf16 base
        del model  # the quantizer holds its own copy; free the merged weights' memory
        quantize(unquantized, path, outtype)


def convert(checkpoint: Path, path: Path, outtype: str, pre_tokenizer: str = "", name: str = "") -> None:
    names = ["--model-name", name] if name else []
    run_converter("convert_hf_to_gguf.py", [str(checkpoint), "--outfile", str(path), "--outtype", outtype, *names],
                  pre_tokenizer)


def write_gguf_lora(adapter: Path, base: Path, path: Path, outtype: str) -> None:
    """The adapter alone as a GGUF LoRA; --base gives the converter the base's config (its weights are not read)."""
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".gguf-work-") as work:
        run_converter("convert_lora_to_gguf.py", [str(llamacpp_ready(adapter, Path(work))), "--base", str(base),
                                                  "--outfile", str(path), "--outtype", outtype])
