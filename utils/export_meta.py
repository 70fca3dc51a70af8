"""Meta's original LLaMA checkpoint layout: consolidated.NN.pth (one per model-parallel rank) + params.json.

Two layouts: LLaMA 1/2 (SentencePiece tokenizer.model, github.com/meta-llama/llama) and Llama 3 (byte-level BPE,
github.com/meta-llama/llama-models: params.json with rope_theta and use_scaled_rope, tokenizer.model holding
tiktoken's ranks). The weights are laid out the same way in both.

Meta's reference code (github.com/meta-llama/llama) builds each rank's slice of the model with fairscale's
ColumnParallelLinear (output rows split, dim 0), RowParallelLinear (input columns split, dim 1) and
ParallelEmbedding (embedding columns split, dim 1); norms are copied to every rank.
"""

import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from utils.cli import UserError, log
from utils.export import base_file, head_dim, load_base_tokenizer, rope_parameters, rope_theta, unpermute_rotary

# HF name (after "model.layers.N.") -> (Meta name after "layers.N.", split dimension; None: every shard has a copy)
LAYER_NAMES = {
    "self_attn.q_proj.weight": ("attention.wq.weight", 0),
    "self_attn.k_proj.weight": ("attention.wk.weight", 0),
    "self_attn.v_proj.weight": ("attention.wv.weight", 0),
    "self_attn.o_proj.weight": ("attention.wo.weight", 1),
    "mlp.gate_proj.weight": ("feed_forward.w1.weight", 0),
    "mlp.down_proj.weight": ("feed_forward.w2.weight", 1),
    "mlp.up_proj.weight": ("feed_forward.w3.weight", 0),
    "input_layernorm.weight": ("attention_norm.weight", None),
    "post_attention_layernorm.weight": ("ffn_norm.weight", None),
}
TOP_NAMES = {
    "model.embed_tokens.weight": ("tok_embeddings.weight", 1),
    "model.norm.weight": ("norm.weight", None),
    "lm_head.weight": ("output.weight", 0),
}
# Meta's code hard-codes these; params.json states a value only where the model differs (as Meta's own files do,
# which keeps the LLaMA-1/2 code, whose ModelArgs rejects unknown keys, able to load LLaMA-1/2-shaped exports).
META_ROPE_THETA = 10000.0
# Llama 3.1's RoPE scaling as Meta's apply_scaling hard-codes it (use_scaled_rope turns it on, nothing sets it).
META_LLAMA3_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float] = None) -> int:
    """The SwiGLU hidden size Meta's FeedForward derives from params.json."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def ffn_params(dim: int, intermediate: int) -> dict:
    """multiple_of (and ffn_dim_multiplier) that make Meta's formula give back the model's FFN size.

    Meta's own values come first (LLaMA-1/2 7B-65B: 256; LLaMA-2 70B: 4096 × 1.3; LLaMA-3: 1024 × 1.3); any other
    size is reached exactly with multiple_of = the size itself, scaled down first when the formula overshoots."""
    for multiple_of, multiplier in ((256, None), (4096, 1.3), (1024, 1.3), (256, 1.3)):
        if meta_ffn_dim(dim, multiple_of, multiplier) == intermediate:
            return {"multiple_of": multiple_of} | ({"ffn_dim_multiplier": multiplier} if multiplier else {})
    base = int(2 * (4 * dim) / 3)
    params = {"multiple_of": intermediate} | ({"ffn_dim_multiplier": intermediate / base} if base > intermediate else {})
    assert meta_ffn_dim(dim, **params) == intermediate, (dim, intermediate, params)
    return params


def check_meta(config, num_shards) -> None:
    """Everything that can be wrong with the model or --num_shards, found from the config before loading weights."""
    if config.model_type != "llama":
        raise UserError(f"Meta's layout is LLaMA's; {config.model_type} is not LLaMA "
                        "(export_hf_checkpoint.py, export_gguf.py and export_onnx.py take it)")
    rope = rope_parameters(config)
    if rope.get("rope_type", "default") not in ("default", "llama3"):
        raise UserError(f"Meta's code has no '{rope['rope_type']}' RoPE scaling")
    if rope.get("rope_type") == "llama3" and any(rope.get(k) != v for k, v in META_LLAMA3_ROPE.items()):
        given = {k: rope.get(k) for k in META_LLAMA3_ROPE}
        raise UserError(f"Meta's code hard-codes Llama 3.1's RoPE scaling {META_LLAMA3_ROPE}; this model has {given}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise UserError("Meta's layout has no attention or MLP biases")
    if head_dim(config) != config.hidden_size // config.num_attention_heads:
        raise UserError("Meta's layout derives the head size as dim / n_heads; this model's head_dim differs")
    check_num_shards(config, num_shards)


def meta_params(config, llama3: bool) -> dict:
    """params.json, every value read from the HF config; Llama 3's always states rope_theta."""
    params = {"dim": config.hidden_size, "n_layers": config.num_hidden_layers, "n_heads": config.num_attention_heads}
    if config.num_key_value_heads != config.num_attention_heads:  # grouped-query attention (LLaMA-2 70B style)
        params["n_kv_heads"] = config.num_key_value_heads
    params["vocab_size"] = config.vocab_size
    params |= ffn_params(config.hidden_size, config.intermediate_size)
    params["norm_eps"] = config.rms_norm_eps
    if rope_theta(config) != META_ROPE_THETA or llama3:
        params["rope_theta"] = rope_theta(config)
    if rope_parameters(config).get("rope_type") == "llama3":  # Llama 3.1's key; 3.0's code (ModelArgs) rejects it
        params["use_scaled_rope"] = True
    return params


