"""Per-record attention for packed rows: each record of a padding-free row attends only to itself, through
PyTorch's fused causal SDPA kernel, so a packed micro-batch costs what its records cost alone.

Plain SDPA keeps packed records apart with a dense block-diagonal mask over the whole row: quadratic in the row's
length (2.4x the attention work of the same records padded) and without the causal kernel's skipped blocks.
Registered with transformers' AttentionInterface as "sdpa_packed"; rows without record boundaries (padded batches,
generation) fall through to transformers' own SDPA with its usual mask.
"""

from typing import Optional

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "sdpa_packed"


def packed_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                        dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """Causal SDPA over each record of a packed row (record starts in `cu_seq_lens_q`, which
    DataCollatorWithFlattening(return_flash_attn_kwargs=True) adds to the batch); SDPA with the mask otherwise."""
    starts = kwargs.get("cu_seq_lens_q")
    lengths = record_lengths(starts) if starts is not None and query.shape[0] == 1 else []
    window = kwargs.get("sliding_window")  # a sliding-window layer narrower than a record needs the model's own mask
    if not lengths or (window and window < max(lengths)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    gqa = query.shape[1] != key.shape[1]  # grouped-query attention: fewer key/value heads, shared by SDPA itself
    # On a CPU the fused kernel runs faster in fp32 than in bf16 at record lengths, and is no less precise: bf16
    # models attend in fp32.
    upcast = query.device.type == "cpu" and query.dtype == torch.bfloat16
    q, k, v = (x.float() for x in (query, key, value)) if upcast else (query, key, value)
    # split, not one slice per record: its backward is one cat, where each slice's backward would fill a zero
    # tensor of the whole row.
    outputs = [
        torch.nn.functional.scaled_dot_product_attention(
            q_, k_, v_, is_causal=True, scale=scaling, dropout_p=dropout, enable_gqa=gqa)
        for q_, k_, v_ in zip(*(x.split(lengths, dim=2) for x in (q, k, v)))
    ]
    out = torch.cat(outputs, dim=2).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None  # (batch, tokens, heads, head_dim)


_last_starts: list = [None, []]  # (record starts, their lengths): every layer of a forward pass gets the same tensor


def record_lengths(starts: torch.Tensor) -> list[int]:
    """The records' lengths from their starts, read from the tensor once per forward pass rather than once a layer."""
    if _last_starts[0] is not starts:
        _last_starts[:] = [starts, torch.diff(starts).tolist()]
    return _last_starts[1]


def supports(config: dict) -> bool:
    """Whether per-record SDPA computes what the model's own attention does: not with attention logit soft-capping
    (Gemma 2), which SDPA cannot apply."""
    return not config.get("attn_logit_softcapping")


AttentionInterface.register(NAME, packed_sdpa_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)  # padded batches still get their padding mask
