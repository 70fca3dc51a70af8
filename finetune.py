"""Instruction-tune a LLaMA-style model with LoRA: `python finetune.py --base_model ... --data_path ...`.

With no flags it trains the embedded SmolLM2-135M-Instruct on the shipped 999-record Alpaca sample.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from utils.chat import load_chat_template
from utils.cli import UserError, log, run
from utils.data import DEFAULT_DATA, load_records, recorded_data_path, resolve_val_set_size, split_records, tokenize_records
from utils.prompts import Prompter
from utils.training import TrainSettings


def train(
    # model/data params
    base_model: str = "",
    data_path: str = DEFAULT_DATA,
    output_dir: str = "./lora-alpaca",
    # training hyperparams
    batch_size: int = 128,
    micro_batch_size: int = 4,
    num_epochs: float = 3,
    learning_rate: float = 3e-4,
    cutoff_len: int = 256,
    val_set_size: Optional[float] = None,
    # lora hyperparams
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    lora_target_modules: Union[str, list[str]] = ("q_proj", "v_proj"),
    # llm hyperparams
    train_on_inputs: Optional[bool] = None,
    add_eos_token: bool = True,
    group_by_length: bool = False,
    packing: bool = True,
    # wandb params
    wandb_project: str = "",
    wandb_run_name: str = "",
    wandb_watch: str = "",
    wandb_log_model: str = "",
    resume_from_checkpoint: Union[None, bool, str] = None,
    prompt_template_name: str = "alpaca",
    chat_template: str = "",
    # beyond the original
    quantization: str = "auto",
    column_map: Union[None, str, dict] = None,
    max_steps: int = -1,
    warmup_steps: int = 100,
    save_steps: int = 0,
    eval_steps: int = 0,
    save_minutes: float = 10,
    logging_steps: int = 10,
    gradient_checkpointing: bool = False,
    torch_compile: bool = False,
    bf16: Optional[bool] = None,
    device_map: str = "",
    tensorboard: bool = False,
    overwrite_output_dir: bool = False,
    seed: int = 42,
    # adapter methods beyond plain LoRA (utils/methods.py)
    use_dora: bool = False,
    use_rslora: bool = False,
    init_lora_weights: str = "default",
    loraplus_lr_ratio: Optional[float] = None,
):
    """Fine-tune a causal LM with LoRA on instruction data and save the adapter to output_dir.

    Args:
        base_model: {BASE_MODEL}
        data_path: .json/.jsonl file or Hub data set id (e.g. yahma/alpaca-cleaned); default: the shipped 999-record Alpaca sample.
        output_dir: Where checkpoints, the final adapter, the tokenizer and metrics.json are written.
        batch_size: Records per optimizer step (global, over all processes).
        micro_batch_size: Records per forward pass on each device; batch_size must be a multiple of it.
        num_epochs: Passes over the training data.
        learning_rate: Peak AdamW learning rate.
        cutoff_len: Maximum tokens per record; longer records are truncated.
        val_set_size: Held-out records (a count, or a fraction < 1); default 2000 as in the original, or 5% of sets under 40,000 records.
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator (scale = alpha / r).
        lora_dropout: Dropout on the LoRA input.
        lora_target_modules: Linear layers to adapt, e.g. [q_proj,v_proj] or all-linear.
        train_on_inputs: Loss on the prompt too (instruction and input; in conversations the system and user turns); default: on for instruction records as in the original, off for conversations (assistant turns only).
        add_eos_token: Append EOS so the model learns to stop (the original left it off; on by default here).
        group_by_length: Batch records of similar length together: less padding, faster, a noisier loss curve.
        packing: Concatenate each micro-batch into one padding-free row (positions restart per record, no attention across records); same loss, no compute spent on padding. False gives the original's padded batches.
        wandb_project: Weights & Biases project; logging to wandb is on only when this (or WANDB_PROJECT) is set.
        wandb_run_name: Weights & Biases run name.
        wandb_watch: false | gradients | all.
        wandb_log_model: false | true (upload checkpoints to wandb).
        resume_from_checkpoint: A checkpoint-N dir (full resume), True (the latest in output_dir), or an adapter dir (new run from its weights).
        prompt_template_name: A template in templates/ (alpaca, alpaca_legacy, alpaca_short, vigogne) or a .json path.
        chat_template: How conversation data (ShareGPT/OpenAI records) is rendered: tokenizer (its own chat template), alpaca_chat or another template with user/assistant keys; default: the tokenizer's if it has one, else alpaca_chat.
        quantization: auto (8bit on CUDA, none elsewhere and under FSDP/ZeRO-3) | 8bit | 4bit (QLoRA NF4; sharded under FSDP/ZeRO-3) | none.
        column_map: Rename data columns, e.g. question=instruction,answer=output.
        max_steps: Stop after this many optimizer steps (overrides num_epochs when > 0).
        warmup_steps: Linear warm-up steps (at most a tenth of the run, so short runs reach the learning rate).
        save_steps: Optimizer steps between checkpoints; 0 (default): a tenth of the run's steps. A checkpoint is also saved at the end.
        eval_steps: Optimizer steps between validation passes; 0 (default): only at the start and at the end (a pass costs as much as a few steps). A value that divides --save_steps (e.g. equal to it, as in the original) also reloads the best checkpoint's adapter at the end.
        save_minutes: Also save a checkpoint when this many minutes have passed since the last one (0: off), so an interrupted run loses minutes; continue it with --resume_from_checkpoint True.
        logging_steps: Optimizer steps between loss reports.
        gradient_checkpointing: Recompute activations in the backward pass: less memory, about 30% slower.
        torch_compile: Compile the model with torch.compile (pays off on GPUs for long runs; slow to start on CPU).
        bf16: The frozen base computes in bf16 (LoRA weights, optimizer state and loss stay fp32); default: on for GPUs and CPUs that compute bf16 natively (AVX512-BF16, AMX), off elsewhere. False: fp32 on a CPU, fp16 with loss scaling on a GPU.
        device_map: "auto" spreads a model too large for one GPU over all visible GPUs in one process (model parallel); empty: one device per process.
        tensorboard: Also log to TensorBoard (in output_dir/runs).
        overwrite_output_dir: Allow writing into an output_dir that holds an earlier run; its checkpoint-N folders are deleted when training starts, so --resume_from_checkpoint True finds only this run's.
        seed: Seed for the data split, shuffling and LoRA initialisation.
        use_dora: DoRA: each adapted weight learns its column norms (a magnitude vector) apart from its direction; closer to full fine-tuning at low rank, slower steps. Exports merge it; llama.cpp cannot apply it unmerged.
        use_rslora: rsLoRA: scale by lora_alpha/sqrt(r) instead of lora_alpha/r, so that a high rank (64 and up) still learns.
        init_lora_weights: default (the original's: random A, zero B) | gaussian | pissa (A and B from the weights' top singular vectors) | olora (from a QR decomposition). pissa/olora move that part out of the base while training; the saved adapter is converted (rank 2r) to apply to the unchanged base.
        loraplus_lr_ratio: LoRA+: lora_B learns at this many times --learning_rate (the paper suggests 16); unset: plain LoRA's one rate.
    """
    arguments = dict(locals())
    # Every input is checked before the model loads (and the cheap checks before the slow ones): a mistake costs
    # seconds, not a training run. The inputs come before the output directory, so a missing data file is what a
    # rerun into an earlier run's directory reports.
    from utils.checks import check_values

    check_values(arguments)
    plan = check_run(arguments)
    from utils import training
    from utils.checkpoints import CheckpointKeeper

    prepare_data(plan, arguments)
    # Before the model loads: the arguments start the process group and, for ZeRO-3, DeepSpeed's config, which
    # from_pretrained reads to load the weights partitioned (zero.Init) instead of whole on every process.
    args = training_arguments(plan.out, plan.device, plan.val_data is not None, plan.settings)
    model = load_lora_model(plan, arguments)
    trainer = build_trainer(model, plan.tokenizer, plan.train_data, plan.val_data, plan.out, plan.device, plan.settings,
                            args=args, keeper=CheckpointKeeper(arguments, arguments["save_minutes"]))
    plan.out.mkdir(parents=True, exist_ok=True)
    if arguments["overwrite_output_dir"] and not plan.checkpoint:
        training.clear_earlier_checkpoints(plan.out)
    with training.disk_errors(plan.out):
        result = trainer.train(resume_from_checkpoint=plan.checkpoint)
        finish_run(trainer, result.metrics, plan, arguments)


@dataclass
class Plan:
    """What train() resolved from the flags before any model loads."""

    out: Path
    device: str
    dtype: "torch.dtype"  # noqa: F821 - torch is imported after the flags are checked
    quantization: str
    shard: str  # "fsdp" or "zero3" when the launcher shards the base over the processes, else ""
    world_size: int
    grad_accum: int
    target_modules: list[str]
    records: list[dict]
    val_size: int
    checkpoint: Optional[str]  # a Trainer checkpoint to resume
    warm_start: Optional[str]  # an adapter to start a new run from
    base_model: str
    base_path: str
    prompter: Prompter
    report_to: list[str]
    tokenizer: object = None
    train_data: object = None
    val_data: object = None
    settings: Optional[TrainSettings] = None
    initial_adapter: Optional[str] = None  # a PiSSA/OLoRA adapter as initialised, for the conversion at save time


def check_run(a: dict) -> Plan:
    """Every check of the flags, the data file, the output directory and the base's config, in that order."""
    from utils import distributed, durable, methods, models, training

    world_size = int(os.environ.get("WORLD_SIZE", 1))
    distributed.check_launcher()
    target_modules = parse_target_modules(a["lora_target_modules"])
    grad_accum = training.check_batch_sizes(a["batch_size"], a["micro_batch_size"], world_size)
    if a["device_map"] == "auto" and world_size > 1:
        raise UserError("--device_map auto (one process over all GPUs) cannot be combined with torchrun/accelerate ranks")
    prompter = Prompter(a["prompt_template_name"])
    report_to = reporting(a["wandb_project"], a["wandb_watch"], a["wandb_log_model"], a["tensorboard"])
    device = models.pick_device("auto")
    shard = distributed.sharding(device)
    quantization = models.pick_quantization(a["quantization"], device, sharded=bool(shard))
    dtype = models.pick_dtype(device, a["bf16"], training=True)
    records = load_records(a["data_path"], a["column_map"])
    val_size = resolve_val_set_size(a["val_set_size"], len(records))

    out = training.check_output_dir(a["output_dir"], bool(a["resume_from_checkpoint"]), a["overwrite_output_dir"])
    durable.sweep(out)  # what a run killed mid-save left: garbage, whatever the checks below find
    checkpoint, warm_start = training.resolve_resume(a["resume_from_checkpoint"], out)
    if warm_start:
        models.check_adapter_dir(warm_start)  # a save cut short is refused here, before its base is looked up
    a["init_lora_weights"] = str(a["init_lora_weights"]).lower()
    methods.check_methods(a, quantization, bool(shard), warm_start)
    if checkpoint or warm_start:
        lora = {flag: a[flag] for flag in ("lora_r", "lora_alpha", "lora_dropout")}
        method = methods.lora_fields(a["use_dora"], a["use_rslora"], a["init_lora_weights"]) if checkpoint else None
        training.check_lora_matches(checkpoint or warm_start, lora, target_modules, method)
    base_model = models.choose_base_model(a["base_model"], checkpoint or warm_start)
    base_path = models.resolve_base_model(base_model)
    models.check_cutoff_len(base_path, a["cutoff_len"])
    models.check_target_modules(base_path, target_modules)
    distributed.check_sharded_quantization(shard, quantization, models.read_config(base_path), dtype)
    if warm_start:
        models.check_adapter_fits(base_path, warm_start)
    return Plan(out, device, dtype, quantization, shard, world_size, grad_accum, target_modules, records, val_size,
                checkpoint, warm_start, base_model, base_path, prompter, report_to)


def prepare_data(plan: Plan, a: dict) -> None:
    """Split and tokenize the records, count the run's steps; record in `a` the values the run resolved."""
    import torch

    from utils import models, training

    plan.tokenizer = models.load_tokenizer(plan.base_path)
    train_records, val_records = split_records(plan.records, plan.val_size, a["seed"])
    chat = load_chat_template(a["chat_template"], plan.tokenizer) if "messages" in plan.records[0] else None
    if chat is not None:
        log(f"Conversations rendered with chat template {chat.name}")
    else:
        log(f"Using prompt template {plan.prompter.name}: {plan.prompter.template.get('description', '')}")
    # Unset: the original trains on Alpaca prompts too; a chat model learns only its own turns.
    train_on_inputs = chat is None if a["train_on_inputs"] is None else a["train_on_inputs"]
    prepare = dict(tokenizer=plan.tokenizer, prompter=plan.prompter, cutoff_len=a["cutoff_len"],
                   train_on_inputs=train_on_inputs, add_eos_token=a["add_eos_token"], chat=chat)
    plan.train_data = tokenize_records(train_records, **prepare)
    plan.val_data = tokenize_records(val_records, **prepare) if val_records is not None else None
    if len(plan.train_data) == 0 or (plan.val_data is not None and len(plan.val_data) == 0):
        raise UserError(f"no {'training' if len(plan.train_data) == 0 else 'validation'} record keeps any response "
                        f"token within --cutoff_len {a['cutoff_len']}: raise --cutoff_len")
    total_steps = training.optimizer_steps(len(plan.train_data), a["micro_batch_size"], plan.grad_accum,
                                           plan.world_size, a["num_epochs"], a["max_steps"])
    if plan.checkpoint and training.steps_done(plan.checkpoint) >= total_steps:
        raise UserError(f"{plan.checkpoint} is already at step {training.steps_done(plan.checkpoint)} of this run's "
                        f"{total_steps}: nothing left to train; raise --max_steps or --num_epochs to continue it")
    warmup_steps = min(a["warmup_steps"], total_steps // 10)  # at most a tenth of the run: a short run reaches the rate
    save_steps = a["save_steps"] or training.default_save_steps(total_steps)
    plan.settings = TrainSettings(
        micro_batch_size=a["micro_batch_size"], grad_accum=plan.grad_accum,
        num_epochs=a["num_epochs"], max_steps=a["max_steps"], learning_rate=a["learning_rate"],
        warmup_steps=warmup_steps, save_steps=save_steps, eval_steps=a["eval_steps"], logging_steps=a["logging_steps"],
        group_by_length=a["group_by_length"], packing=a["packing"], gradient_checkpointing=a["gradient_checkpointing"],
        torch_compile=a["torch_compile"], bf16=a["bf16"], report_to=tuple(plan.report_to),
        run_name=a["wandb_run_name"] or None, seed=a["seed"], world_size=plan.world_size,
        loraplus_lr_ratio=a["loraplus_lr_ratio"])
    # What later scripts read back (evaluate.py's held-out records, the export's chat template): the values this run
    # used, not the unset flags they were resolved from, and the names the user gave rather than this machine's paths.
    a.update(
        base_model=plan.base_model, data_path=recorded_data_path(a["data_path"]), val_set_size=plan.val_size,
        train_on_inputs=train_on_inputs, chat_template=a["chat_template"] or (chat.name if chat else ""),
        conversations=chat is not None,
        lora_target_modules=plan.target_modules, quantization=plan.quantization,
        bf16=plan.dtype == torch.bfloat16, warmup_steps=warmup_steps, save_steps=save_steps,
        run_id=training.run_id(plan.checkpoint),
    )


def load_lora_model(plan: Plan, a: dict):
    """The frozen base (as the launcher needs it) with trainable LoRA layers, seeded alike on every rank."""
    from transformers import set_seed

    from utils import distributed, methods, models

    log(f"Loading {plan.base_model or 'the embedded SmolLM2-135M-Instruct'} on {plan.device} "
        f"({'not quantized' if plan.quantization == 'none' else plan.quantization}, "
        f"{str(plan.dtype).removeprefix('torch.')})")
    if plan.device == "cpu":
        log(models.cpu_precision_note(plan.dtype))
    distributed.record_memory("start")
    model = load_base(plan, a["device_map"], a["packing"])
    distributed.record_memory("loaded")
    set_seed(a["seed"])  # the LoRA init draws from torch's RNG: seeded, every rank and every rerun start alike
    model = wrap_lora(model, plan.quantization, plan.warm_start, a["gradient_checkpointing"], sharded=bool(plan.shard),
                      r=a["lora_r"], lora_alpha=a["lora_alpha"], lora_dropout=a["lora_dropout"],
                      target_modules=plan.target_modules,
                      **methods.lora_fields(a["use_dora"], a["use_rslora"], a["init_lora_weights"]))
    if not plan.warm_start:
        plan.initial_adapter = methods.save_initial(model)
    if distributed.loads_empty(plan.shard):
        distributed.materialize_trainable(model)
    return model


def finish_run(trainer, metrics: dict, plan: Plan, arguments: dict) -> None:
    """Save the final adapter, its arguments and the reports (rank 0), once every rank has its gathered weights."""
    from utils import distributed, models

    metrics = dict(metrics)
    if plan.val_data is not None:
        # The adapter saved is the best one reloaded at the end (--eval_steps dividing --save_steps), else the last;
        # the Trainer has validated the last step either way: no second pass at the end.
        last = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h][-1]
        metrics["final_eval_loss"] = trainer.state.best_metric if trainer.args.load_best_model_at_end else last
    state_dict = distributed.gather_adapter(trainer)  # on every rank: FSDP and ZeRO-3 hold the weights in shards
    if trainer.is_world_process_zero():
        from utils.methods import describe
        from utils.metrics import write_reports

        base_name = models.base_model_name(plan.base_model)
        save_run(trainer, plan.tokenizer, plan.out, arguments, state_dict, base_name, plan.initial_adapter)
        method = describe(arguments["use_dora"], arguments["use_rslora"], arguments["init_lora_weights"],
                          arguments["loraplus_lr_ratio"])
        write_reports(trainer.state.log_history, metrics, plan.out,
                      f"{method} r={arguments['lora_r']} on {Path(base_name).name}")
    trainer.accelerator.wait_for_everyone()  # no rank leaves (and tears the process group down) mid-save
    distributed.record_memory("end")
    log(f"Saved the LoRA adapter to {plan.out}")


def parse_target_modules(value) -> list[str]:
    """Accept [q_proj,v_proj], "q_proj,v_proj" or all-linear from the command line."""
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [str(n).strip() for n in names if str(n).strip()]
    if not names:
        raise UserError("--lora_target_modules is empty; e.g. --lora_target_modules='[q_proj,v_proj]'")
    return names


def reporting(wandb_project: str, wandb_watch: str, wandb_log_model: str, tensorboard: bool) -> list[str]:
    """The Trainer's report_to: wandb only when a project is named (flag or WANDB_PROJECT), as the original."""
    import importlib.util

    report_to = []
    if wandb_project or os.environ.get("WANDB_PROJECT"):
        if importlib.util.find_spec("wandb") is None:
            raise UserError("--wandb_project needs the wandb package: pip install wandb")
        for key, value in (("WANDB_PROJECT", wandb_project), ("WANDB_WATCH", wandb_watch), ("WANDB_LOG_MODEL", wandb_log_model)):
            if value:
                os.environ[key] = value
        report_to.append("wandb")
    if tensorboard:
        if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
            raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard")
        report_to.append("tensorboard")
    return report_to or ["none"]


def load_base(plan: Plan, device_map: str, packing: bool):
    """The frozen base: whole on this process's device (one process, DDP), spread over the GPUs (--device_map auto),
    or as the sharded launchers need it: on rank 0 only under FSDP (the others start empty and receive their
    shards), partitioned as it loads under ZeRO-3 (zero.Init)."""
    from utils import distributed, models
    from utils import packing as packed_attention

    if not device_map and not plan.shard and plan.world_size > 1 and plan.device == "cuda":
        device_map = {"": int(os.environ.get("LOCAL_RANK", 0))}  # DDP: a whole copy on each process's own GPU
    per_record = packing and packed_attention.supports(models.read_config(plan.base_path))
    attention = packed_attention.NAME if per_record else None
    if distributed.loads_empty(plan.shard) and plan.quantization == "none":
        return models.load_empty_model(plan.base_path, plan.dtype, attention)
    return models.load_model(plan.base_path, plan.quantization, plan.device, device_map=device_map or None,
                             dtype=plan.dtype, attn_implementation=attention, sharded=bool(plan.shard))


