"""Meta's original LLaMA checkpoint layout: consolidated.NN.pth (one per model-parallel rank) + params.json.

Meta's reference code (github.com/meta-llama/llama) builds each rank's slice of the model with fairscale's
ColumnParallelLinear (output rows split, dim 0), RowParallelLinear (input columns split, dim 1) and
ParallelEmbedding (embedding columns split, dim 1); norms are copied to every rank.
"""

import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from utils.cli import UserError
from utils.export import base_file, check_llama, head_dim, rope_theta, unpermute_rotary

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
    check_llama(config, "Meta")
    if head_dim(config) != config.hidden_size // config.num_attention_heads:
        raise UserError("Meta's layout derives the head size as dim / n_heads; this model's head_dim differs")
    check_num_shards(config, num_shards)


def meta_params(config) -> dict:
    """params.json, every value read from the HF config."""
    params = {"dim": config.hidden_size, "n_layers": config.num_hidden_layers, "n_heads": config.num_attention_heads}
    if config.num_key_value_heads != config.num_attention_heads:  # grouped-query attention (LLaMA-2 70B style)
        params["n_kv_heads"] = config.num_key_value_heads
    params["vocab_size"] = config.vocab_size
    params |= ffn_params(config.hidden_size, config.intermediate_size)
    params["norm_eps"] = config.rms_norm_eps
    if rope_theta(config) != META_ROPE_THETA:
        params["rope_theta"] = rope_theta(config)
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
    tensors = {}
    for name, tensor in state_dict.items():
        if name in TOP_NAMES:
            meta, dim = TOP_NAMES[name]
        elif name.startswith("model.layers.") and name.split(".", 3)[3] in LAYER_NAMES:
            layer, suffix = name.split(".", 3)[2:]
            meta, dim = LAYER_NAMES[suffix]
            meta = f"layers.{layer}.{meta}"
            if suffix == "self_attn.q_proj.weight":
                tensor = unpermute_rotary(tensor, config.num_attention_heads)
            elif suffix == "self_attn.k_proj.weight":
                tensor = unpermute_rotary(tensor, config.num_key_value_heads)
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


def write_meta(model, out: Path, num_shards: int, base_path: str) -> None:
    """consolidated.00.pth … (one per rank), params.json, and tokenizer.model when the base has one."""
    config = model.config
    tensors = meta_tensors(model.state_dict(), config)
    for rank in range(num_shards):
        torch.save(shard(tensors, rank, num_shards), out / f"consolidated.{rank:02d}.pth")
    (out / "params.json").write_text(json.dumps(meta_params(config), indent=2) + "\n")
    sentencepiece = base_file(base_path, "tokenizer.model")
    if sentencepiece:
        shutil.copyfile(sentencepiece, out / "tokenizer.model")
