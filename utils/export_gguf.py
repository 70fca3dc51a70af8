"""llama.cpp's GGUF format: one file with the hyper-parameters, the tokenizer and every weight.

Written with the `gguf` package (the writer llama.cpp's own convert_hf_to_gguf.py uses) for the "llama"
architecture, the way that converter writes a LlamaForCausalLM: q_proj/k_proj rows permuted back to
interleaved rotary pairs, 1-D tensors (norms) kept in float32, the output layer left out when it is tied to the
embeddings, the vocabulary padded to the model's size.
"""

import json
import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from utils.cli import UserError, log
from utils.export import check_llama, head_dim, rope_theta, save_tokenizer, tied_embeddings, unpermute_rotary

# --outtype -> (tensor type of 2-D weights, file type recorded in general.file_type, dtype to merge in)
OUTTYPES = {
    "f32": ("F32", "ALL_F32", torch.float32),
    "f16": ("F16", "MOSTLY_F16", torch.float16),
    "bf16": ("BF16", "MOSTLY_BF16", torch.bfloat16),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0", torch.float32),  # quantized from float32, as llama.cpp's converter does
}
OUTTYPE_ALIASES = {"float32": "f32", "fp32": "f32", "float16": "f16", "fp16": "f16", "half": "f16",
                   "bfloat16": "bf16", "q8": "q8_0", "q8_0": "q8_0"}
# The GPT-2-style pre-tokenizer regex of LLaMA-3 (tokenizer.json "Split" pattern), llama.cpp's "llama-bpe".
LLAMA3_SPLIT = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"


def resolve_outtype(outtype: str) -> str:
    key = str(outtype).lower()
    key = OUTTYPE_ALIASES.get(key, key)
    if key not in OUTTYPES:
        raise UserError(f"unknown --outtype '{outtype}': choose {', '.join(OUTTYPES)}")
    return key


def merge_dtype(outtype: str) -> torch.dtype:
    """The dtype to load and merge in: the output's own for 16-bit files (half the memory), else float32."""
    return OUTTYPES[outtype][2]


def check_gguf(config) -> None:
    """Refuse, before loading weights, a model llama.cpp's llama architecture would compute differently."""
    check_llama(config, "GGUF")


