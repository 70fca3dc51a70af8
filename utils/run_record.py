"""What a finetune.py run recorded about itself, read in one place: its training_args.json (base, templates, data,
LoRA settings, run id) and its adapter_config.json, for an adapter directory or a checkpoint-N inside a run.

Every reader (the base model's rule, the prompt and chat templates, evaluation's defaults) asks `RunRecord.read`;
it reads the files once per version of them, so one script run opens an adapter's record once however many
modules ask.
"""

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from utils.cli import UserError

RECORD = "training_args.json"


@dataclass(frozen=True)
class RunRecord:
    """An adapter's recorded run; `arguments` is {} for an adapter not trained by finetune.py (or not downloaded)."""

    arguments: dict = field(default_factory=dict)
    adapter_config: dict = field(default_factory=dict)

    @staticmethod
    def read(lora_weights: Optional[str]) -> "RunRecord":
        """The record of a local adapter (its folder, or the run folder around a checkpoint-N); empty otherwise."""
        folder = Path(lora_weights or "").expanduser()
        if not lora_weights or not folder.is_dir():
            return RunRecord()
        files = [f / RECORD for f in (folder, folder.parent)] + [folder / "adapter_config.json"]
        return read_files(*(str(f) for f in files), *(version(f) for f in files))

    @property
    def base_model(self) -> Optional[str]:
        """The base as the run named it ("" the embedded model), else as the adapter's config does; None: unknown."""
        if "base_model" in self.arguments:
            return str(self.arguments["base_model"] or "")
        return str(self.adapter_config.get("base_model_name_or_path") or "") or None

    @property
    def conversations(self) -> bool:
        """Whether the run trained on conversations (it records the chat template it rendered them with)."""
        return bool(self.arguments.get("conversations") or self.arguments.get("chat_template"))

    def get(self, key: str, default=None):
        return self.arguments.get(key, default)


def version(path: Path) -> int:
    return path.stat().st_mtime_ns if path.is_file() else 0


@functools.lru_cache(maxsize=32)
def read_files(run_args: str, parent_args: str, adapter_config: str, *versions: int) -> RunRecord:
    """The files parsed; cached by their paths and modification times (`versions`), so a rewrite is read anew."""
    arguments = next((load(Path(p)) for p in (run_args, parent_args) if Path(p).is_file()), {})
    config = load(Path(adapter_config)) if Path(adapter_config).is_file() else {}
    return RunRecord(arguments, config)


def load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}): repair it or delete it") from None
