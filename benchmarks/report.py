"""Render every measured figure in the docs from the committed results files: `python benchmarks/report.py`.

Writes docs/performance.md whole, and the generated blocks (between `<!-- figures:NAME -->` and
`<!-- /figures:NAME -->`) in README.md and docs/*.md. tests/test_docs.py checks that the committed files equal what
this renders, so a figure edited by hand, or a result committed without regenerating, fails the tests.
"""

import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from utils.evaluation import losses_table  # noqa: E402  (the table evaluate.py writes, so both agree)

RESULTS = REPO / "benchmarks" / "results"
REAL_RUN = REPO / "docs" / "real-run"
PERFORMANCE = REPO / "docs" / "performance.md"
COMMAND = "python benchmarks/report.py"
BLOCK = re.compile(r"(<!-- figures:(?P<name>[\w-]+) -->\n).*?(<!-- /figures:(?P=name) -->)", re.S)
# generate.py's choices on a CPU with native bf16, to mark the row a user gets without flags.
GENERATE_DEFAULTS = {"bf16": True, "compile": True, "threads": 0}


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join("" if cell is None else str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def source(name: str, data: dict) -> str:
    """The line under each table: which file it comes from and which machine measured it."""
    machine = data.get("cpu") or "not recorded in the file"
    cores = f", {data['cpus']} cores" if "cpus" in data else ""
    return f"Source: [`benchmarks/results/{name}`](../benchmarks/results/{name}); machine: {machine}{cores}.\n"


def steps(values: list) -> str:
    return " / ".join(str(value) for value in values)


def span(values: list[float]) -> str:
    low, high = min(values), max(values)
    return f"{low}" if low == high else f"{low}–{high}"


def load_averages(results: dict) -> list[float]:
    """Every load average recorded before and after a run, each round's included."""
    runs = [run for result in results.values() for run in [result, *result.get("rounds", [])]]
    return [load for run in runs for load in run.get("load_average", [])]


def recipe_table(data: dict) -> str:
    """One row per recipe of bench_train.py: end to end and steady throughput against the reference."""
    rows = []
    for recipe, result in data["results"].items():
        ratio = data["speedup_vs_reference"][recipe]
        rounds = result.get("rounds", [result])
        rows.append([
            recipe, result["end_to_end_tokens_per_s"],
            f"{ratio['end_to_end']}× ({steps(ratio['end_to_end_by_round'])})",
            " / ".join(f"{r['train_runtime']} s" for r in rounds), result["tokens_per_s"], f"{ratio['steady']}×",
            f"{result['padding_fraction']:.0%}", f"{result['dtype']}, {result['attention']}", result["gflops"],
            f"{result['peak_memory_gb']} GB",
        ])
    header = ["recipe", "end to end: real tokens/s", "vs reference (per round)", "train_runtime per round",
              "steady: real tokens/s", "vs reference", "padding", "precision, attention", "useful GFLOP/s",
              "peak memory"]
    return table(header, rows)


def settings_line(data: dict) -> str:
    settings, rounds = data["settings"], len(next(iter(data["results"].values())).get("rounds", [None]))
    return (f"{data['model']}, LoRA {data['lora']}; batch {settings['batch_size']} from micro-batches of "
            f"{settings['micro_batch']}, cutoff {settings['cutoff_len']}, seed {settings['seed']}, {settings['warmup']} untimed + "
            f"{settings['steps']} timed optimizer steps, {rounds} round(s); load average "
            f"{span(load_averages(data['results']))}.\n")


def losses_by_recipe(data: dict) -> str:
    rows = [[recipe, steps(result["losses"])] for recipe, result in data["results"].items()]
    return table(["recipe", "training loss at each step"], rows)


def roofline(data: dict) -> str:
    """This CPU's matmul rate at the step's shapes, and the tokens/s it would allow if matmuls were all a step did."""
    flops_per_token = next(iter(data["results"].values()))["flops_per_token"]
    rows = [[shape.split(" ", 1)[0], shape.split(" ", 1)[1], gflops, round(gflops * 1e9 / flops_per_token)]
            for shape, gflops in data["matmul_gflops"].items()]
    return (table(["dtype", "shape (tokens × in → out)", "GFLOP/s", "ceiling: real tokens/s"], rows)
            + f"\nFLOPs per real token (`flops_per_token`): {flops_per_token:,}.\n")


def data_prep(data: dict) -> str:
    prep = data["data_prep"]
    rows = [["the original's (one `map` call per record)", f"{prep['reference_s']} s"],
            ["this project's (`utils.data.encode_batch`)", f"{prep['project_s']} s"]]
    return (table([f"way to prepare {prep['records']:,} records", "time"], rows)
            + f"\nSpeed-up {prep['speedup']}×; the same tokens: {prep['same_tokens']}.\n")


def scaling(data: dict) -> str:
    """One row per process/thread layout, against the first (one process, one thread)."""
    first, *_ = data["results"]
    baseline = data["results"][first]["tokens_per_s"]
    rows = [[layout, result["tokens_per_s"], f"{result['tokens_per_s'] / baseline:.2f}×",
             f"{data['efficiency'][layout]:.0%}", f"{result['peak_memory_gb']} GB", steps(result["losses"])]
            for layout, result in data["results"].items()]
    header = ["layout", "real tokens/s", f"vs {first}", "efficiency (per core)", "peak memory (per process)", "losses"]
    return table(header, rows) + f"\nDDP against one process with as many threads: {data['ddp_vs_threads']}×.\n"


def generate_config(name: str, config: dict) -> str:
    flags = config.get("flags")
    if flags is None:
        return f"{name} ({config['threads']} thread{'s' if config['threads'] > 1 else ''}, `{config['file']}`)"
    what = f"{'bf16' if flags['bf16'] else 'fp32'}, {'compiled step' if flags['compile'] else 'eager'}, "
    what += "a core left to streaming" if flags["threads"] == 0 else f"{flags['threads']} threads"
    return f"**{name}: {what} (the default here)**" if flags == GENERATE_DEFAULTS else f"{name}: {what}"


def generation(data: dict) -> str:
    rows = []
    for name, config in data["configs"].items():
        summary = data["summary"][name]
        cell = lambda workload, field: summary.get(workload, {}).get(field)  # noqa: E731
        rows.append([
            generate_config(name, config), cell("tab greedy", "first_token_s"), cell("tab greedy", "decode_tokens_per_s"),
            cell("tab demo sliders", "decode_tokens_per_s"), cell("api greedy", "decode_tokens_per_s"),
            cell("api greedy x4", "all_tokens_per_s"), cell("tab demo sliders, stream off (4 beams)", "total_s"),
            config["start_s"],
        ])
    header = ["configuration", "first token (s)", "tokens/s, Instruction tab (greedy)", "tokens/s, tab, demo sliders",
              "tokens/s, API (greedy)", "4 API requests at once: tokens/s in all", "4 beams, stream off: s per answer",
              "start-up (s)"]
    settings = data["settings"]
    return (table(header, rows) + f"\n\"{data['instruction']}\", {settings['max_new_tokens']} new tokens at most, "
            f"{settings['rounds']} rounds, the configurations taking turns; measured {data['date']}. fp32 greedy answers "
            f"identical, eager and compiled step (`fp32_greedy_identical`): {data['fp32_greedy_identical']}.\n")


def llama_backend(data: dict) -> str:
    """generate.py --backend llama.cpp against llama.cpp itself on the same files (bench_generate.py's verdict)."""
    rows = []
    for name, config in data["configs"].items():
        flags = config.get("flags")
        if flags is None:
            what = f"llama.cpp itself, {config['threads']} thread{'s' if config['threads'] > 1 else ''}, `{config['file']}`"
        else:
            what = f"`generate.py --backend llama.cpp{' --gguf_type ' + flags['gguf_type'] if 'gguf_type' in flags else ''}`"
            what += ", a core left to streaming" if flags["threads"] == 0 else f", {flags['threads']} threads"
        summary = data["summary"][name]
        cell = lambda workload, field: summary.get(workload, {}).get(field)  # noqa: E731
        rows.append([f"{name}: {what}", cell("tab greedy", "first_token_s"), cell("tab greedy", "decode_tokens_per_s"),
                     cell("tab demo sliders", "decode_tokens_per_s"), cell("api greedy", "decode_tokens_per_s"),
                     cell("api greedy x4", "all_tokens_per_s"), config["start_s"]])
    header = ["configuration", "first token (s)", "tokens/s, Instruction tab (greedy)", "tokens/s, tab, demo sliders",
              "tokens/s, API (greedy)", "4 API requests at once: tokens/s in all", "start-up (s)"]
    settings = data["settings"]
    return (table(header, rows) + f"\n\"{data['instruction']}\", {settings['max_new_tokens']} new tokens at most, "
            f"{settings['rounds']} rounds, the configurations taking turns; load average "
            f"{span(load_averages_of(data['results']))}; measured {data['date']}. Against llama.cpp's faster thread "
            "count on the same file type (`verdict`):\n\n" + "".join(f"- {line}\n" for line in data["verdict"]))


def load_averages_of(results: dict) -> list[float]:
    """Every load average bench_generate.py recorded (configuration -> scenario -> runs)."""
    return [load for scenarios in results.values() for runs in scenarios.values() for run in runs
            for load in run.get("load_average", [])]


def gguf(data: dict) -> str:
    rows = [[outtype, result["size_mib"], result["perplexity"],
             f"{result['same_leading_tokens_as_transformers']} of {result['answer_tokens']}"]
            for outtype, result in data["types"].items()]
    header = ["`--outtype`", "size (MiB)", "perplexity", "answer: first tokens equal to transformers'"]
    quote = lambda text: " ".join(text.split())  # noqa: E731  (one line inside the quote)
    return (table(header, rows) + f"\nHeld out: {data['held_out']}. transformers' greedy answer on the merged model "
            f"(float32): \"{quote(data['transformers_answer'])}\"; the base alone: \"{quote(data['transformers_base_answer'])}\"; "
            f"Q4_K_M in llama.cpp: \"{quote(data['types']['q4_k_m']['answer'])}\".\n")


def serving(data: dict) -> str:
    rows = [[crowd["clients"], crowd["answered"], crowd["turned_away"], crowd["first_token_s"]["p50"],
             crowd["first_token_s"]["p95"], crowd["total_s"]["p50"], crowd["total_s"]["p95"], crowd["all_tokens_per_s"],
             data["speedup_over_one_client"][str(crowd["clients"])]] for crowd in data["crowds"]]
    header = ["clients at once", "answered", "turned away", "first token p50 (s)", "first token p95 (s)",
              "answer p50 (s)", "answer p95 (s)", "tokens/s in all", "× one client"]
    return (table(header, rows) + f"\n`{data['server']}`, {data['model']}, max_tokens {data['max_tokens']}; the server "
            f"took {data['server_start_s']} s to be ready; measured {data['date']}.\n")


START_CODE = {"before": "before: compiled, then served", "after": "**now: served at once, compiled in the background**"}


def start(data: dict) -> str:
    """bench_start.py's figures: seconds from launch until the page answers, the first answer's first token, and
    the compiled step in use, per code version and compile cache (the median over rounds)."""
    import statistics

    rows = []
    for label, run in data["runs"].items():
        for cache in ("cold", "warm"):
            middle = lambda key: round(statistics.median(r[key] for r in run[cache]), 1)  # noqa: E731
            loads = [load for r in run[cache] for load in r["load_average"]]
            code = START_CODE.get(label, label) + (f" (`{run['code']}`)" if run.get("code") else "")
            rows.append([code, f"{cache} ({'empty' if cache == 'cold' else 'reused'})",
                         middle("page_s"), middle("first_token_s"), middle("compiled_s"), len(run[cache]), span(loads)])
    header = ["generate.py", "compile cache", "page answers (s)", "first answer's first token (s)",
              "compiled step in use (s)", "runs", "load average"]
    dates = ", ".join(sorted({run["date"] for run in data["runs"].values()}))
    return (table(header, rows) + f"\nSeconds from `{data['server']}` starting, {data['model']}, a streamed greedy "
            f"answer of {data['answer_tokens']} tokens sent as soon as the page answers; measured {dates}.\n")


def memory() -> str:
    """docs/scale.md's per-GPU memory table (benchmarks/memory.py's arithmetic) and its check on CPU."""
    data = load(RESULTS / "memory.json")
    names = {"ddp": "DDP (torchrun)", "fsdp": "FSDP2", "zero3": "ZeRO-3"}
    rows = [[r["model"], r["precision"], names[r["launcher"]], r["loading_gib"], r["weights_gib"], r["train_gib"],
             r["train_checkpointing_gib"]] for r in data["per_gpu"]]
    header = ["model", "base", "launcher", "GiB per GPU loading", "weights per GPU", "training",
              "training, --gradient_checkpointing"]
    recipe = data["recipe"]
    checks = "; ".join(f"{names[k]}: {v['measured_sharded']} sharded (computed {v['predicted_sharded']}), "
                       f"{v['measured_run']} over the run (computed {v['predicted_run']})"
                       for k, v in data["cpu_check"].items())
    return (table(header, rows) + f"\n{recipe['gpus']} GPUs for the sharded rows, micro-batch of {recipe['tokens']} "
            f"tokens, LoRA r={recipe['lora_r']} on q/v; {data['note']} (`benchmarks/results/memory.json`). The same "
            f"arithmetic against rank 1 of 2 CPU ranks in `tests/test_shard.py`, in model copies: {checks}.\n")


def real_run() -> str:
    """The documented run's held-out figures (evaluate.py's table) and the Trainer's own, from docs/real-run/."""
    evaluation, metrics = load(REAL_RUN / "evaluation.json"), load(REAL_RUN / "metrics.json")
    return (losses_table(evaluation["held_out"]) + f"\nTraining took {metrics['train_runtime'] / 60:.1f} minutes "
            f"(`train_runtime`). The Trainer's own validation loss, a mean over batches, went from "
            f"{metrics['eval_loss_first']:.3f} to {metrics['eval_loss_last']:.3f}.\n")


def headline() -> str:
    """The README's few figures, each with the page and file it comes from."""
    train = load(RESULTS / "cpu-2core.json")
    default = next(r for r, v in train["results"].items() if v["dtype"] == "bfloat16" and v["padding_fraction"] == 0)
    prep = train["data_prep"]
    held_out = load(REAL_RUN / "evaluation.json")["held_out"]
    return (f"- Training on {train['cpus']} cores of an {train['cpu']}: the default recipe ({default}) trains "
            f"{train['speedup_vs_reference'][default]['end_to_end']}× as many real tokens/s as the original, end to end; "
            f"{prep['records']:,} records are prepared in {prep['project_s']} s against {prep['reference_s']} s "
            f"([Performance](docs/performance.md), `benchmarks/results/cpu-2core.json`).\n"
            f"- The [documented real run](docs/evaluation.md#a-documented-real-run): held-out perplexity "
            f"{held_out['base']['perplexity']:.2f} for the base model, {held_out['adapter']['perplexity']:.2f} with "
            f"the adapter (`docs/real-run/evaluation.json`).\n")


def performance_page() -> str:
    """docs/performance.md: the method in prose, every number in a table rendered from a results file."""
    cpu, avx2 = load(RESULTS / "cpu-2core.json"), load(RESULTS / "cpu-2core-avx2.json")
    scale, gen, quant, crowd, starts, backend = (load(RESULTS / name) for name in (
        "cpu-2core-scaling.json", "generate-cpu-2core.json", "gguf.json", "serving-cpu-2core.json", "start-cpu-2core.json",
        "generate-llama-backend-cpu-2core.json"))
    caps = " ".join(f"{key}={value}" for key, value in avx2["isa_limits"].items())
    return f"""<!-- Generated by `{COMMAND}` from benchmarks/results/*.json: edit the script or rerun a benchmark, not this file. -->
# Performance

Every figure on this page is rendered from a committed results file by `{COMMAND}`; each table names its file and
the machine that measured it. The benchmarks write those files:

```bash
python benchmarks/bench_train.py                   # CPU, the embedded SmolLM2-135M: the training recipes
python benchmarks/bench_train.py --scaling         # CPU: one process with 1 and 2 threads, and 2 DDP processes
python benchmarks/bench_train.py --gpu --size 7b   # one GPU: random LLaMA-7B shapes; bf16, 8-bit, 4-bit; MFU
python benchmarks/bench_generate.py                # answer speed through a real generate.py server, and llama.cpp
python benchmarks/bench_serving.py                 # crowds of 1-200 API clients against generate.py --api
python benchmarks/bench_start.py                   # seconds until generate.py answers, cold and warm compile cache
python benchmarks/bench_gguf.py                    # each GGUF type's size, perplexity and answer in llama.cpp
python benchmarks/report.py                        # this page, and the figures quoted in the README and docs
```

## Training

`benchmarks/bench_train.py` trains the same Alpaca records (shuffled with a fixed seed) in the same order with the same
global batch under several recipes, each in a fresh process, with the recipes taking turns over several rounds. It
reports real (non-padding) training tokens per second **end to end** (the Trainer's `train_runtime`: every step,
the first one and any compiling included, which is what a user waits for) and **steady** (the steps after the
first), the share of compute spent on padding, peak memory and the useful FLOP/s. Each recipe is compared with the
reference of the same round; the file keeps every round. The **reference** is the original `finetune.py` as it runs
on today's libraries on a CPU: random micro-batches padded per batch, no length grouping, fp32, transformers'
default attention (SDPA), and its `torch.compile(model)` line, called where the original calls it: after the
Trainer is built. That call returns a compiled wrapper the Trainer never uses, so the original trains uncompiled;
the file records dynamo's graph count for it (`compiled_graphs`). **packed** is this project's default: padding-free
packing, per-record attention (`sdpa_packed`), and the frozen base in bf16 where the CPU computes bf16 natively.

{recipe_table(cpu)}
{source("cpu-2core.json", cpu)}{settings_line(cpu)}
What is learned is the same: packing changes the speed, not the losses, and bf16 stays close to fp32.
`tests/test_finetune.py` checks the same on a tiny model (bf16's held-out loss close to fp32's after a run that lowers it), and
that LoRA weights, optimizer state and saved adapter are fp32; `tests/test_packing.py` that the packed loss equals
the padded loss exactly.

{losses_by_recipe(cpu)}
### What the default changes

- **bf16 where the CPU computes it.** On CPUs with AVX512-BF16 or AMX (and GPUs with bf16) the frozen base is
  loaded in bf16; PEFT keeps the LoRA weights in fp32 (so the optimizer state is fp32) and the loss upcasts the
  logits to fp32. No autocast: it re-casts every fp32 weight at every step. `ATEN_CPU_CAPABILITY` /
  `ONEDNN_MAX_CPU_ISA` caps count as no native bf16. The choice and its reason are printed at start;
  `--bf16 False` forces fp32.
- **Per-record attention for packed rows** (`utils/packing.py`, registered with transformers' `AttentionInterface`
  as `sdpa_packed`): each record of a packed row goes through PyTorch's causal SDPA kernel on its own, bounded by
  the `cu_seq_lens` that `DataCollatorWithFlattening` computes from the position ids, instead of one dense
  block-diagonal mask over the whole row. Models whose attention SDPA cannot reproduce keep their own (Gemma 2's
  logit soft-capping, sliding-window layers narrower than a record). On a CPU it attends in fp32 even in a bf16
  model, because the fused kernel is faster there.
- **Unchanged**: LoRA dropout (the original's hyperparameter; with `--lora_dropout 0` PEFT skips its masks), the
  loss over the full vocabulary, and torch's one thread per physical core.

### What limits it (roofline)

A LoRA step costs about four times the model's parameters in FLOPs per real token, plus attention. The table gives
this CPU's matmul rate at the step's shapes (`matmul_gflops`) and the real tokens/s that rate would allow if a step
were matmuls only; the recipe table's useful GFLOP/s counts real tokens only. The gap between the two is the step's
non-matmul work (attention, dtype casts, LoRA dropout's masks, elementwise ops), which bf16 matmuls do not speed up.

{roofline(cpu)}
### The same recipes with AVX512 and AMX hidden: an imitation, not a laptop

This table was measured on the same bf16-capable machine, with `{caps}` set so that PyTorch's kernels see AVX2 only,
as on a laptop without AVX512. The caps hide AVX512 from some of PyTorch's kernels, not all, so a real AVX2-only CPU
may be slower for every recipe. The default sees no native bf16 there and trains in fp32. It was measured before
attention moved to fp32 in bf16 models, a change that leaves these fp32 runs as they were.

{recipe_table(avx2)}
{source("cpu-2core-avx2.json", avx2)}{settings_line(avx2)}
### Data preparation

The records (the shipped sample repeated) are tokenized by the fast tokenizer's Rust backend directly
(`utils.data.encode_batch`), records without labels are dropped inside the one batched `map`, and character offsets
are computed only when they are needed (`--train_on_inputs False`). The original calls `map` once per record. Both
give the same tokens (checked by the benchmark).

{data_prep(cpu)}
{source("cpu-2core.json", cpu)}
### Data parallel on CPU

The packed recipe in fp32 with full-row attention, as the code was before bf16 and per-record attention, on the same
records and global batch in every layout, one run each, with another user's jobs on the machine. On one machine's
cores threads win: each DDP rank trains one packed micro-batch per step, so the rank with the longer row sets the
pace, and both repeat the per-process work (data collation, optimizer step) besides the all-reduce. DDP is for
several GPUs or machines, not for the cores of one CPU; its losses differ slightly because its LoRA dropout masks do.

{scaling(scale)}
{source("cpu-2core-scaling.json", scale)}{settings_line(scale)}
### Measuring on a shared machine

Other users' jobs on the same cores slow a multi-threaded run far more than their share: when one core is taken,
each OpenMP thread waits for the other at every parallel region. Hence rounds, ratios within a round, medians, and
the load average before and after each recipe in the results files. Figures from a shared machine are indicative.

### GPU: not measured

No GPU was lent to the sessions that built this, so there is no GPU table and multi-GPU scaling is unmeasured.
`--gpu --size 7b` (or `13b`) measures the same table on random LLaMA shapes in bf16, 8-bit and 4-bit against the
original's fp16 + 8-bit path, with MFU quoted against `H100_BF16_FLOPS` in `benchmarks/bench_train.py`, the bf16
matmul ceiling documented for the H100/H200 machines (not measured by this project). Its code path runs on CPU in
`--smoke` mode (`python -m pytest -m slow tests/test_bench.py`).

## Generation speed

`benchmarks/bench_generate.py` times each of `generate.py`'s choices (bf16, the compiled decoding step, a core left
to streaming; see [How fast answers appear](serving.md#how-fast-answers-appear)) as users reach them, through a real
`generate.py` server (the Instruction tab via gradio_client, the API with streamed completions), against llama.cpp
answering the same prompt from GGUF exports of the same weights. "before" is the code before these choices.

{generation(gen)}
{source("generate-cpu-2core.json", gen)}
### llama.cpp backend

`generate.py --backend llama.cpp` (see [Serving](serving.md#llamacpp-backend)) timed by the same benchmark, through
the same page and API, against llama.cpp answering the same prompt in-process from the same file type: the embedded
model's shipped Q4_1 file, and the model exported at f16. The bar: greedy decoding within 10% of llama.cpp's own
tokens/s. The backend decodes one request at a time, so 4 requests at once take turns. The machine was shared with
other jobs (the load average below is above its core count): llama.cpp on 2 threads suffers most, and a single
run's ratios move by more than the 10% bar from one run to the next.

```bash
python benchmarks/bench_generate.py --configs llama.cpp-backend,llama.cpp-backend-f16 --llama q4_1,f16 \\
    --output benchmarks/results/generate-llama-backend-cpu-2core.json
```

{llama_backend(backend)}
{source("generate-llama-backend-cpu-2core.json", backend)}
### Start-up: usable at once

`benchmarks/bench_start.py` starts `generate.py` with its default flags and times, from the launch, the page
answering, the first token of an answer requested right then, and the compiled decoding step coming into use
(the server prints a line). "cold" starts with an empty compile cache (`TORCHINDUCTOR_CACHE_DIR` in a new
folder), "warm" reuses the cold start's. Before, the demo compiled and warmed the step before it served. Now it
serves at once with the uncompiled step while another thread compiles and warms the compiled one, then switches
to it between two decoding steps (`utils.serving.Engine.compile_in_background`). The machine was shared, so the
load average is given next to each row.

{start(starts)}
{source("start-cpu-2core.json", starts)}
## Serving a crowd

`benchmarks/bench_serving.py` starts `generate.py --api` with its default flags and sends crowds of concurrent
streamed chat completions from plain HTTP clients: how many are answered or turned away (HTTP 503 past the queue),
the time to the first token and to the whole answer (p50/p95), and the tokens per second of all answers together.
Requests that run at the same time share each forward pass (see [Serving](serving.md)).

{serving(crowd)}
{source("serving-cpu-2core.json", crowd)}
## GGUF types

`benchmarks/bench_gguf.py` exports the embedded SmolLM2-135M + the quick start's adapter at each type and measures
it in llama.cpp: perplexity over every token of held-out records (Stanford Alpaca's seed tasks, rendered with the
alpaca template; none of them is in the training sample), and the greedy answer to the quick start's prompt against
transformers' greedy answer on the merged model in float32. Greedy decoding on a small model amplifies every
rounding, and a few records make a noisy perplexity. Q4_K_M's answer below still gives the adapter's direct
Alpaca-style answer, not the base's chat manner, though it parts from transformers' wording early. This model's
rows are narrower than a K-quant block, so llama.cpp's quantizer stores most of its matrices in other block types;
on 7B-class models the K types apply throughout and the sizes scale as llama.cpp documents.

{gguf(quant)}
{source("gguf.json", quant)}
## Memory of sharded training

Computed, not measured: `benchmarks/memory.py` writes [memory.json](../benchmarks/results/memory.json), the per-GPU
memory of 7B-70B bases under DDP, FSDP2 and ZeRO-3 that [Scale](scale.md#memory-per-gpu) renders, checked against
what 2 CPU ranks measure in `tests/test_shard.py`.
"""


def render_block(name: str) -> str:
    return {"real-run": real_run, "headline": headline, "memory": memory}[name]()


def with_blocks(text: str) -> str:
    """text with each generated block's content rendered anew."""
    return BLOCK.sub(lambda m: m.group(1) + render_block(m.group("name")) + m.group(3), text)


def pages() -> list[Path]:
    """The files that may hold generated blocks."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def main() -> None:
    PERFORMANCE.write_text(performance_page())
    for page in pages():
        text = page.read_text()
        if with_blocks(text) != text:
            page.write_text(with_blocks(text))
    print(f"wrote {PERFORMANCE.relative_to(REPO)} and the generated blocks of {len(pages())} pages")


if __name__ == "__main__":
    main()
