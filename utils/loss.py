"""The training loss over the vocabulary without full-size logits: the output head and cross-entropy, a chunk of
tokens at a time, with the gradient to the hidden states computed in the same pass.

The model's own loss keeps a (tokens x vocabulary) fp32 logits tensor, its log-softmax and their gradients: with
SmolLM2's 49,152-token vocabulary, 200 MB each for a row of 1,024 tokens, written and read again in the backward.
Here each chunk's log-softmax becomes its softmax in place, and its gradient to the hidden states (softmax minus the
one-hot label, times the head) is kept instead: tokens x hidden, not tokens x vocabulary. The sums are the same
cross-entropy transformers computes (`ForCausalLMLoss`: labels shifted by one, -100 ignored, logits upcast to fp32,
summed and divided by the Trainer's count of label tokens), in another order.
"""

from typing import Optional

import torch

IGNORE = -100
# A chunk's fp32 logits stay under 32 MiB, the largest block glibc keeps for reuse once freed: a larger one is mapped
# afresh at every allocation, and each of its pages faulted in (zero-filled) again. 128 tokens at a 49K vocabulary.
CHUNK_BYTES = 24 * 2**20
# Config fields of models whose logits are more than head(hidden): those keep the model's own loss.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class HeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of head(hidden) against labels, its gradient to hidden (and to the head's weight, if
    trained) computed chunk by chunk in the forward pass."""

    @staticmethod
    @torch.profiler.record_function("head_cross_entropy")  # named in profiles (benchmarks/bench_train.py)
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, need_grad: bool):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        grad_weight = torch.zeros_like(weight) if need_grad and weight.requires_grad else None
        chunk = max(16, CHUNK_BYTES // (4 * weight.shape[0]))
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start:start + chunk], labels[start:start + chunk]
            log_probs = torch.log_softmax((h @ weight.T).float(), dim=-1)  # one fused pass over the chunk
            valid = (y != IGNORE).unsqueeze(1)
            target = y.clamp(min=0).unsqueeze(1)
            total -= (log_probs.gather(1, target) * valid).sum()
            if need_grad:
                probs = log_probs.exp_()  # softmax, in place
                probs.scatter_add_(1, target, probs.new_full(target.shape, -1.0))
                probs = probs.to(weight.dtype)
                # Ignored tokens have no gradient: zeroing the (tokens x hidden) product costs less than the probs.
                grad_hidden[start:start + chunk] = (probs @ weight).mul_(valid)
                if grad_weight is not None:
                    grad_weight += probs.T @ (h * valid)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_total.to(grad_hidden.dtype)
        return grad_hidden * scale, None if grad_weight is None else grad_weight * scale, None, None


def head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                       num_items_in_batch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """transformers' causal-LM loss of the logits hidden @ weight.T, without materializing them: (batch, tokens,
    hidden) states, (batch, tokens) labels not yet shifted; divided by num_items_in_batch, else the mean."""
    shifted = torch.nn.functional.pad(labels, (0, 1), value=IGNORE)[..., 1:].reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    total = HeadCrossEntropy.apply(flat, weight, shifted, need_grad)
    divisor = num_items_in_batch if num_items_in_batch is not None else (shifted != IGNORE).sum()
    return total / torch.as_tensor(divisor, device=total.device)


def applies(model, sharded: bool) -> bool:
    """Whether the model's logits are its output head applied to its last hidden state, a head this process holds
    whole (not sharded by FSDP/ZeRO-3)."""
    config, head = model.config, model.get_output_embeddings()
    plain = not any(getattr(config, name, None) for name in LOGIT_TRANSFORMS)
    return not sharded and plain and isinstance(head, torch.nn.Linear) and head.bias is None


class HiddenStatesCollator:
    """A data collator whose batches ask the model for its last hidden state instead of any logits (an empty
    `logits_to_keep`), for `TrainerLoss` to apply the head chunk by chunk."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        return {**self.collator(features), "logits_to_keep": torch.zeros(0, dtype=torch.long),
                "output_hidden_states": -1}


class TrainerLoss:
    """The Trainer's compute_loss_func: the chunked head loss over the model's last hidden state."""

    def __init__(self, model):
        self.head = model.get_output_embeddings()

    def __call__(self, outputs, labels: torch.Tensor, num_items_in_batch: Optional[torch.Tensor] = None) -> torch.Tensor:
        return head_cross_entropy(outputs.hidden_states[-1], self.head.weight, labels, num_items_in_batch)