def check_num_shards(config, num_shards) -> None:
    """Every split tensor must divide evenly over the ranks, as fairscale requires."""
    if not isinstance(num_shards, int) or isinstance(num_shards, bool) or num_shards < 1:
        raise UserError(f"--num_shards must be a whole number ≥ 1, not {num_shards!r}")
    sizes = {"attention heads": config.num_attention_heads, "KV heads": config.num_key_value_heads,
             "hidden size": config.hidden_size, "FFN size": config.intermediate_size, "vocabulary": config.vocab_size}
    bad = [f"{size} {what}" for what, size in sizes.items() if size % num_shards]
    if bad:
        raise UserError(f"--num_shards {num_shards} does not divide the model's {', '.join(bad)}; Meta uses 1 shard "
                        "for 7B, 2 for 13B, 4 for 30B/33B and 8 for 65B/70B")


def meta_tensors(state_dict: dict, config) -> dict[str, tuple[torch.Tensor, Optional[int]]]:
    """Meta name -> (tensor, split dimension); tied embeddings give output.weight its own entry."""
    rotary_heads = {"self_attn.q_proj.weight": config.num_attention_heads,
                    "self_attn.k_proj.weight": config.num_key_value_heads}
    tensors = {}
    for name, tensor in state_dict.items():
        if name in TOP_NAMES:
            meta, dim = TOP_NAMES[name]
        elif name.startswith("model.layers.") and name.split(".", 3)[3] in LAYER_NAMES:
            layer, suffix = name.split(".", 3)[2:]
            meta, dim = LAYER_NAMES[suffix]
            meta = f"layers.{layer}.{meta}"
            if suffix in rotary_heads:
                tensor = unpermute_rotary(tensor, rotary_heads[suffix])
        else:
            raise UserError(f"no place for {name} in Meta's layout: not a plain LLaMA model")
        tensors[meta] = (tensor, dim)
    if "output.weight" not in tensors:  # tied: Meta's model always has its own output layer
        tensors["output.weight"] = (tensors["tok_embeddings.weight"][0], TOP_NAMES["lm_head.weight"][1])
    return tensors


