"""What training did, in files: metrics.json and loss_curve.png in the output dir, tokens/s in the log."""

import json
import math
import time
from pathlib import Path

from transformers import TrainerCallback

from utils import durable
from utils.cli import UserError, is_main_process


def loss_series(log_history: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """(step, loss) pairs for training and validation from the Trainer's log history, one per step: a resumed
    run validates again at the step it resumes from (eval_on_start), which repeats that step's figure."""
    def by_step(key):
        return sorted({h["step"]: h[key] for h in log_history if key in h}.items())

    return {"train": by_step("loss"), "validation": by_step("eval_loss")}


def summarize(log_history: list[dict], final: dict) -> dict:
    """metrics.json: the final figures, validation loss before/after with perplexity, and the full history."""
    series = loss_series(log_history)
    summary = dict(final)
    if series["validation"]:
        first, last = series["validation"][0][1], series["validation"][-1][1]
        best = min(loss for _, loss in series["validation"])
        summary.update(
            eval_loss_first=first, eval_loss_last=last, eval_loss_best=best,
            perplexity_first=math.exp(first), perplexity_best=math.exp(best),
        )
    summary["log_history"] = log_history
    return summary


def plot_loss_curve(log_history: list[dict], path: Path, title: str = "") -> None:
    """Training and validation loss against optimizer steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    series = loss_series(log_history)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for name in ("train", "validation"):
        if series[name]:
            steps, losses = zip(*series[name])
            # Points as well as lines: a short run logs a handful of steps, and a single point draws no line.
            marker = "o" if name == "validation" or len(steps) <= 30 else None
            ax.plot(steps, losses, "-", marker=marker, label=f"{name} loss", markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title or "LoRA fine-tuning")
    ax.grid(alpha=0.3)
    if any(series.values()):  # a run too short to log a loss draws empty axes, without an empty legend's warning
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_reports(log_history: list[dict], final: dict, output_dir: Path, title: str = "") -> None:
    """metrics.json and loss_curve.png, each replaced durably (utils.durable)."""
    output_dir = Path(output_dir)
    durable.write_text(output_dir / "metrics.json", json.dumps(summarize(log_history, final), indent=2))
    with durable.durable_file(output_dir / "loss_curve.png") as tmp:
        plot_loss_curve(log_history, tmp, title)


class ProgressReport(TrainerCallback):
    """Adds real (non-padding) tokens/s to each log line and refreshes the reports at every checkpoint,
    so an interrupted run still leaves its curve; a resumed run continues it (the history is restored)."""

    def __init__(self, output_dir: Path):
        self.output_dir = Path(output_dir)
        self.last = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        if self.last is not None and now > self.last[0]:
            speed = round((tokens - self.last[1]) / (now - self.last[0]), 1)
            logs["tokens_per_second"] = speed  # printed with the log line
            state.log_history[-1]["tokens_per_second"] = speed  # the Trainer stored a copy of logs before this call
        self.last = (now, tokens)

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = (time.perf_counter(), state.num_input_tokens_seen)

    on_evaluate = on_train_begin  # the clock restarts after validation: its time is not training speed

    def on_save(self, args, state, control, **kwargs):
        if is_main_process():
            write_reports(state.log_history, {"global_step": state.global_step}, self.output_dir)


class LossGuard(TrainerCallback):
    """Stop at once when the loss turns NaN/inf or sits at exactly 0: the original's fp16 + 8-bit failure."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if loss is not None and (not math.isfinite(loss) or loss == 0.0):
            raise UserError(
                f"training loss is {loss} at step {state.global_step}: the run diverged. Try a lower --learning_rate, "
                "bf16 or fp32 instead of fp16 (--quantization none on GPUs without bf16), or check the data for empty outputs"
            )
