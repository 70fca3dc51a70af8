"""Tiny random models of today's base families, built offline from their transformers config classes, each with a
byte-level BPE tokenizer trained on the shipped Alpaca sample that carries the family's special tokens and the
layout of its chat template (as the family's instruct models format a conversation).

The real tokenizers (128K-256K vocabularies) cannot be fetched here; what matters for these tests is the family's
architecture, its special tokens (EOS, pad = EOS where the family does that) and its chat layout.
"""

import json
from pathlib import Path

import torch

from tiny import ALPACA

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512)

CHATML = ("{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
          "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}")
QWEN25 = ("{%- if messages[0].role != 'system' %}{{ '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. "
          "You are a helpful assistant.<|im_end|>\\n' }}{%- endif %}" + CHATML)
LLAMA3 = ("{{ bos_token }}{%- for m in messages %}{{ '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + "
          "m.content | trim + '<|eot_id|>' }}{%- endfor %}"
          "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
MISTRAL = ("{{ bos_token }}{%- for m in messages %}{%- if m.role == 'user' %}{{ '[INST] ' + m.content + ' [/INST]' }}"
           "{%- elif m.role == 'assistant' %}{{ ' ' + m.content + eos_token }}{%- endif %}{%- endfor %}")
GEMMA = ("{{ bos_token }}{%- for m in messages %}{%- set role = 'model' if m.role == 'assistant' else 'user' %}"
         "{{ '<start_of_turn>' + role + '\\n' + m.content | trim + '<end_of_turn>\\n' }}{%- endfor %}"
         "{%- if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{%- endif %}")

# Sliding windows shorter than any test prompt, so that the windowing is exercised (real ones: 4096, 512).
WINDOW = 8

# family -> (config class and its extra settings, special tokens, chat template)
FAMILIES = {
    "llama3": ("LlamaConfig", dict(tie_word_embeddings=True, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=128)),
        dict(bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|eot_id|>", extra=["<|start_header_id|>", "<|end_header_id|>"]), LLAMA3),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True),
              dict(eos="<|im_end|>", pad="<|endoftext|>", extra=["<|im_start|>"]), QWEN25),
    "qwen3": ("Qwen3Config", dict(head_dim=16, tie_word_embeddings=True),
              dict(eos="<|im_end|>", pad="<|endoftext|>", extra=["<|im_start|>"]), CHATML),
    "mistral": ("MistralConfig", dict(sliding_window=None), dict(bos="<s>", eos="</s>", pad=None, extra=["[INST]", "[/INST]"]), MISTRAL),
    # Mistral 7B v0.1's layout: every layer a sliding window
    "mistral_window": ("MistralConfig", dict(sliding_window=WINDOW), dict(bos="<s>", eos="</s>", pad=None, extra=["[INST]", "[/INST]"]), MISTRAL),
    # Gemma 2 alternates sliding-window and full layers by default
    "gemma2": ("Gemma2Config", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW),
               dict(bos="<bos>", eos="<end_of_turn>", pad="<pad>", extra=["<start_of_turn>"]), GEMMA),
    # Gemma 3's default pattern (5 sliding to 1 full) would make both of 2 layers sliding: one of each, as in 6
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=WINDOW,
                                        layer_types=["sliding_attention", "full_attention"]),
               dict(bos="<bos>", eos="<end_of_turn>", pad="<pad>", extra=["<start_of_turn>"]), GEMMA),
}


def train_tokenizer(folder: Path, tokens: dict, chat_template: str, vocab_size: int = 600):
    """A byte-level BPE (GPT-2 style, as Llama 3, Qwen and SmolLM use) with the family's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [t for t in dict.fromkeys([tokens.get("bos"), tokens["eos"], tokens.get("pad"), *tokens["extra"]]) if t]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    records = json.loads(ALPACA.read_text())[:300]
    texts = [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in records]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    if tokens.get("bos"):  # the families with a BOS add it to every text, as their real tokenizers do
        bos = tokens["bos"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=tokens.get("bos"), eos_token=tokens["eos"],
                                   pad_token=tokens.get("pad"), additional_special_tokens=tokens["extra"])
    fast.chat_template = chat_template
    fast.save_pretrained(folder)
    return fast


def make_family_model(folder: Path, family: str, seed: int = 0, **settings) -> Path:
    """Save a tiny random model of `family` (config `settings` on top) and its tokenizer into folder."""
    import transformers
    from transformers import AutoModelForCausalLM

    config_class, extra, tokens, template = FAMILIES[family]
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(folder, tokens, template)
    config = getattr(transformers, config_class)(
        **(COMMON | extra | settings), vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        # As in the real configs of the families that pad with EOS: no pad id, whose embedding row would start at zero.
        pad_token_id=None if tokenizer.pad_token_id in (None, tokenizer.eos_token_id) else tokenizer.pad_token_id)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder
