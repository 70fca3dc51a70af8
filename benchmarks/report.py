"""Render every measured figure in the docs from the committed results files: `python benchmarks/report.py`.

Rewrites the generated blocks (between `<!-- figures:NAME -->` and `<!-- /figures:NAME -->`, NAME a key of BLOCKS)
in README.md and docs/*.md; the prose around them is written by hand. tests/test_docs.py checks that the committed files equal what
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


def fp32_profile(data: dict) -> str:
    """bench_train.py's profile of one fp32 step by op class, with the step's threads and on one thread."""
    runs = [data[key] for key in ("profile_fp32", "profile_fp32_1thread") if key in data]
    classes = list(runs[0]["classes"])
    rows = [[name, *(f"{run['classes'][name]['s']} s ({run['classes'][name]['share']:.0%})" for run in runs)]
            for name in classes]
    rows.append(["**the step**", *(f"{run['wall_s']} s" for run in runs)])
    header = ["op class", *(f"{run['threads']} thread{'s' if run['threads'] > 1 else ''}: seconds (share)" for run in runs)]
    shares = "; ".join(f"{run['threads']} thread(s) {run['matmul_share']:.0%}, load average {steps(run['load_average'])}"
                       for run in runs)
    return table(header, rows) + f"\nTime in matmuls (`matmul_share`, the layers' and the head's): {shares}.\n"


def fp32_ceiling(data: dict) -> str:
    """The fp32 matmul ceiling's arithmetic: each frozen matmul's FLOPs per token at its measured rate, summed."""
    roof, rows = data["roofline"], []
    for name, rate in roof["gflops"].items():
        if not name.startswith("float32"):
            continue
        d_in, d_out = (int(x) for x in rate["shape"].split("x")[1:])
        flops = 2 * d_in * d_out * rate["per_token"]  # one way (forward, or backward to the input)
        ms = sum(flops / (rate[way] * 1e9) for way in ("forward", "backward")) * 1e3
        rows.append([name.removeprefix("float32 "), rate["shape"], rate["per_token"], f"{2 * flops:,}",
                     rate["forward"], rate["backward"], f"{ms:.3f} ms"])
    ceiling = roof["ceiling"]
    rows.append(["**all**", "", "", f"{ceiling['matmul_flops_per_token']:,}", "", "", f"{ceiling['matmul_ms_per_token']} ms"])
    header = ["matmul", "shape (tokens × in → out)", "per token (layers × matrices)", "FLOPs per token, both ways",
              "forward GFLOP/s", "backward GFLOP/s", "time per token"]
    shares = "; ".join(f"{name} {r['end_to_end_tokens_per_s'] / ceiling['tokens_per_s']:.0%} end to end, "
                       f"{r['tokens_per_s'] / ceiling['tokens_per_s']:.0%} steady"
                       for name, r in data["results"].items() if r["dtype"] == "float32")
    shares += f" (load average {span(load_averages(data['results']))})"
    return (table(header, rows) + f"\nCeiling: 1 / {ceiling['matmul_ms_per_token']} ms = **{ceiling['tokens_per_s']} real "
            f"tokens/s** in fp32. Reached (real tokens/s over the ceiling): {shares}.\n")


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
        return f"{name}: llama.cpp itself, {config['threads']} thread{'s' if config['threads'] > 1 else ''}, `{config['file']}`"
    cores = "a core left to streaming" if flags["threads"] == 0 else f"{flags['threads']} threads"
    if "backend" in flags:
        return f"{name}: `generate.py --backend llama.cpp{' --gguf_type ' + flags['gguf_type'] if 'gguf_type' in flags else ''}`, {cores}"
    what = f"{'bf16' if flags['bf16'] else 'fp32'}, {'compiled step' if flags['compile'] else 'eager'}, {cores}"
    return f"**{name}: {what} (the default here)**" if flags == GENERATE_DEFAULTS else f"{name}: {what}"


def speeds(data: dict, beams: bool) -> str:
    """bench_generate.py's table: one row per configuration, the median over rounds of each scenario's figure."""
    columns = [("tab greedy", "first_token_s", "first token (s)"),
               ("tab greedy", "decode_tokens_per_s", "tokens/s, Instruction tab (greedy)"),
               ("tab demo sliders", "decode_tokens_per_s", "tokens/s, tab, demo sliders"),
               ("api greedy", "decode_tokens_per_s", "tokens/s, API (greedy)"),
               ("api greedy x4", "all_tokens_per_s", "4 API requests at once: tokens/s in all")]
    if beams:
        columns.append(("tab demo sliders, stream off (4 beams)", "total_s", "4 beams, stream off: s per answer"))
    rows = [[generate_config(name, config), *(data["summary"][name].get(scenario, {}).get(field)
                                              for scenario, field, _ in columns), config["start_s"]]
            for name, config in data["configs"].items()]
    settings = data["settings"]
    return (table(["configuration", *(header for *_, header in columns), "start-up (s)"], rows)
            + f"\n\"{data['instruction']}\", {settings['max_new_tokens']} new tokens at most, {settings['rounds']} "
            f"rounds, the configurations taking turns; load average {span(generation_loads(data['results']))}; "
            f"measured {data['date']}.")


def generation(data: dict) -> str:
    return (speeds(data, beams=True) + " fp32 greedy answers identical, eager and compiled step "
            f"(`fp32_greedy_identical`): {data['fp32_greedy_identical']}.\n")


def llama_backend(data: dict) -> str:
    """generate.py --backend llama.cpp against llama.cpp itself on the same files (bench_generate.py's verdict)."""
    return (speeds(data, beams=False) + " Against llama.cpp's faster thread count on the same file type (`verdict`):"
            "\n\n" + "".join(f"- {line}\n" for line in data["verdict"]))


def generation_loads(results: dict) -> list[float]:
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


def serving_at_start(data: dict) -> str:
    """bench_serving.py --at_start: one crowd per freshly started server, in the order run (A/B alternating)."""
    rows = [[run["started"], f"`{run['code']}`", " ".join(f"--{k} {v}" for k, v in run["flags"].items() if v != "") or "(default flags)",
             run["precision"], "yes" if run["compiling"] else "no", run["ready_s"], f"{run['answered']} of {run['clients']}",
             run["total_s"]["p50"], run["total_s"]["p95"], run["all_answered_s"],
             run["compiled_s"] or ("not yet" if run["compiling"] else ""), steps(run["load_average"])]
            for run in data["runs"]]
    header = ["started", "code", "generate.py --api", "precision", "compiles in the background", "/v1/models answers (s)",
              "answered", "answer p50 (s)", "answer p95 (s)", "all answered (s)", "compiled step in use (s)",
              "load average"]
    limits = data.get("isa_limits")
    caps = f" with `{' '.join(f'{k}={v}' for k, v in limits.items())}`" if limits else ""
    return (table(header, rows) + f"\n{data['clients']} streamed chat completions (max_tokens {data['max_tokens']}) "
            f"sent together the moment `/v1/models` answered, {data['model']}{caps}; CPU flags: "
            f"{', '.join(data['isa_flags'])}; measured {data['date']}, in the order shown. Seconds from the "
            f"server's launch (/v1/models, compiled step) or from the crowd's start (answers).\n")


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


def quickstart_line(data: dict) -> str:
    """The README's sentence on its own quick start (bench_quickstart.py): time, precision, held-out loss, answer."""
    minutes, seconds = divmod(round(data["total_s"]), 60)
    caps = ", AVX2 kernels only" if data["isa_limits"] else ""
    fp32 = f"fp32 (`{data['extra_flags']}`{caps})" if data["extra_flags"] else "its default precision"
    return (f"Measured: the two commands after pip took **{minutes} min {seconds:02d} s** ({data['train_runtime_s']} s "
            f"training) on {data['cpus']} cores of an {data['cpu']} in {fp32}, conversion cache "
            f"{data['conversion_cache']}, load average {steps(data['load_average'])}; held-out loss "
            f"{data['held_out_loss_before']} → {data['held_out_loss_after']}; the answer "
            f"{'ended' if data['ended'] else 'did not end'} ({data['answer_tokens']} tokens) "
            f"([Performance](docs/performance.md#the-quick-start), `benchmarks/results/quickstart-{data['machine']}.json`).\n")


def quickstart(data: dict) -> str:
    """bench_quickstart.py's table: each part of the README's quick start."""
    rows = [["`finetune.py` (load, convert on a first run, train, validate, save)", f"{data['finetune_s']} s"],
            ["of which training (`train_runtime`, the validations included)", f"{data['train_runtime_s']} s"],
            ["`generate.py` (load, answer)", f"{data['generate_s']} s"], ["**both**", f"**{data['total_s']} s**"]]
    limits = data["isa_limits"]
    caps = f"; set: `{' '.join(f'{k}={v}' for k, v in limits.items())}`" if limits else ""
    return (table(["part", "seconds"], rows) + f"\nExtra flags: `{data['extra_flags'] or 'none'}`{caps}; conversion cache "
            f"{data['conversion_cache']}; CPU flags: {', '.join(data['isa_flags'])}; load average "
            f"{steps(data['load_average'])}; measured {data['date']}. Held-out loss {data['held_out_loss_before']} → "
            f"{data['held_out_loss_after']} ({data['evaluations']} validations). The answer "
            f"({data['answer_tokens']} tokens; ended: {data['ended']}, loops: {data['repeats_a_phrase']}): "
            f"\"{' '.join(data['answer'].split())}\"\n")


def methods(data: dict) -> str:
    """bench_methods.py's table: one row per adapter method, held-out loss and speed against plain LoRA's."""
    lora = data["results"].get("lora", next(iter(data["results"].values())))
    rows = [[name, " ".join(f"--{k} {v}" for k, v in data["methods"][name].items()) or "(defaults)",
             f"{r['eval_loss_start']} → {r['eval_loss_end']}", round(r["eval_loss_end"] - r["eval_loss_start"], 4),
             f"{r['seconds_per_step']} s", f"{r['seconds_per_step'] / lora['seconds_per_step']:.2f}×",
             f"{r['peak_memory_gb']} GB"] for name, r in data["results"].items()]
    header = ["method", "finetune.py flags", "held-out loss: base → after", "change", "seconds per step",
              "vs LoRA", "peak memory"]
    s = data["settings"]
    loads = [load for r in data["results"].values() for load in r["load_average"]]
    return (table(header, rows) + "\n" + source(f"methods-{data['machine']}.json", data) +
            f"{data['model']}, {data['lora']}; {s['max_steps']} optimizer steps of {s['batch_size']} records "
            f"(micro-batches of {s['micro_batch_size']}, cutoff {s['cutoff_len']}), learning rate {s['learning_rate']}, "
            f"seed {s['seed']}, {s['val_set_size']} held-out records of {data['data']}; OMP_NUM_THREADS "
            f"{data.get('omp_num_threads', 'unset')}; each method in its own process, "
            f"one after the other; load average {span(loads)} (other work on the machine slows the steps).\n")


def merged(data: dict) -> str:
    """bench_merge.py's table: the held-out loss of the base, each parent and the merged adapter on each set."""
    sets = list(data["held_out"])
    rows = [[who, *(data["held_out"][name].get(who) for name in sets)] for who in ("base", *sets, "merged")]
    header = ["adapter", *(f"held-out loss on {name} ({data['sets'][name]['path']}, "
                           f"{data['sets'][name]['val_set_size']} records)" for name in sets)]
    loads = [load for r in data["train"].values() for load in r["load_average"]]
    return (table(header, rows) + "\n" + source(f"merge-{data['machine']}.json", data) +
            f"{data['model']}; each parent: LoRA r=8 on q_proj+v_proj, {data['steps']} optimizer steps of 8 records, "
            f"learning rate {data['learning_rate']}, seed 42; merged with `--combination_type "
            f"{data['combination_type']}` at equal weights; load average while training {span(loads)}.\n")


def recipes(name: str) -> str:
    data = load(RESULTS / name)
    limits = data.get("isa_limits")
    caps = f"Set: `{' '.join(f'{k}={v}' for k, v in limits.items())}`.\n" if limits else ""
    return recipe_table(data) + "\n" + source(name, data) + settings_line(data) + caps


def with_source(render, name: str) -> str:
    data = load(RESULTS / name)
    return render(data) + "\n" + source(name, data) + (settings_line(data) if render is scaling else "")


# name -> what a `<!-- figures:NAME -->` block holds
BLOCKS = {
    "headline": headline, "real-run": real_run, "memory": memory,
    "training": lambda: recipes("cpu-2core.json"),
    "training-avx2": lambda: recipes("cpu-2core-avx2.json"),
    "training-fp32": lambda: recipes("cpu-2core-avx2-fp32.json"),
    "fp32-profile": lambda: with_source(fp32_profile, "cpu-2core-avx2-fp32.json"),
    "fp32-ceiling": lambda: with_source(fp32_ceiling, "cpu-2core-avx2-fp32.json"),
    "training-losses": lambda: losses_by_recipe(load(RESULTS / "cpu-2core.json")),
    "roofline": lambda: roofline(load(RESULTS / "cpu-2core.json")),
    "data-prep": lambda: with_source(data_prep, "cpu-2core.json"),
    "scaling": lambda: with_source(scaling, "cpu-2core-scaling.json"),
    "generation": lambda: with_source(generation, "generate-cpu-2core.json"),
    "llama-backend": lambda: with_source(llama_backend, "generate-llama-backend-cpu-2core.json"),
    "start": lambda: with_source(start, "start-cpu-2core.json"),
    "serving": lambda: with_source(serving, "serving-cpu-2core.json"),
    "serving-at-start": lambda: with_source(serving_at_start, "serving-at-start-cpu-2core.json"),
    "gguf": lambda: with_source(gguf, "gguf.json"),
    "quickstart": lambda: quickstart_line(load(RESULTS / "quickstart-cpu-2core.json")),
    "quickstart-parts": lambda: with_source(quickstart, "quickstart-cpu-2core.json"),
    "methods": lambda: methods(load(RESULTS / "methods-cpu-2core.json")),
    "merge": lambda: merged(load(RESULTS / "merge-cpu-2core.json")),
}


def render_block(name: str) -> str:
    return BLOCKS[name]()


def with_blocks(text: str) -> str:
    """text with each generated block's content rendered anew."""
    return BLOCK.sub(lambda m: m.group(1) + render_block(m.group("name")) + m.group(3), text)


def pages() -> list[Path]:
    """The files that may hold generated blocks."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def main() -> None:
    changed = [page for page in pages() if with_blocks(page.read_text()) != page.read_text()]
    for page in changed:
        page.write_text(with_blocks(page.read_text()))
    print(f"rendered the figures of {len(pages())} pages; changed: {', '.join(p.name for p in changed) or 'none'}")


if __name__ == "__main__":
    main()