def shard(tensors: dict, rank: int, num_shards: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s slice of every tensor (cloned: saving a view would save the whole tensor)."""
    if num_shards == 1:
        return {name: tensor.contiguous() for name, (tensor, _) in tensors.items()}
    return {name: tensor if dim is None else tensor.chunk(num_shards, dim)[rank].clone()
            for name, (tensor, dim) in tensors.items()}


def write_meta(model, out: Path, num_shards: int, base_path: str) -> str:
    """consolidated.00.pth … (one per rank), params.json and the tokenizer; returns which layout it wrote."""
    config = model.config
    tensors = meta_tensors(model.state_dict(), config)
    for rank in range(num_shards):
        torch.save(shard(tensors, rank, num_shards), out / f"consolidated.{rank:02d}.pth")
    sentencepiece = base_file(base_path, "tokenizer.model")
    (out / "params.json").write_text(json.dumps(meta_params(config, llama3=not sentencepiece), indent=2) + "\n")
    if sentencepiece:
        shutil.copyfile(sentencepiece, out / "tokenizer.model")
        return "LLaMA 1/2 (SentencePiece tokenizer.model)"
    return write_llama3_tokenizer(base_path, out)


def write_llama3_tokenizer(base_path: str, out: Path) -> str:
    """tokenizer.model in tiktoken's form when the HF tokenizer is exactly what Meta's Tokenizer would build from it;
    otherwise the HF tokenizer files, and a line saying why Meta's code cannot use them."""
    tokenizer = load_base_tokenizer(base_path)
    ranks, problem = tiktoken_ranks(json.loads(tokenizer.backend_tokenizer.to_str()))
    if ranks is None:
        tokenizer.save_pretrained(out)
        log(f"No tokenizer.model: Meta's Llama 3 code builds its tokenizer from tiktoken ranks plus its own 256 "
            f"special tokens, and {problem}; use tokenizer.json (transformers, llama.cpp) beside the weights")
        return "Llama 3 (params.json; tokenizer.json instead of tokenizer.model)"
    (out / "tokenizer.model").write_text("".join(f"{token} {rank}\n" for token, rank in ranks))
    return "Llama 3 (params.json, tiktoken tokenizer.model)"


# Meta's Llama 3 tokenizer: the split pattern it hard-codes, and where it puts the special tokens that chat needs
# (after the BPE ranks, in this order; the same in Llama 3.0 and 3.1).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<|start_header_id|>": 6, "<|end_header_id|>": 7,
                   "<|eot_id|>": 9}


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet back to bytes: printable bytes stand for themselves, the rest for 256 + n."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


def tiktoken_ranks(tokenizer_json: dict) -> tuple[Optional[list[tuple[str, int]]], str]:
    """(base64 token, rank) lines of tiktoken's file, exact only if ranks are ids, merges follow rank order, the
    pre-tokenizer is Meta's pattern and the special tokens sit where Meta's code puts them; else (None, why not)."""
    import base64

    model, pre = tokenizer_json["model"], json.dumps(tokenizer_json.get("pre_tokenizer"))
    if model.get("type") != "BPE" or json.dumps(LLAMA3_PATTERN)[1:-1] not in pre:
        return None, "this tokenizer is not byte-level BPE split with Llama 3's pattern"
    added = {t["content"]: t["id"] for t in tokenizer_json.get("added_tokens", [])}
    vocab = {token: rank for token, rank in model["vocab"].items() if token not in added}
    if sorted(vocab.values()) != list(range(len(vocab))) or any(i < len(vocab) for i in added.values()):
        return None, "its special tokens are not all after its BPE ranks"
    misplaced = [t for t, offset in LLAMA3_SPECIALS.items() if t in added and added[t] != len(vocab) + offset]
    if misplaced:
        return None, f"{', '.join(misplaced)} are not at Meta's ids"
    merged = [vocab.get("".join(m.split(" ") if isinstance(m, str) else m)) for m in model.get("merges", [])]
    if None in merged or merged != sorted(merged):
        return None, "its merges do not follow the order of its ranks"
    decode = byte_decoder()
    try:
        return [(base64.b64encode(bytes(decode[c] for c in t)).decode(), r) for t, r in vocab.items()], ""
    except KeyError:
        return None, "its vocabulary is not GPT-2's byte-level alphabet"
