"""The README's quick start, timed: its first command line exactly as written (the pip installs excepted), read from
README.md so that what is timed is what a newcomer runs.

    python benchmarks/bench_quickstart.py           # a first run: empty conversion cache, fresh folder (minutes)
    python benchmarks/bench_quickstart.py --fp32    # forced fp32 (--bf16 False), as a CPU without native bf16 runs it

Each python command runs in a fresh temporary folder (its ./lora-alpaca lands there) with the conversion cache
($ALPACA_LORA_CACHE) in another, so the GGUF conversion a first run pays is counted. Records the training time
(the Trainer's train_runtime), each command's wall time and the total, the held-out loss before and after, the
answer and whether it ended before the token limit, the CPU, its flags and the load average.
Writes benchmarks/results/quickstart-<machine>.json.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, isa_flags, isa_limits, machine, write
from utils.cli import check_writable, run

def quick_start(readme: Path = REPO / "README.md") -> list[str]:
    """The python commands of the README's first command line (the pip installs are set-up, not the quick start)."""
    line = next(l for l in readme.read_text().splitlines() if l.startswith("pip install -r requirements.txt"))
    return [part.strip() for part in line.split("&&") if part.strip().startswith("python ")]


def timed(command: str, folder: Path, env: dict, extra: list[str]) -> tuple[float, str]:
    """Run one README command (its script from this checkout) in `folder`: seconds and stdout."""
    words = shlex.split(command)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / words[1]), *words[2:], *extra], cwd=folder, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"{command} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def repeats_a_phrase(text: str, words: int = 6) -> bool:
    """Whether some run of `words` words comes back three times or more: an answer stuck in a loop."""
    tokens = re.findall(r"\w+", text.lower())
    grams = [tuple(tokens[i:i + words]) for i in range(len(tokens) - words + 1)]
    return any(grams.count(g) >= 3 for g in set(grams))


def answer_ended(answer: str, adapter: Path, max_new_tokens: int) -> dict:
    """The answer's length in tokens, and whether it ended (stopped short of the limit, not looping)."""
    from transformers import AutoTokenizer

    tokens = len(AutoTokenizer.from_pretrained(adapter)(answer, add_special_tokens=False)["input_ids"])
    loops = repeats_a_phrase(answer)
    return dict(answer_tokens=tokens, repeats_a_phrase=loops, ended=tokens < max_new_tokens - 1 and not loops)


def main(fp32: bool = False, warm_cache: bool = False, folder: str = "", output: str = ""):
    """Time the README's quick start (minus pip) in a fresh folder; write JSON.

    Args:
        fp32: Add --bf16 False to both commands: fp32, what a CPU without native bf16 runs by default.
        warm_cache: Reuse this machine's conversion cache (a second run) instead of an empty one (a first run).
        folder: Where the commands run (./lora-alpaca is written there); default: a fresh temporary folder.
        output: The JSON file to write; default: benchmarks/results/quickstart-<machine>.json.
    """
    path = Path(output or REPO / "benchmarks" / "results" / f"quickstart-{machine('machine')['machine']}.json")
    check_writable(str(path.parent), "output")  # before minutes of training, not after
    if folder:
        check_writable(folder, "folder")
    train, answer = quick_start()
    extra = ["--bf16", "False"] if fp32 else []
    folder = Path(folder or tempfile.mkdtemp(prefix="quickstart-"))
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if not warm_cache:
        env["ALPACA_LORA_CACHE"] = tempfile.mkdtemp(prefix="quickstart-cache-")
    load_before = os.getloadavg()[0]
    train_s, _ = timed(train, folder, env, extra)
    answer_s, printed = timed(answer, folder, env, extra)
    metrics = json.loads((folder / "lora-alpaca" / "metrics.json").read_text())
    report = dict(
        machine("machine", "cpu", "cpus", "date"), isa_flags=isa_flags(),
        isa_limits=isa_limits(), commands=[train, answer],
        extra_flags=" ".join(extra), conversion_cache="reused" if warm_cache else "empty (first run)",
        finetune_s=round(train_s, 1), train_runtime_s=round(metrics["train_runtime"], 1), generate_s=round(answer_s, 1),
        total_s=round(train_s + answer_s, 1), held_out_loss_before=round(metrics["eval_loss_first"], 3),
        held_out_loss_after=round(metrics["eval_loss_last"], 3),
        evaluations=sum("eval_loss" in h for h in metrics["log_history"]), answer=printed.strip(),
        **answer_ended(printed.strip(), folder / "lora-alpaca", 128),
        load_average=[round(load_before, 1), round(os.getloadavg()[0], 1)])
    write(path, report)
    print(json.dumps({k: v for k, v in report.items() if k != "answer"}, indent=1), f"\n{report['answer']}\nwrote {path}")


if __name__ == "__main__":
    run(main)
