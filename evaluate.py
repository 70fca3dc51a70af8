"""Compare a base model with base + LoRA adapter: held-out loss/perplexity and answers to a prompt set.

    python evaluate.py --lora_weights ./lora-alpaca                 # the run's own held-out records + data/eval_prompts.json
    python evaluate.py --lora_weights ./lora-alpaca --data_path other.json --answers False
"""

import json
import time
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
        base_model: {BASE_MODEL}
        data_path: .json/.jsonl file or Hub data set id to score; default: the run's data with --val_set_size and --seed reproducing its split.
        val_set_size: Score only the records finetune.py holds out with this --val_set_size (count or fraction); unset with --data_path: every record.
        seed: The split's seed (finetune.py --seed); default: the run's, else 42.
        column_map: Rename data columns, e.g. question=instruction,answer=output; default: the run's.
        cutoff_len: Maximum tokens per record, as in training; default: the run's, else 256.
        add_eos_token: Score the EOS after each response, as in training; default: the run's, else True.
        prompt_template: A template in templates/ or a .json path; default: the run's, else alpaca.
        chat_template: How conversations are rendered, for the loss on conversation records and the answers of a chat adapter: tokenizer, alpaca_chat or another template with user/assistant keys; default: the run's, else the tokenizer's if it has one, else alpaca_chat.
        prompts_path: JSON list of instructions (strings or {instruction, input} objects) to answer; default: data/eval_prompts.json.
        output_dir: Where evaluation.md, evaluation.json and answers.jsonl go; default: <lora_weights>/evaluation, or ./evaluations/owner--name for a Hub adapter owner/name.
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
    from utils.generation import Settings, load_generator
    from utils.models import check_adapter_dir

    if not lora_weights:
        raise UserError("--lora_weights is required: the adapter directory (finetune.py's --output_dir) to compare with its base")
    check_adapter_dir(lora_weights)
    if not (loss or answers):
        raise UserError("--loss False and --answers False leave nothing to do")
    settings = Settings(temperature, top_p, top_k, num_beams, max_new_tokens).checked()
    config = run_config(lora_weights, base_model, data_path, val_set_size, dict(
        seed=seed, column_map=column_map, cutoff_len=cutoff_len, add_eos_token=add_eos_token,
        prompt_template_name=prompt_template, chat_template=chat_template))
    config.update(prompts_path=prompts_path or shown(evaluation.DEFAULT_PROMPTS), generation=settings.__dict__)
    # Every file is read before the model loads, so a typo fails in a second.
    records = scored_records(config, every_record=data_path is not None and val_set_size is None) if loss else None
    prompts = evaluation.load_prompts(prompts_path or evaluation.DEFAULT_PROMPTS) if answers else None
    out = evaluation.output_dir_for(lora_weights, output_dir)
    check_writable(str(out), "output_dir")
    # A chat adapter (its run rendered conversations, or these records are conversations) is scored and asked in
    # its chat template; an instruction adapter in its prompt template.
    conversations = bool(config["chat_template"]) or bool(records and "messages" in records[0])

    generator = load_generator(config["base_model"], lora_weights, quantization, device, config["prompt_template"],
                               chat_template=config["chat_template"] if conversations else None)
    if generator.chat is not None:
        config["chat_template"] = config["chat_template"] or generator.chat.name  # the default, resolved
    losses = compare_losses(generator, records, config, batch_size) if loss else None
    rows = None
    if answers:
        started = time.perf_counter()
        rows = evaluation.compare_answers(generator, prompts, settings, batch_size)
        log(f"Answered {len(rows)} prompts with both models in {time.perf_counter() - started:.0f} s")
    for path in evaluation.write_report(out, losses, rows, config):
        log(f"Wrote {path}")


# The run's setting when a flag is left unset, and the default for runs that did not record it.
RUN_DEFAULTS = dict(seed=42, column_map=None, cutoff_len=256, add_eos_token=True, prompt_template_name="alpaca",
                    chat_template="")


def run_config(lora_weights: str, base_model: Optional[str], data_path: Optional[str],
               val_set_size: Optional[float], flags: dict) -> dict:
    """What to score and how: each unset flag as the adapter's run had it (its training_args.json)."""
    from utils.data import DEFAULT_DATA_NAME
    from utils.models import choose_base_model
    from utils.run_record import RunRecord

    trained = RunRecord.read(lora_weights).arguments
    if data_path is None:  # the run's own held-out records
        if val_set_size is None and not trained:
            raise UserError(f"{lora_weights} has no training_args.json to find its held-out data: pass --data_path")
        data_path = trained.get("data_path") or DEFAULT_DATA_NAME
        if val_set_size is None:  # unset in runs recorded before it was: the default
            val_set_size = trained.get("val_set_size")
    config = dict(lora_weights=lora_weights, base_model=choose_base_model(base_model, lora_weights),
                  data_path=data_path, val_set_size=val_set_size)
    for key, value in flags.items():  # finetune.py records --prompt_template_name
        config[key.removesuffix("_name")] = value if value is not None else trained.get(key, RUN_DEFAULTS[key])
    return config


def scored_records(config: dict, every_record: bool) -> list[dict]:
    """Every record of --data_path, or the ones the run held out (the same split, seed and column names)."""
    from utils import evaluation
    from utils.data import load_records, recorded_data_file

    data_file = recorded_data_file(config["data_path"])
    if every_record:
        return load_records(data_file, config["column_map"])
    return evaluation.held_out_records(data_file, config["val_set_size"], config["seed"], config["column_map"])


def compare_losses(generator, records: list[dict], config: dict, batch_size: int) -> dict:
    from utils import evaluation

    started = time.perf_counter()
    losses = evaluation.compare_losses(generator, records, config["cutoff_len"], config["add_eos_token"], batch_size)
    base, adapter = losses["base"], losses["adapter"]
    log(f"Held-out loss on {base['records']} records ({base['tokens']} response tokens, "
        f"{time.perf_counter() - started:.0f} s): base {base['loss']:.4f} (perplexity {base['perplexity']:.2f}) -> "
        f"adapter {adapter['loss']:.4f} (perplexity {adapter['perplexity']:.2f})")
    return losses


if __name__ == "__main__":
    run(main)
