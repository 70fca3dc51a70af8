"""Padding-free packing learns exactly what padded batches learn: same loss, same gradients."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tiny import ALPACA
from utils import loss
from utils.data import tokenize_records
from utils.models import load_tokenizer
from utils.packing import NAME
from utils.prompts import Prompter
from utils.training import data_collator


def loss_and_grad(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()


@pytest.mark.parametrize("attention", ["sdpa", NAME])
@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_gqa_model"])
@pytest.mark.parametrize("train_on_inputs", [True, False])
def test_packed_loss_equals_padded_loss(fixture, train_on_inputs, attention, request):
    path = str(request.getfixturevalue(fixture))
    tokenizer = load_tokenizer(path)
    records = json.loads(ALPACA.read_text())[:6]
    rows = tokenize_records(records, tokenizer, Prompter("alpaca"), 200, train_on_inputs, True).to_list()
    assert len({len(r["input_ids"]) for r in rows}) > 1  # records of different lengths, so padding happens
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention)
    model.config.use_cache = False  # as in training: with a KV cache, packed records would see each other

    padded = data_collator(tokenizer, packing=False, model_config=model.config)(rows)
    packed = data_collator(tokenizer, packing=True, model_config=model.config)(rows)
    assert packed["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows))
    assert ("cu_seq_lens_q" in packed) == (attention == NAME)  # per-record attention is told where records start
    assert padded["input_ids"].numel() > packed["input_ids"].numel()

    loss_padded, grad_padded = loss_and_grad(model, padded)
    loss_packed, grad_packed = loss_and_grad(model, packed)
    assert loss_packed == pytest.approx(loss_padded, abs=1e-5)
    torch.testing.assert_close(grad_packed, grad_padded, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_gqa_model"])
def test_default_loss_equals_the_originals_in_fp32(fixture, request, monkeypatch):
    """The default's loss (packed rows, the head and cross-entropy a chunk of tokens at a time: utils.loss) equals
    the original's (padded batches, full logits, the model's own loss) in fp32: value and gradients."""
    path = str(request.getfixturevalue(fixture))
    tokenizer = load_tokenizer(path)
    rows = tokenize_records(json.loads(ALPACA.read_text())[:6], tokenizer, Prompter("alpaca"), 200, True, True).to_list()
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=NAME, dtype=torch.float32)
    model.config.use_cache = False
    assert loss.applies(model, sharded=False)
    packed = loss.HiddenStatesCollator(data_collator(tokenizer, packing=True, model_config=model.config))(rows)
    monkeypatch.setattr(loss, "CHUNK_BYTES", 64 * 4 * model.config.vocab_size)  # 64 tokens a chunk, as a big vocabulary gets
    assert packed["input_ids"].shape[1] > 3 * 64  # several chunks, the last one partial
    labels = packed.pop("labels")
    items = (labels[:, 1:] != -100).sum()  # the Trainer's count of label tokens over the accumulated batch

    model.zero_grad()
    outputs = model(**packed)
    assert outputs.logits.numel() == 0  # no logits computed, let alone kept
    chunked = loss.TrainerLoss(model)(outputs, labels, num_items_in_batch=items)
    chunked.backward()
    grad_chunked = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    padded = data_collator(tokenizer, packing=False, model_config=model.config)(rows)
    loss_padded, grad_padded = loss_and_grad(model, {**padded, "num_items_in_batch": items})
    assert chunked.item() == pytest.approx(loss_padded, abs=1e-5)
    torch.testing.assert_close(grad_chunked, grad_padded, atol=1e-6, rtol=1e-4)


def test_packed_rows_need_no_kv_cache(tiny_model):
    """The trap measured on transformers 5.24: with a KV cache, packed records attend across boundaries."""
    tokenizer = load_tokenizer(str(tiny_model))
    rows = tokenize_records(json.loads(ALPACA.read_text())[:3], tokenizer, Prompter("alpaca"), 200, True, True).to_list()
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    packed = data_collator(tokenizer, packing=True, model_config=model.config)(rows)
    second = len(rows[0]["input_ids"])
    alone = model(torch.tensor([rows[1]["input_ids"]]), use_cache=False).logits[0]
    isolated = model(**packed, use_cache=False).logits[0, second : second + len(rows[1]["input_ids"])]
    torch.testing.assert_close(isolated, alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_record_attention_never_builds_a_row_wide_mask(tiny_gqa_model, monkeypatch, dtype):
    """Each record of a packed row goes through causal SDPA on its own, with no mask: the cost of the records alone
    (in fp32 on CPU, where the kernel is faster than in bf16)."""
    tokenizer = load_tokenizer(str(tiny_gqa_model))
    rows = tokenize_records(json.loads(ALPACA.read_text())[:3], tokenizer, Prompter("alpaca"), 200, True, True).to_list()
    model = AutoModelForCausalLM.from_pretrained(tiny_gqa_model, attn_implementation=NAME, dtype=dtype)
    packed = data_collator(tokenizer, packing=True, model_config=model.config)(rows)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((q.shape[2], q.dtype, attn_mask, kw["is_causal"]))
        return sdpa(q, k, v, attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    logits = model(**packed, use_cache=False).logits
    lengths = [len(r["input_ids"]) for r in rows]
    assert calls == [(n, torch.float32, None, True) for n in lengths] * model.config.num_hidden_layers
    assert logits.dtype == dtype


def test_soft_capped_attention_never_gets_per_record_sdpa():
    """SDPA cannot apply Gemma 2's attention logit soft-capping: such models keep their own attention."""
    from transformers import AutoConfig

    from utils.packing import supports

    assert supports(AutoConfig.for_model("llama").to_dict())
    assert not supports(AutoConfig.for_model("gemma2").to_dict())
