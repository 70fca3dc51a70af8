"""Training speed: the original alpaca-lora recipe against this project's, same data, model and hyperparameters.

    python benchmarks/bench_train.py                    # CPU: the embedded SmolLM2-135M (about 15 minutes on 2 cores)
    python benchmarks/bench_train.py --gpu --size 7b    # one GPU: random LLaMA-7B shapes, bf16 / 8-bit / 4-bit, MFU
    python benchmarks/bench_train.py --smoke            # seconds: the --gpu code path on a tiny model, on any machine
    python benchmarks/bench_train.py --scaling          # CPU: 1 process x 2 threads vs 2 DDP processes x 1 thread

Every recipe trains through finetune.py's own wrap_lora + build_trainer (the Hugging Face Trainer), each in a
fresh subprocess so that peak memory and thread settings do not leak from one recipe to the next. All recipes see
the same records in the same order (same seed) with the same global batch, so their losses should agree step by
step (group_by_length excepted, it reorders). Two speeds per run: end to end (the Trainer's train_runtime over every
step, warm-up and any compiling included: what a user waits for) and steady (the steps after the warm-up). The
recipes take turns over --rounds; the JSON keeps every round and each recipe's ratio to the reference of the same
round. Writes benchmarks/results/<machine>.json.
"""

import importlib.util
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, WORK, isa_limits, machine, median, with_load, write
from utils.cli import UserError, run

# name -> how it differs from the reference; every recipe keeps the global batch (--batch_size records/step).
CPU_RECIPES = {
    # The original, as it runs on today's libraries on a CPU: random micro-batches padded per batch to a multiple
    # of 8, no length grouping, fp32, transformers' default attention (SDPA), and its `torch.compile(model)` after
    # the Trainer is built (which, as in the original, compiles a wrapper the Trainer never calls).
    "reference": dict(packing=False, bf16=False, original_compile=True),
    "packed": dict(packing=True),  # this project's default: padding-free rows, per-record attention, bf16 where native
    "packed-fp32": dict(packing=True, bf16=False),  # the default on a CPU without native bf16
    "packed-mask": dict(packing=True, bf16=False, attention="sdpa"),  # packed rows under one block-diagonal mask
    "packed-mb16": dict(packing=True, micro_batch_size=16),  # one long row per optimizer step
    "grouped": dict(packing=False, group_by_length=True),  # padded, but with records of similar length together
    "packed-ckpt": dict(packing=True, gradient_checkpointing=True),
    "packed-compile": dict(packing=True, torch_compile=True),
}
CPU_DEFAULT = ["reference", "packed", "packed-fp32"]
GPU_RECIPES = {
    # The original on a GPU: 8-bit base, fp16 autocast with loss scaling, padded random micro-batches.
    "reference": dict(packing=False, quantization="8bit", fp16=True),
    "packed-8bit": dict(packing=True, quantization="8bit"),  # this project's default on CUDA (bf16 compute)
    "packed-bf16": dict(packing=True, quantization="none"),
    "packed-4bit": dict(packing=True, quantization="4bit"),  # QLoRA NF4
    "packed-bf16-mb16": dict(packing=True, quantization="none", micro_batch_size=16),
}
# LLaMA-1 shapes; the vocabulary is the tokenizer's (SmolLM2's 49,152 by default: real-length token sequences).
LLAMA_SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
}
H100_BF16_FLOPS = 790e12  # the bf16 8192^3 matmul ceiling documented for the H100/H200 machines (not measured here)


def original_tokenize(record, tokenizer, prompter, cutoff_len):
    """tloen/alpaca-lora's generate_and_tokenize_prompt with its defaults (train on inputs, add EOS), verbatim in
    substance: one record per call."""
    prompt = prompter.generate_prompt(record["instruction"], record["input"], record["output"])
    result = tokenizer(prompt, truncation=True, max_length=cutoff_len, padding=False, return_tensors=None)
    if result["input_ids"][-1] != tokenizer.eos_token_id and len(result["input_ids"]) < cutoff_len:
        result["input_ids"].append(tokenizer.eos_token_id)
        result["attention_mask"].append(1)
    result["labels"] = result["input_ids"].copy()
    return result


