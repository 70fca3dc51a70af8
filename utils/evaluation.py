"""What an adapter changed: held-out loss/perplexity and answers of the base model vs base + adapter.

evaluate.py is the command line; everything here works on one loaded Generator whose model is a PeftModel,
so the base model's figures come from the same weights with the adapter switched off (no second load).
"""

import html
import json
import math
import re
from pathlib import Path
from typing import Optional

import torch

from utils.cli import UserError, log
from utils.data import IGNORE_INDEX, load_records, resolve_val_set_size, split_records, tokenize_records
from utils.generation import Generator, Settings

DEFAULT_PROMPTS = str(Path(__file__).resolve().parent.parent / "data" / "eval_prompts.json")


def held_out_records(data_path: str, val_set_size: Optional[float], seed: int, column_map=None) -> list[dict]:
    """The records finetune.py holds out of data_path with this --val_set_size (None: finetune.py's default size)
    and seed: the same split, so none of them was trained on."""
    records = load_records(data_path, column_map)
    size = resolve_val_set_size(val_set_size, len(records))
    if size == 0:
        raise UserError(f"--val_set_size {val_set_size} holds out none of the {len(records)} records of {data_path} "
                        "(a run trained with it trained on them all): score other records with --data_path")
    return split_records(records, size, seed)[1].to_list()


@torch.no_grad()
def response_loss(model, dataset, pad_token_id: int, batch_size: int = 8) -> dict:
    """Token-weighted mean cross-entropy over the label tokens (the responses) and its perplexity.

    A mean of per-batch means (what the Trainer's eval_loss is) weights short answers more; this is the
    loss of the whole set as one batch, whatever the batch size."""
    rows = sorted(dataset, key=lambda r: len(r["input_ids"]))  # similar lengths together: little padding
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = pad_right(rows[start:start + batch_size], pad_token_id)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        labels = batch.pop("labels")
        logits = model(**batch, use_cache=False).logits.float()
        # Token t predicts token t+1, as in the model's own loss.
        shifted = labels[:, 1:]
        total += torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        ).item()
        count += int((shifted != IGNORE_INDEX).sum())
    if count == 0:
        raise UserError("no response tokens to score: every record was cut off by cutoff_len")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count, "records": len(rows)}


def pad_right(rows: list[dict], pad_token_id: int) -> dict:
    """Tensors for a batch; right padding keeps each record's positions as in training."""
    width = max(len(r["input_ids"]) for r in rows)

    def padded(key, value):
        return torch.tensor([r[key] + [value] * (width - len(r[key])) for r in rows])

    return {"input_ids": padded("input_ids", pad_token_id), "attention_mask": padded("attention_mask", 0),
            "labels": padded("labels", IGNORE_INDEX)}


def compare_losses(generator: Generator, records: list[dict], cutoff_len: int, add_eos_token: bool, batch_size: int) -> dict:
    """Held-out loss of the base model and of base + adapter, tokenized and masked as in training (conversations
    in the generator's chat template).

    Only response tokens count (train_on_inputs=False): the prompt template is the same text every time and
    would flatter the adapter."""
    dataset = tokenize_records(records, generator.tokenizer, generator.prompter, cutoff_len=cutoff_len,
                               train_on_inputs=False, add_eos_token=add_eos_token, chat=generator.chat)
    pad = generator.tokenizer.pad_token_id
    with generator.model.disable_adapter():
        base = response_loss(generator.model, dataset, pad, batch_size)
    return {"base": base, "adapter": response_loss(generator.model, dataset, pad, batch_size)}


def load_prompts(path: str) -> list[dict]:
    """A JSON list of instructions: strings, or objects with "instruction" and an optional "input"."""
    from utils.data import read_instructions

    return [{"instruction": r["instruction"], "input": r.get("input", "")} for r in read_instructions(path, "prompts file")]


def render_prompt(generator: Generator, prompt: dict) -> str:
    """A prompt as the adapter was trained: in its prompt template, or for a chat adapter as a one-turn conversation."""
    if generator.chat is None:
        return generator.render(prompt["instruction"], prompt["input"])
    message = "\n\n".join(part for part in (prompt["instruction"], prompt["input"]) if part)
    return generator.chat.render([{"role": "user", "content": message}], add_generation_prompt=True)


