"""Prompt templates render and split exactly as templates/README.md documents."""

import json

import pytest

from utils.cli import UserError
from utils.prompts import TEMPLATES_DIR, Prompter, available_templates


def test_shipped_templates():
    assert available_templates() == ["alpaca", "alpaca_chat", "alpaca_legacy", "alpaca_short", "vigogne"]
    for name in available_templates():
        template = json.loads((TEMPLATES_DIR / f"{name}.json").read_text())
        assert {"description", "prompt_input", "prompt_no_input", "response_split"} <= template.keys()


def test_alpaca_renders_exactly():
    p = Prompter("alpaca")
    assert p.generate_prompt("Name a color.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nName a color.\n\n### Response:\n"
    )
    assert p.generate_prompt("Translate.", "Bonjour", "Hello") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request."
        "\n\n### Instruction:\nTranslate.\n\n### Input:\nBonjour\n\n### Response:\nHello"
    )


@pytest.mark.parametrize("name", ["alpaca", "alpaca_legacy", "alpaca_short", "vigogne"])
def test_response_split_round_trips(name):
    p = Prompter(name)
    text = p.generate_prompt("Give {braces} back.", "x", "The answer.")
    assert p.get_response(text) == "The answer."
    assert text.startswith(p.generate_prompt("Give {braces} back.", "x"))


def test_empty_input_uses_no_input_template():
    p = Prompter("alpaca_short")
    assert p.generate_prompt("Hi", "") == "### Instruction:\nHi\n\n### Response:\n"


def test_custom_template_path(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"prompt_input": "Q: {instruction} {input}\nA:", "prompt_no_input": "Q: {instruction}\nA:", "response_split": "A:"}))
    assert Prompter(str(path)).generate_prompt("x") == "Q: x\nA:"


def test_unknown_template_lists_available():
    with pytest.raises(UserError, match="unknown prompt template 'nope': choose one of alpaca, alpaca_chat, alpaca_legacy, alpaca_short, vigogne"):
        Prompter("nope")


def test_template_missing_keys(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"prompt_input": "{instruction}"}))
    with pytest.raises(UserError, match="lacks prompt_no_input, response_split"):
        Prompter(str(path))
