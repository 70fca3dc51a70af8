"""Compare a base model with base + LoRA adapter: held-out loss/perplexity and answers to a prompt set.

    python evaluate.py --lora_weights ./lora-alpaca                 # the run's own held-out records + data/eval_prompts.json
    python evaluate.py --lora_weights ./lora-alpaca --data_path other.json --answers False
"""

import json
import time
from pathlib import Path
from typing import Optional, Union

from utils.cli import UserError, check_writable, log, run, shown


def main(
    lora_weights: str = "",
    base_model: Optional[str] = None,
    data_path: Optional[str] = None,
    val_set_size: Optional[float] = None,
    seed: Optional[int] = None,
    column_map: Union[None, str, dict] = None,
    cutoff_len: Optional[int] = None,
    add_eos_token: Optional[bool] = None,
    prompt_template: Optional[str] = None,
    chat_template: Optional[str] = None,
    prompts_path: str = "",
    output_dir: str = "",
    loss: bool = True,
    answers: bool = True,
    batch_size: int = 8,
    temperature: float = 0.0,
    top_p: float = 0.75,
    top_k: int = 40,
    num_beams: int = 1,
    max_new_tokens: int = 128,
    quantization: str = "none",
    device: str = "auto",
):
    """Score base model and base + adapter on held-out records and answer a prompt set with both.

    Flags left unset are read from the adapter's training_args.json (written by finetune.py), so by default
    the loss is measured on exactly the records that run held out, tokenized as it tokenized them.

    Args:
        lora_weights: LoRA adapter directory (finetune.py's output_dir, or a checkpoint-N in it) or Hub id. Required.
        base_model: Hub id, local HF directory or .gguf file; default: $BASE_MODEL, else the run's base model (else the embedded SmolLM2-135M-Instruct).
        data_path: .json/.jsonl file or Hub data set id to score; default: the run's data with --val_set_size and --seed reproducing its split.
        val_set_size: Score only the records finetune.py holds out with this --val_set_size (count or fraction); unset with --data_path: every record.
        seed: The split's seed (finetune.py --seed); default: the run's, else 42.
        column_map: Rename data columns, e.g. question=instruction,answer=output; default: the run's.
        cutoff_len: Maximum tokens per record, as in training; default: the run's, else 256.
        add_eos_token: Score the EOS after each response, as in training; default: the run's, else True.
        prompt_template: A template in templates/ or a .json path; default: the run's, else alpaca.
        chat_template: How conversations are rendered, for the loss on conversation records and the answers of a chat adapter: tokenizer, alpaca_chat or another template with user/assistant keys; default: the run's, else the tokenizer's if it has one, else alpaca_chat.
        prompts_path: JSON list of instructions (strings or {instruction, input} objects) to answer; default: data/eval_prompts.json.
        output_dir: Where evaluation.md, evaluation.json and answers.jsonl go; default: <lora_weights>/evaluation.
        loss: Measure the held-out loss and perplexity.
        answers: Answer the prompt set with both models.
        batch_size: Records per forward pass and prompts per generate() call.
        temperature: Sampling temperature; 0 (default) is greedy decoding, so reruns give the same answers.
        top_p: Nucleus sampling threshold (only when temperature > 0).
        top_k: Sample among the k most likely tokens (only when temperature > 0).
        num_beams: Beam search width (1: greedy or plain sampling).
        max_new_tokens: Longest answer, in tokens.
        quantization: none | 8bit | 4bit | auto (8bit on CUDA) for loading the base model.
        device: auto (CUDA, then Apple MPS, then CPU) | cuda | cuda:N | mps | cpu.
    """
    from utils.checks import check_values

    check_values(locals())
    from utils import evaluation
    from utils.data import DEFAULT_DATA_NAME, load_records, recorded_data_file
    from utils.generation import Settings, load_generator
    from utils.models import check_adapter_dir, choose_base_model, run_arguments

    if not lora_weights:
        raise UserError("--lora_weights is required: the adapter directory (finetune.py's --output_dir) to compare with its base")
    check_adapter_dir(lora_weights)
    if not (loss or answers):
        raise UserError("--loss False and --answers False leave nothing to do")
    trained = run_arguments(lora_weights)
    pick = lambda value, key, default: value if value is not None else trained.get(key, default)
    every_record = data_path is not None and val_set_size is None
    if data_path is None:  # the run's own held-out records
        if val_set_size is None and not trained:
            raise UserError(f"{lora_weights} has no training_args.json to find its held-out data: pass --data_path")
        data_path = trained.get("data_path") or DEFAULT_DATA_NAME
        val_set_size = pick(val_set_size, "val_set_size", None)  # unset in runs recorded before it was: the default
    settings = Settings(temperature, top_p, top_k, num_beams, max_new_tokens).checked()
    config = dict(
        lora_weights=lora_weights, base_model=choose_base_model(base_model, lora_weights), data_path=data_path,
        val_set_size=val_set_size, seed=pick(seed, "seed", 42), column_map=pick(column_map, "column_map", None),
        cutoff_len=pick(cutoff_len, "cutoff_len", 256), add_eos_token=pick(add_eos_token, "add_eos_token", True),
        prompt_template=pick(prompt_template, "prompt_template_name", "alpaca"),
        chat_template=pick(chat_template, "chat_template", ""),
        prompts_path=prompts_path or shown(evaluation.DEFAULT_PROMPTS), generation=settings.__dict__,
    )
    # Every file is read before the model loads, so a typo fails in a second.
    records = None
    if loss:
        data_file = recorded_data_file(data_path)
        records = (load_records(data_file, config["column_map"]) if every_record else
                   evaluation.held_out_records(data_file, val_set_size, config["seed"], config["column_map"]))
    prompts = evaluation.load_prompts(prompts_path or evaluation.DEFAULT_PROMPTS) if answers else None
    out = Path(output_dir or Path(lora_weights) / "evaluation")
    check_writable(str(out), "output_dir")
    # A chat adapter (its run rendered conversations, or these records are conversations) is scored and asked in
    # its chat template; an instruction adapter in its prompt template.
    conversations = bool(config["chat_template"]) or bool(records and "messages" in records[0])

    generator = load_generator(config["base_model"], lora_weights, quantization, device, config["prompt_template"],
                               chat_template=config["chat_template"] if conversations else None)
    if generator.chat is not None:
        config["chat_template"] = config["chat_template"] or generator.chat.name  # the default, resolved
    losses = rows = None
    if loss:
        started = time.perf_counter()
        losses = evaluation.compare_losses(generator, records, config["cutoff_len"], config["add_eos_token"], batch_size)
        log(f"Held-out loss on {losses['base']['records']} records ({losses['base']['tokens']} response tokens, "
            f"{time.perf_counter() - started:.0f} s): base {losses['base']['loss']:.4f} (perplexity "
            f"{losses['base']['perplexity']:.2f}) -> adapter {losses['adapter']['loss']:.4f} "
            f"(perplexity {losses['adapter']['perplexity']:.2f})")
    if answers:
        started = time.perf_counter()
        rows = evaluation.compare_answers(generator, prompts, settings, batch_size)
        log(f"Answered {len(rows)} prompts with both models in {time.perf_counter() - started:.0f} s")
    for path in evaluation.write_report(out, losses, rows, config):
        log(f"Wrote {path}")


if __name__ == "__main__":
    run(main)