def time_data_prep(tokenizer, n_records: int, cutoff_len: int) -> dict:
    """Seconds to tokenize n_records (the shipped sample repeated), the original's way and this project's way."""
    from datasets import Dataset

    from utils.data import load_records, tokenize_records
    from utils.prompts import Prompter

    base = load_records(str(REPO / "data" / "alpaca_en_demo.json"))
    records = (base * (n_records // len(base) + 1))[:n_records]
    prompter = Prompter("alpaca")
    t0 = time.perf_counter()
    ref = Dataset.from_list(records).map(
        original_tokenize, fn_kwargs=dict(tokenizer=tokenizer, prompter=prompter, cutoff_len=cutoff_len))
    t1 = time.perf_counter()
    ours = tokenize_records(Dataset.from_list(records), tokenizer, prompter, cutoff_len, True, True)
    t2 = time.perf_counter()
    same = ref[:200]["input_ids"] == ours[:200]["input_ids"]  # both must produce the same training tokens
    return dict(records=n_records, reference_s=round(t1 - t0, 2), project_s=round(t2 - t1, 2),
                speedup=round((t1 - t0) / (t2 - t1), 2), same_tokens=same)


def step_matmuls(config: dict) -> dict:
    """The frozen weights a LoRA step multiplies by, as {name: (in, out, times per token)}: each once forward and
    once backward to its input (frozen weights need no weight gradient)."""
    d, ff, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = d * config.get("num_key_value_heads", config["num_attention_heads"]) // config["num_attention_heads"]
    return {"q_proj, o_proj": (d, d, 2 * layers), "k_proj, v_proj": (d, kv, 2 * layers),
            "gate_proj, up_proj": (d, ff, 2 * layers), "down_proj": (ff, d, layers), "lm_head": (d, config["vocab_size"], 1)}


def matmul_rate(run, flops: float, seconds: float, bursts: int = 6) -> float:
    """GFLOP/s of run() (one matmul of `flops`) after a first call (kernel selection): the best of `bursts` bursts
    lasting `seconds` in all, since on a shared machine another job slows some of them, never speeds one up."""
    run()
    best = 0.0
    for _ in range(bursts):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / bursts:
            run()
            n += 1
        best = max(best, flops * n / (time.perf_counter() - t0))
    return round(best / 1e9, 1)


def matmul_roofline(config: dict, rows: int, seconds: float = 0.6) -> dict:
    """This CPU's matmul GFLOP/s at a training step's shapes, forward (rows x in -> out, as nn.Linear computes it)
    and backward to the input (rows x out -> in), in fp32 and bf16; and the fp32 ceiling they set: the real tokens/s
    of a step that did nothing but its matmuls at these rates."""
    import torch

    from utils.models import cpu_has_bf16

    rates = {}
    # Without native bf16 (or with it hidden by ISA caps) a bf16 matmul is emulated at 1-4 GFLOP/s: the head's shape
    # alone would take minutes to time, for a rate no recipe uses there.
    dtypes = (torch.float32, torch.bfloat16) if cpu_has_bf16() else (torch.float32,)
    for dtype in dtypes:
        for name, (d_in, d_out, times) in step_matmuls(config).items():
            x, grad = torch.randn(rows, d_in, dtype=dtype), torch.randn(rows, d_out, dtype=dtype)
            w = torch.randn(d_out, d_in, dtype=dtype)
            flops = 2 * rows * d_in * d_out
            rates[f"{str(dtype).removeprefix('torch.')} {name}"] = dict(
                shape=f"{rows}x{d_in}x{d_out}", per_token=times, forward=matmul_rate(lambda: torch.nn.functional.linear(x, w), flops, seconds),
                backward=matmul_rate(lambda: grad @ w, flops, seconds))
    result = dict(rows=rows, gflops=rates, ceiling=ceiling(config, rates, "float32"))
    return dict(result, ceiling_bf16=ceiling(config, rates, "bfloat16")) if cpu_has_bf16() else result


def ceiling(config: dict, rates: dict, dtype: str) -> dict:
    """Seconds per token of the matmuls alone, each at its measured rate, and the tokens/s that allows."""
    seconds = sum(times * 2 * d_in * d_out / (rates[f"{dtype} {name}"][way] * 1e9)
                  for name, (d_in, d_out, times) in step_matmuls(config).items() for way in ("forward", "backward"))
    flops = sum(times * 4 * d_in * d_out for d_in, d_out, times in step_matmuls(config).values())
    return dict(matmul_flops_per_token=flops, matmul_ms_per_token=round(seconds * 1e3, 3), tokens_per_s=round(1 / seconds, 1))


def llama_checkpoint(size: str, vocab_size: int, work_dir: Path, dtype) -> Path:
    """A randomly initialised LLaMA of the given shape, saved once so that load_model (and its 8/4-bit paths)
    loads it exactly as it would load real weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = work_dir / f"llama-{size}-random"
    if (path / "config.json").is_file():
        return path
    config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=4096, rms_norm_eps=1e-6,
                         tie_word_embeddings=False, **LLAMA_SHAPES[size])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):  # initialising 7B parameters on the CPU would take minutes
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(path)
    return path


def flops_per_token(config, context: float) -> float:
    """LoRA training FLOPs per real token: 2N forward + 2N backward for the activation gradients (frozen
    weights need no weight gradients; the adapters are negligible), N = parameters outside the embedding;
    plus causal attention, 2*L*d*context forward, three times that with its backward."""
    d, layers = config.hidden_size, config.num_hidden_layers
    kv = d * config.num_key_value_heads // config.num_attention_heads
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * config.intermediate_size
    n = layers * per_layer + d * config.vocab_size  # + lm_head
    return 4 * n + 6 * layers * d * context


def bench_records(spec: dict, tokenizer):
    """The records every recipe trains on: the shuffled sample's first batch_size x (warmup + steps), tokenized."""
    from utils.data import load_records, tokenize_records
    from utils.prompts import Prompter

    records = load_records(str(REPO / "data" / "alpaca_en_demo.json"))
    random.Random(spec["seed"]).shuffle(records)
    n_records = spec["batch_size"] * (spec["steps"] + spec["warmup"])
    return tokenize_records(records[:n_records], tokenizer, Prompter("alpaca"), spec["cutoff_len"], True, True)


def build_trainer(spec: dict, world: int) -> tuple:
    """finetune.py's model, adapter and Trainer for one recipe, on the first records of the shuffled sample."""
    from unittest import mock

    import torch

    import finetune
    from utils import models, packing
    from utils.training import TrainSettings

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    device = models.pick_device("auto")
    tokenizer = models.load_tokenizer(spec["tokenizer"])
    data = bench_records(spec, tokenizer)

    # The original ran fp16 on GPUs; pretending bf16 is missing makes load_model and build_trainer choose fp16
    # (with the Trainer's loss scaling), exactly as they do on a V100 or T4.
    no_bf16 = mock.patch("torch.cuda.is_bf16_supported", return_value=False) if spec.get("fp16") else mock.MagicMock()
    with no_bf16:
        base = spec["base_model"] or models.resolve_base_model(None)
        quantization = spec.get("quantization", "none")
        per_record = spec["packing"] and packing.supports(models.read_config(base))  # as finetune.py chooses
        attention = spec.get("attention", packing.NAME if per_record else None)
        model = models.load_model(base, quantization, device, dtype=models.pick_dtype(device, spec.get("bf16"), training=True),
                                  attn_implementation=attention)
        model = finetune.wrap_lora(model, quantization, None, spec.get("gradient_checkpointing", False),
                                   r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])
        micro = spec.get("micro_batch_size", spec["micro_batch"])
        settings = TrainSettings(
            micro_batch_size=micro, grad_accum=spec["batch_size"] // (micro * world), num_epochs=1,
            max_steps=spec["steps"] + spec["warmup"], learning_rate=3e-4, warmup_steps=0, save_steps=10**6,
            logging_steps=1, group_by_length=spec.get("group_by_length", False), packing=spec["packing"],
            gradient_checkpointing=spec.get("gradient_checkpointing", False),
            torch_compile=spec.get("torch_compile", False), bf16=spec.get("bf16"), seed=spec["seed"], world_size=world)
        out = Path(tempfile.mkdtemp(prefix="bench-"))
        return finetune.build_trainer(model, tokenizer, data, None, out, device, settings), model, data, device


def clock_steps(trainer, device: str) -> list:
    """(time, real tokens, all tokens) at the start and at the end of every optimizer step, filled as it trains.
    Tokens are counted as each micro-batch reaches the loss: the dataloader reads one batch ahead, so counting in
    the collator would credit them to the wrong step."""
    import torch
    from transformers import TrainerCallback

    seen, marks = {"real": 0, "total": 0}, []
    compute_loss = trainer.compute_loss

    def counting_compute_loss(model, inputs, *args, **kwargs):
        mask = inputs.get("attention_mask")
        seen["total"] += inputs["input_ids"].numel()
        seen["real"] += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
        return compute_loss(model, inputs, *args, **kwargs)

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            marks.append((time.perf_counter(), 0, 0))

        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            marks.append((time.perf_counter(), seen["real"], seen["total"]))

    trainer.compute_loss = counting_compute_loss
    trainer.add_callback(StepClock())
    return marks


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
# Names of the ops (or of the ranges and autograd nodes above them) that belong to each class; the first match wins.
OP_CLASSES = {"optimizer": ("Optimizer.",), "data collation": ("collate",),
              "output head + loss": ("head_cross_entropy", "cross_entropy", "log_softmax", "nll_loss", "LogSoftmax",
                                     "NllLoss"),
              "attention": ("scaled_dot_product", "ScaledDotProduct")}


def op_class(event, vocab_size: int) -> str:
    """The class of one profiled op: by its own name and those of the ranges above it; a matmul with the
    vocabulary in its shapes is the output head."""
    names, parent = [], event
    while parent is not None:
        names.append(parent.name)
        parent = parent.cpu_parent
    for name, marks in OP_CLASSES.items():
        if any(mark in n for n in names for mark in marks):
            return name
    if event.name in MATMULS:
        shapes = [dim for shape in event.input_shapes if isinstance(shape, list) for dim in shape]
        return "output head + loss" if vocab_size in shapes else "matmuls"
    return "norms, activations, elementwise"


def profile_step(trainer, step: int, vocab_size: int, result: dict) -> None:
    """Profile optimizer step `step` (from the end of the one before: its batches' collation included) and put each
    op class's seconds in result["classes"]; what no op covers is Python and host time."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function
    from transformers import TrainerCallback

    collator = trainer.data_collator

    def collate(features):
        with record_function("collate"):
            return collator(features)

    trainer.data_collator = collate
    prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True)

    class StepProfiler(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step - 1:
                prof.__enter__()
                self.start = time.perf_counter()
            elif state.global_step == step:
                wall = time.perf_counter() - self.start
                prof.__exit__(None, None, None)
                totals = dict.fromkeys([*OP_CLASSES, "matmuls", "norms, activations, elementwise"], 0.0)
                ops = {}
                for event in prof.events():
                    kind = op_class(event, vocab_size)
                    totals[kind] += event.self_cpu_time_total / 1e6
                    ops[event.name, kind] = ops.get((event.name, kind), 0) + event.self_cpu_time_total / 1e6
                totals["Python and host"] = wall - sum(totals.values())
                # Time in matmuls (the layers' and the head's) over the step's: the share of its matmul ceiling the
                # step reaches, measured in one run, whatever the machine's load does to both.
                matmul_s = sum(v for (op, _), v in ops.items() if op in MATMULS)
                # Four decimals: a small model's loss or optimizer takes milliseconds, which two would round to 0.
                result.update(wall_s=round(wall, 4), threads=torch.get_num_threads(), matmul_share=round(matmul_s / wall, 3), classes={
                    k: dict(s=round(v, 4), share=round(v / wall, 3)) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])},
                    top_ops=[dict(op=op, op_class=kind, s=round(v, 4)) for (op, kind), v in sorted(ops.items(), key=lambda kv: -kv[1])[:15]])

    trainer.add_callback(StepProfiler())


def run_recipe(spec: dict) -> dict:
    """Train spec['warmup'] + spec['steps'] optimizer steps with finetune.py's Trainer and measure the timed ones."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", 1))  # under torchrun: DDP, each rank runs a share of every batch
    trainer, model, data, device = build_trainer(spec, world)
    marks = clock_steps(trainer, device)
    profiled = {}
    if spec.get("profile"):
        profile_step(trainer, spec["warmup"] + 1, model.config.vocab_size, profiled)
    if spec.get("original_compile"):  # the original's line: it compiles a wrapper the Trainer never calls
        torch.compile(model)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    runtime = trainer.train().metrics["train_runtime"]  # the whole run: every step, warm-up and any compiling
    if world > 1:  # every rank counted its own micro-batches: the run's tokens are their sum (steps are in lockstep)
        tokens = torch.tensor([m[1:] for m in marks], dtype=torch.float64)
        torch.distributed.all_reduce(tokens)
        marks = [(m[0], int(r), int(t)) for m, (r, t) in zip(marks, tokens.tolist())]
    timed = marks[spec["warmup"]:]
    seconds, real, total = (timed[-1][i] - timed[0][i] for i in range(3))
    per_step = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(timed, timed[1:])]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = dict(
        processes=world, threads=torch.get_num_threads(), real_tokens=real, all_tokens=total, seconds=round(seconds, 2),
        tokens_per_s=round(real / seconds, 1), tokens_per_s_median_step=median(per_step, 1),
        padding_fraction=round(1 - real / total, 3), losses=[round(x, 4) for x in losses],
        warmup_s=round(marks[spec["warmup"]][0] - marks[0][0], 1),
        train_runtime=round(runtime, 2), end_to_end_tokens_per_s=round(marks[-1][1] / runtime, 1),
        dtype=str(next(p.dtype for n, p in model.named_parameters() if "lora_" not in n)).removeprefix("torch."),
        attention=model.config._attn_implementation,
        compiled_graphs=int(torch._dynamo.utils.counters["stats"]["unique_graphs"]),  # 0: nothing ran compiled
    )
    if profiled:
        result["profile"] = profiled
    context = sum(len(x) for x in data["input_ids"]) / len(data)  # the mean span causal attention covers
    return dict(result, **work_done(model.config, device, context, result["tokens_per_s"], spec.get("peak_flops")))


def work_done(config, device: str, context: float, tokens_per_s: float, peak_flops) -> dict:
    """Peak memory, and the useful FLOP/s (padding and masked-off blocks not counted), with MFU given a peak."""
    import torch

    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:  # ru_maxrss is in KiB on Linux: the whole process, model load included
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out = dict(peak_memory_gb=round(peak, 2), flops_per_token=round(flops_per_token(config, context)))
    achieved = out["flops_per_token"] * tokens_per_s
    out["gflops"] = round(achieved / 1e9, 1)
    if peak_flops:
        out.update(tflops=round(achieved / 1e12, 3), mfu=round(achieved / peak_flops, 4))
    return out


def run_in_subprocess(spec: dict, processes: int = 1) -> dict:
    """One recipe in a fresh interpreter: clean peak memory, no compiled graphs or threads carried over. With
    processes > 1, that many DDP ranks under torchrun (gloo on CPU), one thread each; rank 0 reports."""
    launcher = [sys.executable]
    env = dict(os.environ)
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        env["OMP_NUM_THREADS"] = str(spec.get("threads") or 1)
    proc = subprocess.run([*launcher, __file__, "--_recipe", json.dumps(spec)], capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
    raise SystemExit(f"recipe {spec['name']} failed (exit {proc.returncode}):\n{tail}")


def summarize(rounds: list[dict]) -> dict:
    """One recipe over its rounds: the last round's details, the speeds as medians, and every round kept."""
    speeds = ("tokens_per_s", "tokens_per_s_median_step", "end_to_end_tokens_per_s", "train_runtime")
    return {**rounds[-1], **{k: median([r[k] for r in rounds], 2) for k in speeds}, "rounds": rounds}


def speedups(results: dict, reference: str) -> dict:
    """Each recipe against the reference run in the same round (the machine's load drifts between rounds)."""
    out = {}
    for name, r in results.items():
        pairs = list(zip(r["rounds"], results[reference]["rounds"]))
        e2e, steady = ([round(a[k] / b[k], 2) for a, b in pairs] for k in ("end_to_end_tokens_per_s", "tokens_per_s"))
        # The median: on a shared machine one round can be slowed by another user's job, most by a core taken away.
        out[name] = dict(end_to_end=median(e2e, 2), steady=median(steady, 2), end_to_end_by_round=e2e,
                         steady_by_round=steady, spread=round(max(e2e) - min(e2e), 2))
    return out


SCALING = {"1 process x 1 thread": (1, 1), "1 process x 2 threads": (1, 2), "2 processes x 1 thread (DDP)": (2, 1)}


def run_scaling(common: dict, base_model: str, output: str) -> None:
    """Data parallel on CPU, same global batch and records: is 2 DDP ranks x 1 thread worth more than 1 rank x 2?"""
    report = dict(machine("machine", "cpu", "cpus"), model=Path(base_model).name if base_model else "SmolLM2-135M (embedded)",
                  settings={k: v for k, v in common.items() if k not in ("tokenizer", "base_model", "threads")},
                  recipe="packed", lora="r=8, alpha=16, dropout=0.05, q_proj+v_proj", results={})
    output = Path(output or REPO / "benchmarks" / "results" / f"{report['machine']}-scaling.json")
    for name, (processes, threads) in SCALING.items():
        spec = dict(common, name=name, packing=True, threads=threads)
        r = report["results"][name] = with_load(lambda: run_in_subprocess(spec, processes))
        print(f"{name}: {r['tokens_per_s']} real tokens/s, losses {r['losses']}", flush=True)
        write(output, report)
    speed = {name: r["tokens_per_s"] for name, r in report["results"].items()}
    one_core, two_threads, ddp = speed.values()
    # The same 2 cores as 2 ranks or as 2 threads of one process; and each against one core (ideal: 2x, 100%).
    report["ddp_vs_threads"] = round(ddp / two_threads, 2)
    report["efficiency"] = {name: round(speed[name] / (one_core * processes * threads), 2)
                            for name, (processes, threads) in SCALING.items()}
    write(output, report)
    print(f"2 DDP processes x 1 thread / 1 process x 2 threads: {report['ddp_vs_threads']:.2f}x, efficiency "
          f"{report['efficiency']}\nwrote {output}")


def run_rounds(names: list[str], table: dict, common: dict, rounds: int, report: dict, output: Path, smoke: bool) -> None:
    """Every recipe `rounds` times, taking turns so that load drifting on a shared machine hits them alike."""
    runs = {name: [] for name in names}
    for round_ in range(rounds):
        for name in names:
            spec = dict(common, name=name, **table[name])
            if smoke and spec.get("quantization", "none") != "none" and importlib.util.find_spec("bitsandbytes") is None:
                print(f"{name}: skipped (no bitsandbytes)")
                continue
            r = with_load(lambda: run_in_subprocess(spec))
            runs[name].append(r)
            print(f"round {round_ + 1}, {name}: {r['end_to_end_tokens_per_s']} real tokens/s end to end "
                  f"({r['train_runtime']} s), {r['tokens_per_s']} steady, padding {r['padding_fraction']:.1%}, "
                  f"peak {r['peak_memory_gb']} GB, losses {r['losses']}", flush=True)
            results = report["results"] = {n: summarize(rs) for n, rs in runs.items() if len(rs) == round_ + 1}
            reference = "reference" if "reference" in results else next(iter(results))
            report["speedup_vs_reference"] = speedups(results, reference)
            write(output, report)


def measure_ceiling(report: dict, common: dict, tokenizer) -> None:
    """The fp32 matmul ceiling at the step's shapes (rows: a packed micro-batch's mean real tokens) and a profile
    of one fp32 step by op class, into the report."""
    from utils.models import read_config, resolve_base_model

    data = bench_records(common, tokenizer)
    rows = round(sum(len(x) for x in data["input_ids"]) * common["micro_batch"] / len(data))
    config = read_config(common["base_model"] or resolve_base_model(None))
    report["roofline"] = matmul_roofline(config, rows)
    print(f"matmul GFLOP/s at the step's shapes: {report['roofline']['gflops']}; fp32 ceiling "
          f"{report['roofline']['ceiling']['tokens_per_s']} real tokens/s", flush=True)
    # Also on one thread: on a shared machine another job stalls every parallel region of a multi-threaded step
    # (each thread waits for the others), which inflates the many small ops far more than the matmuls.
    for key, threads in (("profile_fp32", common["threads"]), ("profile_fp32_1thread", 1)):
        spec = dict(common, **CPU_RECIPES["packed-fp32"], name="profile", steps=1, profile=True, threads=threads)
        r = with_load(lambda: run_in_subprocess(spec))
        report[key] = dict(recipe="packed-fp32", **r["profile"], load_average=r["load_average"])
        print(f"fp32 step profile, {r['profile']['threads']} thread(s): {report[key]['classes']}", flush=True)


def share_of_ceiling(report: dict) -> dict:
    """Each fp32 recipe's real tokens/s as a share of the fp32 matmul ceiling."""
    ceiling = report["roofline"]["ceiling"]["tokens_per_s"]
    return {name: dict(end_to_end=round(r["end_to_end_tokens_per_s"] / ceiling, 3), steady=round(r["tokens_per_s"] / ceiling, 3))
            for name, r in report["results"].items() if r["dtype"] == "float32"}


def check(recipes: str, table: dict, **values) -> None:
    """Every flag's value, before any work: a UserError naming the first one out of range."""
    from utils.checks import check_values

    check_values(dict(batch_size=values["batch_size"], cutoff_len=values["cutoff_len"]))
    unknown = [n for n in recipes.split(",") if n and n not in table]
    problems = [*((values[k] < low, f"--{k} must be at least {low}") for k, low in
                  (("steps", 1), ("warmup", 0), ("micro_batch", 1), ("threads", 0), ("rounds", 1), ("prep_records", 0))),
                (values["peak_tflops"] <= 0, "--peak_tflops must be above 0"),
                (values["size"] not in LLAMA_SHAPES, f"--size must be one of {', '.join(LLAMA_SHAPES)}, not {values['size']!r}"),
                (bool(unknown), f"unknown recipe(s) {', '.join(unknown)}: choose from {', '.join(table)}")]
    for bad, message in problems:
        if bad:
            raise UserError(message)


def main(recipes: str = "", steps: int = 3, warmup: int = 1, batch_size: int = 16, micro_batch: int = 4,
         cutoff_len: int = 256, prep_records: int = 52_000, threads: int = 0, rounds: int = 3, gpu: bool = False,
         size: str = "7b", smoke: bool = False, scaling: bool = False, base_model: str = "", tokenizer: str = "",
         work_dir: str = "", peak_tflops: float = H100_BF16_FLOPS / 1e12, output: str = "", _recipe: str = ""):
    """Time the original alpaca-lora recipe against this project's on the same data, model and batch; write JSON.

    Args:
        recipes: Comma-separated recipe names; default: the main ones for the mode (CPU, or GPU with --gpu).
        steps: Timed optimizer steps per recipe.
        warmup: Optimizer steps run first and not timed.
        batch_size: Records per optimizer step (all recipes).
        micro_batch: Records per forward pass (unless a recipe says otherwise).
        cutoff_len: Maximum tokens per record.
        prep_records: Records for the data-preparation timing (0: skip it).
        threads: Torch threads (0: torch's default).
        rounds: Times every recipe runs, the recipes taking turns (each in a fresh process).
        gpu: Random LLaMA shapes on the GPU, with MFU.
        size: The --gpu model shape: 7b, 13b or tiny.
        smoke: The --gpu code path with a tiny model and 1+1 steps (seconds, on any machine).
        scaling: CPU data parallel: the packed recipe as 1 process x 1 and x 2 threads, and 2 DDP processes x 1 thread.
        base_model: Model directory for the CPU runs; default: the embedded SmolLM2.
        tokenizer: Tokenizer directory; default: the embedded SmolLM2's.
        work_dir: Where --gpu builds its random checkpoint; default: alpaca-lora-bench in the system's temp folder.
        peak_tflops: The MFU denominator, in TFLOP/s (default: the documented H100/H200 bf16 matmul ceiling).
        output: The JSON file to write; default: benchmarks/results/<machine>.json.
    """
    table = GPU_RECIPES if gpu or smoke else CPU_RECIPES
    check(recipes, table, steps=steps, warmup=warmup, batch_size=batch_size, micro_batch=micro_batch, size=size,
          cutoff_len=cutoff_len, prep_records=prep_records, threads=threads, rounds=rounds, peak_tflops=peak_tflops)
    if _recipe:  # child process (or torchrun rank: rank 0 reports)
        result = run_recipe(json.loads(_recipe))
        if os.environ.get("RANK", "0") == "0":
            print("RESULT " + json.dumps(result), flush=True)
        return
    from utils.models import load_tokenizer, resolve_base_model

    gpu = gpu or smoke
    if smoke:
        size, steps, warmup, batch_size, prep_records, rounds = "tiny", 1, 1, 16, 2000, 1
    tokenizer_dir = tokenizer or resolve_base_model(None)
    tokenizer = load_tokenizer(tokenizer_dir)
    common = dict(steps=steps, warmup=warmup, batch_size=batch_size, micro_batch=micro_batch,
                  cutoff_len=cutoff_len, seed=0, threads=threads, tokenizer=tokenizer_dir, base_model=base_model or None)
    if scaling:
        return run_scaling(common, base_model, output)
    if gpu:
        import torch

        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        path = llama_checkpoint(size, len(tokenizer), Path(work_dir or WORK), dtype)
        common.update(base_model=str(path), peak_flops=peak_tflops * 1e12)
    report = dict(machine("machine", "cpu", "cpus", gpu=gpu), model=f"random LLaMA-{size}" if gpu else "SmolLM2-135M (embedded)",
                  settings={k: v for k, v in common.items() if k not in ("tokenizer", "base_model")},
                  lora="r=8, alpha=16, dropout=0.05, q_proj+v_proj")
    if not gpu:
        report["isa_limits"] = isa_limits()
        measure_ceiling(report, common, tokenizer)
    if prep_records:
        report["data_prep"] = p = time_data_prep(tokenizer, prep_records, cutoff_len)
        print(f"data preparation, {p['records']} records: original per-record map {p['reference_s']} s, "
              f"batched map {p['project_s']} s ({p['speedup']}x), same tokens: {p['same_tokens']}", flush=True)
    output = Path(output or REPO / "benchmarks" / "results" / f"{report['machine']}.json")
    names = recipes.split(",") if recipes else (list(GPU_RECIPES) if gpu else CPU_DEFAULT)
    run_rounds(names, table, common, rounds, report, output, smoke)
    if "roofline" in report:
        report["roofline"]["share_of_ceiling"] = share_of_ceiling(report)
        write(output, report)
    print(f"wrote {output}")


if __name__ == "__main__":
    run(main)
