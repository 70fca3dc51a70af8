"""Prompt templates (templates/*.json): render prompts and cut the response out of model output."""

import json
import re
from pathlib import Path
from typing import Optional

from utils.cli import UserError

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"
REQUIRED_KEYS = ("prompt_input", "prompt_no_input", "response_split")


def adapter_prompt_template(prompt_template: str, lora_weights: Optional[str]) -> str:
    """--prompt_template when given, else the one the adapter was trained with (its training_args.json), else alpaca."""
    from utils.run_record import RunRecord

    return prompt_template or RunRecord.read(lora_weights).get("prompt_template_name") or "alpaca"


def available_templates() -> list[str]:
    return sorted(p.stem for p in TEMPLATES_DIR.glob("*.json"))


def read_template(template_name: str, kind: str = "prompt template") -> tuple[Path, dict]:
    """A template by name (templates/NAME.json) or .json path, parsed; shared by Prompter and chat templates."""
    path = Path(template_name)
    if path.suffix != ".json":  # a bare name refers to the shipped templates
        path = TEMPLATES_DIR / f"{template_name}.json"
    if not path.is_file():
        raise UserError(
            f"unknown {kind} '{template_name}': choose one of "
            f"{', '.join(available_templates())} or give a path to a .json template"
        )
    try:
        return path, json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"template {path} is not valid JSON: {err}") from None


class Prompter:
    """Renders an Alpaca-style template: `prompt + output` is exactly what the model is trained on."""

    def __init__(self, template_name: str = "alpaca"):
        path, self.template = read_template(template_name)
        missing = [k for k in REQUIRED_KEYS if k not in self.template]
        if missing:
            raise UserError(f"template {path} lacks {', '.join(missing)}; see templates/README.md")
        self.name = path.stem

    def generate_prompt(self, instruction: str, input: Optional[str] = None, label: Optional[str] = None) -> str:
        """The prompt for one record; with `label`, the full training text (prompt + response)."""
        if input:
            prompt = self.template["prompt_input"].format(instruction=instruction, input=input)
        else:
            prompt = self.template["prompt_no_input"].format(instruction=instruction)
        return prompt + (label or "")

    def section_markers(self) -> list[str]:
        """Where the model would start another section of this template: the response marker, then the heading each
        field follows ("### Instruction:", "### Input:" for alpaca): the line before its placeholder, or the text
        before it on its own line."""
        pieces = re.split(r"\{(?:instruction|input)\}", self.template["prompt_input"] + self.template["prompt_no_input"])
        headings = [before.rstrip("\n").rsplit("\n", 1)[-1].strip() for before in pieces[:-1]]
        return list(dict.fromkeys([self.template["response_split"], *filter(None, headings)]))

    def get_response(self, output: str) -> str:
        """The text after the template's response marker (the model's answer alone)."""
        return output.split(self.template["response_split"], 1)[-1].strip()
