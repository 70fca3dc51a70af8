"""A compact, single-process re-implementation of Meta's reference LLaMA (github.com/meta-llama/llama, model.py),
written from the published architecture to check the Meta-layout export independently of transformers.

Same maths as Meta's code: RMSNorm computed in float32, rotary embeddings as complex rotations of interleaved
(even, odd) pairs, grouped-query attention by repeating KV heads, SwiGLU with Meta's hidden-size formula.
Model-parallel shards are re-joined the way fairscale split them.
"""

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

# fairscale's layer kinds in Meta's model: ColumnParallelLinear splits output rows (dim 0), RowParallelLinear
# input columns (dim 1), ParallelEmbedding the embedding columns (dim 1); RMSNorm weights are replicated.
SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def load_consolidated(folder: Path) -> tuple[dict, dict]:
    """(params.json, full state dict) with consolidated.00.pth … re-joined into one model."""
    folder = Path(folder)
    params = json.loads((folder / "params.json").read_text())
    shards = [torch.load(p, map_location="cpu", weights_only=True) for p in sorted(folder.glob("consolidated.*.pth"))]
    state = {}
    for name in shards[0]:
        kind = name.split(".")[-2]
        parts = [s[name] for s in shards]
        state[name] = torch.cat(parts, dim=SPLIT_DIM[kind]) if kind in SPLIT_DIM else parts[0]
    return params, state


def ffn_hidden_dim(params: dict) -> int:
    hidden = int(2 * (4 * params["dim"]) / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    multiple_of = params.get("multiple_of", 256)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def apply_scaling(freqs: torch.Tensor) -> torch.Tensor:
    """Llama 3.1's RoPE scaling as Meta's llama-models code has it (use_scaled_rope), constants included."""
    scale_factor, low_freq_factor, high_freq_factor, old_context_len = 8, 1, 4, 8192
    low_freq_wavelen, high_freq_wavelen = old_context_len / low_freq_factor, old_context_len / high_freq_factor
    new_freqs = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            new_freqs.append(freq)
        elif wavelen > low_freq_wavelen:
            new_freqs.append(freq / scale_factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            new_freqs.append((1 - smooth) * freq / scale_factor + smooth * freq)
    return torch.tensor(new_freqs, dtype=freqs.dtype)


def rotary(x: torch.Tensor, theta: float, scaled: bool = False) -> torch.Tensor:
    """x: (batch, seq, heads, head_dim); each (even, odd) pair rotated by position × frequency."""
    head_dim, seq = x.shape[-1], x.shape[1]
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    freqs = apply_scaling(freqs) if scaled else freqs
    angles = torch.polar(torch.ones(seq, head_dim // 2), torch.outer(torch.arange(seq).float(), freqs))
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * angles[None, :, None, :]).flatten(3).type_as(x)


def attention(x: torch.Tensor, w: dict, params: dict) -> torch.Tensor:
    batch, seq, _ = x.shape
    n_heads = params["n_heads"]
    n_kv_heads = params.get("n_kv_heads") or n_heads
    head_dim = params["dim"] // n_heads
    theta = params.get("rope_theta", 10000.0)
    scaled = params.get("use_scaled_rope", False)
    q = rotary((x @ w["attention.wq.weight"].T).view(batch, seq, n_heads, head_dim), theta, scaled)
    k = rotary((x @ w["attention.wk.weight"].T).view(batch, seq, n_kv_heads, head_dim), theta, scaled)
    v = (x @ w["attention.wv.weight"].T).view(batch, seq, n_kv_heads, head_dim)
    k, v = (t.repeat_interleave(n_heads // n_kv_heads, dim=2) for t in (k, v))  # Meta's repeat_kv
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(2, 3) / math.sqrt(head_dim)
    scores = scores + torch.full((seq, seq), float("-inf")).triu(1)
    out = F.softmax(scores.float(), dim=-1).type_as(q) @ v
    return out.transpose(1, 2).reshape(batch, seq, -1) @ w["attention.wo.weight"].T


def feed_forward(x: torch.Tensor, w: dict) -> torch.Tensor:
    gate, up = x @ w["feed_forward.w1.weight"].T, x @ w["feed_forward.w3.weight"].T
    return (F.silu(gate) * up) @ w["feed_forward.w2.weight"].T


@torch.no_grad()
def forward(params: dict, state: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Logits (batch, seq, vocab) in float32 for a batch of token ids, as Meta's Transformer.forward(tokens, 0)."""
    eps = params.get("norm_eps", 1e-5)
    h = F.embedding(tokens, state["tok_embeddings.weight"])
    for layer in range(params["n_layers"]):
        w = {k.split(".", 2)[2]: v for k, v in state.items() if k.startswith(f"layers.{layer}.")}
        h = h + attention(rms_norm(h, w["attention_norm.weight"], eps), w, params)
        h = h + feed_forward(rms_norm(h, w["ffn_norm.weight"], eps), w)
    return (rms_norm(h, state["norm.weight"], eps) @ state["output.weight"].T).float()


def check_shapes(params: dict, state: dict) -> None:
    """The shapes Meta's Transformer(ModelArgs(**params)) would build: load_state_dict fails on any other."""
    dim, n_heads = params["dim"], params["n_heads"]
    head_dim, kv_dim = dim // n_heads, (params.get("n_kv_heads") or n_heads) * (dim // n_heads)
    hidden, vocab = ffn_hidden_dim(params), params["vocab_size"]
    expected = {"tok_embeddings.weight": (vocab, dim), "norm.weight": (dim,), "output.weight": (vocab, dim)}
    for i in range(params["n_layers"]):
        expected |= {
            f"layers.{i}.attention.wq.weight": (n_heads * head_dim, dim), f"layers.{i}.attention.wk.weight": (kv_dim, dim),
            f"layers.{i}.attention.wv.weight": (kv_dim, dim), f"layers.{i}.attention.wo.weight": (dim, n_heads * head_dim),
            f"layers.{i}.feed_forward.w1.weight": (hidden, dim), f"layers.{i}.feed_forward.w3.weight": (hidden, dim),
            f"layers.{i}.feed_forward.w2.weight": (dim, hidden),
            f"layers.{i}.attention_norm.weight": (dim,), f"layers.{i}.ffn_norm.weight": (dim,),
        }
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
