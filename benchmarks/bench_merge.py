"""Two real adapters merged: an English one (the shipped Alpaca sample) and a French one (vigogne's instructions),
each trained by finetune.py on the embedded SmolLM2-135M, merged by merge_adapters.py, and every adapter scored by
evaluate.py on each set's held-out records.

    python benchmarks/bench_merge.py --fr_data /work/shared/data/vigogne_gt_doremiti_instructions_fr.jsonl

Writes benchmarks/results/merge-<machine>.json: the held-out loss of the base, of each parent and of the merged
adapter on both sets (the question: does one merged adapter keep what each parent learned?).
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, machine, with_load, write
from utils.cli import UserError, run


def script(name: str, **flags) -> None:
    """One of the project's scripts, as a user runs it; its last lines if it fails."""
    args = [f"--{k}={v}" for k, v in flags.items()]
    proc = subprocess.run([sys.executable, name, *args], cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n" + "\n".join((proc.stdout + proc.stderr).splitlines()[-15:]))


def held_out(adapter: Path, data: dict, out: Path) -> dict:
    """evaluate.py's held-out loss of the base and of base + adapter on one set's held-out records."""
    script("evaluate.py", lora_weights=adapter, data_path=data["path"], val_set_size=data["val_set_size"], seed=42,
           prompt_template=data["template"], answers=False, output_dir=out)
    losses = json.loads((out / "evaluation.json").read_text())["held_out"]
    return {who: round(losses[who]["loss"], 4) for who in ("base", "adapter")}


def main(fr_data: str = "", steps: int = 8, learning_rate: float = 1e-3, combination_type: str = "cat",
         output: str = ""):
    """Train an English and a French adapter, merge them, score all three on both held-out sets; write JSON.

    Args:
        fr_data: vigogne's gt_doremiti_instructions.jsonl (French, Alpaca format; in /work/shared/data on the build machines).
        steps: Optimizer steps per adapter (8 records each).
        learning_rate: For both adapters.
        combination_type: merge_adapters.py's (cat: the exact average of the two adapters' changes).
        output: The JSON file to write; default: benchmarks/results/merge-<machine>.json.
    """
    if not fr_data or not Path(fr_data).is_file():
        raise UserError(f"--fr_data {fr_data!r} not found: pass vigogne's gt_doremiti_instructions.jsonl")
    sets = {"en": dict(path=str(REPO / "data" / "alpaca_en_demo.json"), val_set_size=16, template="alpaca"),
            "fr": dict(path=fr_data, val_set_size=8, template="vigogne")}
    report = dict(machine("machine", "cpu", "cpus", "date"), model="SmolLM2-135M (embedded)", steps=steps,
                  learning_rate=learning_rate, combination_type=combination_type,
                  sets={k: dict(v, path=Path(v["path"]).name) for k, v in sets.items()}, held_out={})
    output = Path(output or REPO / "benchmarks" / "results" / f"merge-{report['machine']}.json")
    with tempfile.TemporaryDirectory(prefix="bench-merge-") as work:
        adapters = {name: Path(work) / f"lora-{name}" for name in sets}
        for name, data in sets.items():
            report.setdefault("train", {})[name] = with_load(lambda: script(
                "finetune.py", data_path=data["path"], val_set_size=data["val_set_size"], output_dir=adapters[name],
                prompt_template_name=data["template"], max_steps=steps, batch_size=8, micro_batch_size=4,
                learning_rate=learning_rate, warmup_steps=0, save_steps=steps, seed=42) or {})
        adapters["merged"] = Path(work) / "lora-merged"
        script("merge_adapters.py", lora_weights=f"{adapters['en']},{adapters['fr']}", output_dir=adapters["merged"],
               combination_type=combination_type)
        for name, adapter in adapters.items():
            for set_name, data in sets.items():
                scored = held_out(adapter, data, Path(work) / f"eval-{name}-{set_name}")
                report["held_out"].setdefault(set_name, {"base": scored["base"]})[name] = scored["adapter"]
                print(f"{name} on {set_name}: held-out loss {scored['adapter']} (base {scored['base']})", flush=True)
                write(output, report)
    print(f"wrote {output}")


if __name__ == "__main__":
    run(main)
