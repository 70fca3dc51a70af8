"""Tiny randomly initialised LLaMA models with a real SentencePiece tokenizer, built in about a second."""

import json
import shutil
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
ALPACA = REPO / "data" / "alpaca_en_demo.json"


def train_sentencepiece(folder: Path, vocab_size: int = 512) -> None:
    """A BPE SentencePiece model trained on the shipped Alpaca sample, saved as folder/tokenizer.model."""
    import sentencepiece as spm

    records = json.loads(ALPACA.read_text())[:400]
    texts = [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in records]
    texts.append("### Instruction:\n### Input:\n### Response:\nBelow is an instruction that describes a task.")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(folder / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2, num_threads=1,
    )
    (folder / "tokenizer.vocab").unlink()


def make_tiny_llama(folder: Path, num_key_value_heads: int = 4, seed: int = 0, tokenizer_from: Path = None,
                    **shape) -> Path:
    """Save a 2-layer LLaMA (hidden 64) and its tokenizer into folder; `shape` overrides the config (e.g.
    hidden_size, num_hidden_layers) for a bigger one.

    The tokenizer is a fresh SentencePiece model (LLaMA-1/2 style, with tokenizer.model), or a copy of the
    tokenizer in `tokenizer_from` so that several tiny models can share one."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is None:
        train_sentencepiece(folder)
    else:
        shutil.copy(Path(tokenizer_from) / "tokenizer.model", folder / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(folder, add_bos_token=True)
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(**{
        **dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=num_key_value_heads, max_position_embeddings=512,
               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False),
        **shape,
    })
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder
