"""Did it help? The adapter methods (LoRA, DoRA, rsLoRA at a high rank, PiSSA, LoRA+) trained by finetune.py on the
same records, steps and seed: held-out loss, seconds per optimizer step and peak memory.

    python benchmarks/bench_methods.py            # CPU: the embedded SmolLM2-135M (about 10 minutes on 2 cores)
    python benchmarks/bench_methods.py --smoke    # seconds: every method for 2 steps on a tiny random model

Each method runs finetune.train (the CLI's own path) in a fresh process, so that peak memory (the process's
maximum resident set) is its own; the held-out loss is the Trainer's on the run's validation records, at step 0
(the base) and after the last step. Seconds per step: the median optimizer step, validation excluded. A short run
on a small model says which method moves the held-out loss fastest at these settings, not which is best after a
full run. Writes benchmarks/results/methods-<machine>.json.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, machine, smoke_model, with_load, write
from utils.cli import UserError, run

# name -> finetune.py flags beyond the shared ones. rsLoRA at r=64 keeps LoRA r=8's scale (16/sqrt(64) = 16/8);
# plain LoRA at r=64 (scale 16/64) is what rsLoRA fixes.
METHODS = {
    "lora": dict(),
    "dora": dict(use_dora=True),
    "rslora-r64": dict(use_rslora=True, lora_r=64),
    "lora-r64": dict(lora_r=64),
    "pissa": dict(init_lora_weights="pissa"),
    "loraplus": dict(loraplus_lr_ratio=16),
}


def run_method(flags: dict) -> dict:
    """finetune.train with `flags`, each optimizer step timed (validation excluded); in the child process."""
    from transformers import TrainerCallback

    import finetune

    steps, build = [], finetune.build_trainer

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            steps.append(-time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            steps[-1] += time.perf_counter()

    def timed_trainer(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.add_callback(StepClock())
        return trainer

    finetune.build_trainer = timed_trainer
    finetune.train(**flags)
    metrics = json.loads((Path(flags["output_dir"]) / "metrics.json").read_text())
    evals = [h["eval_loss"] for h in metrics["log_history"] if "eval_loss" in h]
    return dict(eval_loss_start=round(evals[0], 4), eval_loss_end=round(evals[-1], 4),
                train_losses=[round(h["loss"], 4) for h in metrics["log_history"] if "loss" in h],
                seconds_per_step=round(statistics.median(steps[1:] or steps), 2), first_step_s=round(steps[0], 2),
                peak_memory_gb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2))


def in_subprocess(flags: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--_flags", json.dumps(flags)], capture_output=True, text=True,
                          cwd=REPO)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
    raise SystemExit(f"{flags['output_dir']} failed (exit {proc.returncode}):\n{tail}")


def main(methods: str = "", steps: int = 10, batch_size: int = 8, micro_batch_size: int = 4, cutoff_len: int = 256,
         val_set_size: int = 48, learning_rate: float = 1e-3, smoke: bool = False, output: str = "", _flags: str = ""):
    """Train each adapter method the same way and write held-out loss, seconds per step and peak memory as JSON.

    Args:
        methods: Comma-separated names (lora, dora, rslora-r64, lora-r64, pissa, loraplus); default: all.
        steps: Optimizer steps per method.
        batch_size: Records per optimizer step.
        micro_batch_size: Records per forward pass.
        cutoff_len: Maximum tokens per record.
        val_set_size: Held-out records the loss is measured on.
        learning_rate: For every method (LoRA+ multiplies lora_B's by its ratio).
        smoke: A tiny random model with the embedded tokenizer, 2 steps, 8 held-out records: the code path in seconds.
        output: The JSON file to write; default: benchmarks/results/methods-<machine>.json.
    """
    from utils.checks import check_values

    names = methods.split(",") if methods else list(METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(METHODS)}")
    check_values(dict(max_steps=steps, batch_size=batch_size, micro_batch_size=micro_batch_size, cutoff_len=cutoff_len,
                      val_set_size=val_set_size, learning_rate=learning_rate))
    if _flags:  # the child process
        print("RESULT " + json.dumps(run_method(json.loads(_flags))), flush=True)
        return
    if smoke:
        steps, val_set_size = 2, 8
    shared = dict(base_model=smoke_model() if smoke else "", max_steps=steps, batch_size=batch_size,
                  micro_batch_size=micro_batch_size, cutoff_len=cutoff_len, val_set_size=val_set_size,
                  learning_rate=learning_rate, warmup_steps=0, save_steps=steps, logging_steps=1, seed=42)
    report = dict(machine("machine", "cpu", "isa_flags", "cpus", "date"), model="tiny random LLaMA" if smoke
                  else "SmolLM2-135M (embedded)", data="data/alpaca_en_demo.json",
                  settings={k: v for k, v in shared.items() if k != "base_model"},
                  lora="r=8 unless named, alpha=16, dropout=0.05, q_proj+v_proj", methods={k: METHODS[k] for k in names},
                  omp_num_threads=os.environ.get("OMP_NUM_THREADS", "torch's default"),
                  results={})
    output = Path(output or REPO / "benchmarks" / "results" / f"methods-{report['machine']}.json")
    with tempfile.TemporaryDirectory(prefix="bench-methods-") as work:
        for name in names:
            flags = dict(shared, **METHODS[name], output_dir=str(Path(work) / name))
            r = report["results"][name] = with_load(lambda: in_subprocess(flags))
            print(f"{name}: held-out loss {r['eval_loss_start']} -> {r['eval_loss_end']}, {r['seconds_per_step']} s "
                  f"per step, peak {r['peak_memory_gb']} GB, load {r['load_average']}", flush=True)
            write(output, report)
    print(f"wrote {output}")


if __name__ == "__main__":
    run(main)