def wrap_lora(model, quantization: str, warm_start: Optional[str], gradient_checkpointing: bool, sharded: bool = False,
              **lora):
    """Add trainable LoRA layers (or load an adapter's weights to continue from) on top of the frozen base."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from utils.models import load_adapter

    if quantization != "none" and not sharded:
        # Casts norms to fp32 and enables input gradients: what 8-bit/4-bit LoRA needs to train stably.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif quantization != "none" and gradient_checkpointing:
        # Sharded 4-bit: every frozen weight keeps the storage dtype the launcher shards and casts (fp32 norms
        # would break that rule); only the input gradients that checkpointing needs are switched on.
        model.enable_input_require_grads()
    model.config.use_cache = False  # the KV cache is useless in training and breaks gradient checkpointing
    if warm_start:
        model = load_adapter(model, warm_start, trainable=True)
    else:
        if lora["target_modules"] == ["all-linear"]:
            lora["target_modules"] = "all-linear"  # PEFT's shorthand for every linear layer but the output head
        model = get_peft_model(model, LoraConfig(bias="none", task_type="CAUSAL_LM", **lora))
    if os.environ.get("LOCAL_RANK", "0") == "0":
        model.print_trainable_parameters()
    return model


def build_trainer(model, tokenizer, train_data, val_data, out: Path, device: str, settings: TrainSettings, args=None,
                  keeper=None):
    """The Hugging Face Trainer with the original's recipe, modern precision and the loss guard; `args`: the
    arguments already built from `settings` (finetune.py builds them before the model loads); `keeper`: the
    utils.checkpoints.CheckpointKeeper of a run."""
    from transformers import Trainer

    from utils import loss
    from utils.distributed import memory_callback, sharding
    from utils.metrics import LossGuard, ProgressReport
    from utils.methods import loraplus_optimizer
    from utils.training import data_collator

    args = args or training_arguments(out, device, val_data is not None, settings)
    ratio = settings.loraplus_lr_ratio
    collator, loss_func = data_collator(tokenizer, settings.packing, model.config), None
    if loss.applies(model, sharded=bool(sharding(device))):  # the head and loss chunk by chunk: no full-size logits
        collator, loss_func = loss.HiddenStatesCollator(collator), loss.TrainerLoss(model)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_data,
        eval_dataset=val_data,
        data_collator=collator,
        compute_loss_func=loss_func,
        callbacks=[LossGuard(), *filter(None, [memory_callback(), keeper])],  # memory: each rank's, when asked for (tests)
        optimizers=(loraplus_optimizer(model, args, ratio) if ratio else None, None),  # the Trainer's scheduler
    )
    # First in line, so the tokens/s it adds to a log line is printed with it.
    trainer.callback_handler.callbacks.insert(0, ProgressReport(out))
    return trainer


def training_arguments(out: Path, device: str, validate: bool, s: TrainSettings):
    """The Trainer's arguments: the original's recipe (validating when `validate`) with modern precision."""
    import torch
    from transformers import TrainingArguments

    from utils import models

    # Autocast on GPUs (the weights' dtype, models.pick_dtype); a CPU computes in the dtype the base was loaded in,
    # with no autocast re-casting weights every step (PEFT keeps the LoRA layers in fp32 and casts their input).
    bf16 = device != "cpu" and models.pick_dtype(device, s.bf16, training=True) == torch.bfloat16
    return TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=s.micro_batch_size,
        per_device_eval_batch_size=s.micro_batch_size,
        gradient_accumulation_steps=s.grad_accum,
        warmup_steps=s.warmup_steps,
        num_train_epochs=s.num_epochs,
        max_steps=s.max_steps,
        learning_rate=s.learning_rate,
        bf16=bf16,
        fp16=device.startswith("cuda") and not bf16,  # with the Trainer's loss scaling
        logging_steps=s.logging_steps,
        logging_nan_inf_filter=False,  # the filter turns NaN losses into 0.0, hiding the very failure to report
        optim="adamw_torch",
        eval_strategy="steps" if validate else "no",
        save_strategy="steps",
        # The Trainer validates a run's last step itself when it falls between passes: with no --eval_steps, a pass
        # interval beyond any run leaves the start and the end.
        eval_steps=(s.eval_steps or 2**31 - 1) if validate else None,
        eval_on_start=validate,  # the base model's held-out loss: the baseline the curve starts from
        save_steps=s.save_steps,
        save_total_limit=3,
        load_best_model_at_end=keeps_best(validate, s),
        ddp_find_unused_parameters=False if s.world_size > 1 else None,
        train_sampling_strategy="group_by_length" if s.group_by_length else "random",
        activation_checkpointing=s.gradient_checkpointing,
        torch_compile=s.torch_compile,
        # Packed rows hold no padding (and no attention mask to count it from): count every token.
        include_num_input_tokens_seen="all" if s.packing else "non_padding",
        report_to=list(s.report_to),
        run_name=s.run_name,
        seed=s.seed,
        data_seed=s.seed,
        use_cpu=device == "cpu",
    )


def keeps_best(validate: bool, s: TrainSettings) -> bool:
    """Whether the best checkpoint by held-out loss is reloaded at the end: only when every checkpoint is validated."""
    return validate and s.eval_steps > 0 and s.save_steps % s.eval_steps == 0


def save_run(trainer, tokenizer, out: Path, arguments: dict, state_dict: Optional[dict], base_name: str,
             initial_adapter: Optional[str] = None) -> None:
    """The final adapter (PEFT's own save_pretrained, safetensors), the tokenizer and the arguments used.
    state_dict: the adapter's weights gathered from sharded ranks (utils.distributed.gather_adapter); base_name: the
    base model as the adapter's config names it (models.base_model_name); initial_adapter: a PiSSA/OLoRA adapter
    as initialised, to convert the trained one against (methods.save_initial)."""
    from utils.methods import save_pretrained
    from utils.training import save_adapter

    # PEFT names the base by the folder it loaded from (for the embedded model, this machine's cache), in the
    # adapter's config and its model card; they name it as the user did, which models.resolve_base_model loads on
    # any machine.
    for config in trainer.model.peft_config.values():
        config.base_model_name_or_path = base_name
        # PEFT keeps the targets as a set, whose order changes from process to process: sorted, a resumed run's
        # config is byte-identical to the earlier one's, so publishing it never leaves a moment without an adapter.
        if isinstance(config.target_modules, set):
            config.target_modules = sorted(config.target_modules)
    base = trainer.model.get_base_model()
    base.name_or_path = base.config._name_or_path = base_name

    def save(tmp: Path):
        # No embedding layer is ever adapted; "auto" would look the base up by that name, on the Hub.
        save_pretrained(trainer.model, tmp, initial_adapter, state_dict=state_dict, save_embedding_layers=False)
        tokenizer.save_pretrained(tmp)
        (tmp / "training_args.json").write_text(json.dumps(arguments, indent=2, default=str))

    save_adapter(save, out)


if __name__ == "__main__":
    run(train)