def write_gguf(model, path: Path, outtype: str, base_path: str, name: str) -> None:
    """The merged model, its hyper-parameters and the base's tokenizer as one GGUF file at `path`."""
    import gguf

    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        add_hparams(writer, model.config, outtype, name)
        add_tokenizer(writer, base_path, model.config.vocab_size)
        for gguf_name, data, qtype in gguf_tensors(model, outtype):
            writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def add_hparams(writer, config, outtype: str, name: str) -> None:
    """The llama.* keys llama.cpp builds the model from, every one read from the HF config."""
    import gguf

    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) != config.hidden_size // config.num_attention_heads:  # llama.cpp assumes this otherwise
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    writer.add_file_type(gguf.LlamaFileType[OUTTYPES[outtype][1]])
    if outtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def gguf_tensors(model, outtype: str):
    """(GGUF name, numpy data, raw type or None) for every weight, in llama.cpp's names and layout."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    skip_output = tied_embeddings(model)  # llama.cpp reuses token_embd when output.weight is absent
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and skip_output:
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(f"no GGUF name for {hf_name}: not a plain LLaMA model")
        if hf_name.endswith("self_attn.q_proj.weight"):
            tensor = unpermute_rotary(tensor, config.num_attention_heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            tensor = unpermute_rotary(tensor, config.num_key_value_heads)
        yield (gguf_name, *encode(tensor, outtype, gguf_name))


def encode(tensor: torch.Tensor, outtype: str, name: str) -> tuple[np.ndarray, object]:
    """The tensor as GGUF stores it: norms always float32 (llama.cpp computes them in float32)."""
    import gguf

    data = tensor.detach().float().numpy()
    qtype = gguf.GGMLQuantizationType[OUTTYPES[outtype][0]]
    if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        return data, None
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16), None
    if qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        log(f"{name}: rows of {data.shape[-1]} do not split into Q8_0 blocks of 32; stored as F16")
        return data.astype(np.float16), None
    return gguf.quants.quantize(data, qtype), qtype


def add_tokenizer(writer, base_path: str, vocab_size: int) -> None:
    """The base's tokenizer (SentencePiece or byte-level BPE), special tokens, merges and chat template.

    The tokenizer is first saved the way every other export saves it, so a Hub id and a local directory go
    through the same files."""
    import gguf

    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        save_tokenizer(base_path, folder)
        vocab = load_vocab(folder)
        tokens, scores, types = (list(column) for column in zip(*vocab.all_tokens()))
        if len(tokens) > vocab_size:
            raise UserError(f"the tokenizer has {len(tokens)} tokens but the model only {vocab_size} embeddings")
        for i in range(len(tokens), vocab_size):  # embedding rows no token uses, padded as llama.cpp's converter does
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model(vocab.tokenizer_model)
        if vocab.tokenizer_model == "gpt2":
            tokenizer_json = json.loads((folder / "tokenizer.json").read_text())
            writer.add_tokenizer_pre(bpe_pre_tokenizer(tokenizer_json))
            mark_added_tokens(types, tokenizer_json)
        if isinstance(vocab, gguf.SentencePieceVocab):
            writer.add_add_space_prefix(sentencepiece_adds_space(folder / "tokenizer.model"))
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        with quiet_logger("gguf.vocab"):  # it warns about a pair template LLaMA's tokenizers never use
            special = gguf.SpecialVocab(folder, load_merges=not isinstance(vocab, gguf.SentencePieceVocab),
                                        n_vocab=len(tokens))
        special.add_to_gguf(writer, quiet=True)


@contextmanager
def quiet_logger(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_vocab(folder: Path):
    """gguf's vocabulary reader for these files: SentencePiece when there is a tokenizer.model, else byte-level
    BPE (GPT-2 style, SmolLM2, LLaMA-3), else LLaMA's BPE with byte fallback from tokenizer.json."""
    import gguf

    readers = [gguf.SentencePieceVocab] if (folder / "tokenizer.model").is_file() else []
    for reader in [*readers, gguf.BpeVocab, gguf.LlamaHfVocab]:
        try:
            return reader(folder)
        except (FileNotFoundError, TypeError):
            continue
    raise UserError("the base's tokenizer is neither SentencePiece nor byte-level BPE: GGUF cannot embed it")


def bpe_pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for the way this tokenizer splits text before BPE.

    llama.cpp's converter identifies it by hashing a tokenization; the structure of tokenizer.json tells the
    common cases apart directly."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else {}
    if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
        # llama.cpp's converter names a tokenizer by hashing a sample tokenization, so a vocabulary without
        # multi-digit tokens (SmolLM's, whose copy converted from GGUF has no Digits step) is "smollm" all the same.
        return "smollm" if splits_digits(tokenizer_json) else "gpt-2"  # llama.cpp knows "gpt-2", not "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level.get("use_regex", True):
        return "smollm"  # GPT-2's regex after splitting digits one by one (SmolLM, StarCoder)
    if kinds == ["Split", "ByteLevel"] and LLAMA3_SPLIT in str(steps[0].get("pattern", {}).get("Regex", "")):
        return "llama-bpe"
    log(f"warning: unrecognised pre-tokenizer {kinds}; llama.cpp will split text its default way")
    return "default"


def splits_digits(tokenizer_json: dict) -> bool:
    """Whether this tokenizer cuts a run of digits into single digits."""
    from tokenizers import Tokenizer

    digits = "3333333"
    return Tokenizer.from_str(json.dumps(tokenizer_json)).encode(digits, add_special_tokens=False).tokens == list(digits)


def mark_added_tokens(types: list, tokenizer_json: dict) -> None:
    """Special added tokens (<|im_start|>, …) are CONTROL, other added ones USER_DEFINED, as llama.cpp's converter
    marks them: llama.cpp matches only those as whole tokens in a prompt, never splitting them into bytes."""
    import gguf

    for added in tokenizer_json.get("added_tokens", []):
        if added["id"] < len(types):
            types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED


def sentencepiece_adds_space(model_file: Path) -> bool:
    """The model's add_dummy_prefix (LLaMA-1/2: a space before the first word), which llama.cpp must repeat."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    return proto.normalizer_spec.add_dummy_prefix