def compare_answers(generator: Generator, prompts: list[dict], settings: Settings, batch_size: int) -> list[dict]:
    """Each prompt with the base model's and the adapter's answer (batched, left-padded generation)."""
    rendered = [render_prompt(generator, p) for p in prompts]
    chunks = [rendered[start:start + batch_size] for start in range(0, len(rendered), batch_size)]
    with generator.model.disable_adapter():
        base = [answer for chunk in chunks for answer in generator.complete(chunk, settings)]
    adapter = [answer for chunk in chunks for answer in generator.complete(chunk, settings)]
    return [
        dict(p, base=b.text, adapter=a.text, base_finish=b.finish_reason, adapter_finish=a.finish_reason)
        for p, b, a in zip(prompts, base, adapter)
    ]


def markdown_cell(text: str) -> str:
    """Text that stays inside one Markdown table cell: '|' escaped, line breaks as <br>, indentation kept."""
    text = html.escape(text.strip(), quote=False)  # so "<b>" or "a < b" in an answer shows as written
    lines = [re.sub(r"^ +", lambda m: "&nbsp;" * len(m.group()), line) for line in text.splitlines()]
    return "<br>".join(lines).replace("|", "\\|")


def answers_table(rows: list[dict]) -> str:
    lines = ["| # | Instruction | Base model | Base + adapter |", "|---|---|---|---|"]
    for i, row in enumerate(rows, 1):
        instruction = row["instruction"] + (f"\n\nInput: {row['input']}" if row["input"] else "")
        lines.append(f"| {i} | {markdown_cell(instruction)} | {markdown_cell(row['base'])} | {markdown_cell(row['adapter'])} |")
    return "\n".join(lines) + "\n"


def losses_table(losses: dict) -> str:
    base, tuned = losses["base"], losses["adapter"]
    change = lambda a, b: f"{(b - a) / a:+.1%}"
    return "\n".join([
        "| | Base model | Base + adapter | Change |",
        "|---|---|---|---|",
        f"| Held-out loss (nats/token) | {base['loss']:.4f} | {tuned['loss']:.4f} | {change(base['loss'], tuned['loss'])} |",
        f"| Perplexity | {base['perplexity']:.2f} | {tuned['perplexity']:.2f} | {change(base['perplexity'], tuned['perplexity'])} |",
        "",
        f"{base['records']} records, {base['tokens']} response tokens.",
        "",
    ])


def output_dir_for(lora_weights: str, output_dir: str) -> Path:
    """Where the results go: --output_dir, else <adapter>/evaluation, and for a Hub adapter ./evaluations/owner--name
    (said in a line): a folder at ./owner/name would shadow the id for every later run (Hub ids hold no "--")."""
    from utils.models import hub_id

    hub = hub_id(lora_weights) and not Path(lora_weights).exists()
    out = Path(output_dir or (Path("evaluations") / lora_weights.replace("/", "--") if hub else Path(lora_weights) / "evaluation"))
    if hub and out.absolute().is_relative_to(Path(lora_weights).absolute()):
        raise UserError(f"--output_dir {output_dir} would create a folder named like the Hub adapter {lora_weights}, "
                        "which would then shadow it: choose another --output_dir")
    if hub and not output_dir:
        log(f"Results of the Hub adapter {lora_weights} go to {out}")
    return out


def write_report(out: Path, losses: Optional[dict], answers: Optional[list[dict]], settings: dict) -> list[Path]:
    """evaluation.json (figures and settings), answers.jsonl, evaluation.md (both tables), each written durably;
    returns the paths."""
    from utils import durable

    out.mkdir(parents=True, exist_ok=True)
    durable.sweep(out)  # what an evaluation killed while writing left
    written = {out / "evaluation.json": json.dumps({"settings": settings, "held_out": losses}, indent=2) + "\n"}
    markdown = ["# Base model vs base + adapter", ""]
    if losses:
        markdown += ["## Held-out loss", "", losses_table(losses)]
    if answers is not None:
        written[out / "answers.jsonl"] = "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in answers)
        markdown += ["## Answers", "", answers_table(answers)]
    written[out / "evaluation.md"] = "\n".join(markdown)
    for path, text in written.items():
        durable.write_text(path, text)
    return list(written)
