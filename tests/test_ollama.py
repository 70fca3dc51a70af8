"""The Modelfile beside a GGUF export: its TEMPLATE, rendered as Ollama renders it (a small interpreter of the Go
template subset it uses, below), gives exactly the text the project's template gives for a two-turn conversation,
Ollama's SYSTEM standing in for the system turn the conversation lacks."""

import re

import pytest

from families import make_family_model
from utils.chat import load_chat_template
from utils.models import load_tokenizer
from utils.ollama import modelfile

CONVERSATION = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am an alpaca."},
                {"role": "user", "content": "Where do you live?"}]


def render_go(template: str, messages: list[dict]) -> str:
    """Go's text/template for `{{ range .Messages }}`, `{{ if/else if eq .Role "x" }}`, `{{ .Content }}`, `{{ end }}`."""
    pieces = re.split(r"{{\s*(.*?)\s*}}", template)  # text, action, text, action, ...
    out, blocks = [], []  # blocks: [kind, where it starts, is its text written, range: message index | if: taken]
    i = 0
    while i < len(pieces):
        active = all(block[2] for block in blocks)
        action = pieces[i]
        message = next((messages[b[3]] for b in reversed(blocks) if b[0] == "range"), None)
        if i % 2 == 0 or action == ".Content":
            out.append((action if i % 2 == 0 else message["content"]) if active else "")
        elif action == "range .Messages":
            blocks.append(["range", i, bool(messages), 0])
        elif action.startswith(("if eq .Role", "else if eq .Role")):
            taken = action.startswith("else") and blocks[-1][3]
            chosen = not taken and message["role"] == action.split('"')[1]
            if action.startswith("else"):
                blocks[-1][2:] = [chosen, taken or chosen]
            else:
                blocks.append(["if", i, chosen, chosen])
        elif action == "end":
            kind, begin, _, index = blocks.pop()
            if kind == "range" and index + 1 < len(messages):
                blocks.append(["range", begin, True, index + 1])
                i = begin
        else:
            raise AssertionError(f"not plain Ollama template syntax this test knows: {{{{ {action} }}}}")
        i += 1
    return "".join(out)


def parse(text: str) -> dict:
    """The Modelfile's instructions: FROM, TEMPLATE, SYSTEM (triple-quoted) and the stop PARAMETERs."""
    fields = dict(re.findall(r'^(TEMPLATE|SYSTEM) """(.*?)"""$', text, re.M | re.S))
    fields["FROM"] = re.search(r"^FROM (.+)$", text, re.M).group(1)
    fields["stop"] = re.findall(r'^PARAMETER stop "(.*)"$', text, re.M)
    return fields


def check(tokenizer, chat) -> dict:
    fields = parse(modelfile("model.gguf", chat, tokenizer.eos_token))
    system = [{"role": "system", "content": fields["SYSTEM"]}] if "SYSTEM" in fields else []
    assert render_go(fields["TEMPLATE"], system + CONVERSATION) == chat.render(CONVERSATION, add_generation_prompt=True)
    assert fields["FROM"] == "./model.gguf" and tokenizer.eos_token in fields["stop"]
    return fields


def test_alpaca_adapter(tiny_model):
    """An adapter trained on instructions with the alpaca template chats in alpaca_chat, its first exchange."""
    tokenizer = load_tokenizer(str(tiny_model))
    fields = check(tokenizer, load_chat_template("alpaca_chat", tokenizer))
    assert fields["SYSTEM"].startswith("Below is an instruction") and "### Instruction:" in fields["stop"]


def test_the_embedded_model_own_template(embedded_model):
    tokenizer = load_tokenizer(embedded_model)
    fields = check(tokenizer, load_chat_template("tokenizer", tokenizer))
    assert fields["SYSTEM"].startswith("You are a helpful AI assistant named SmolLM")


@pytest.mark.parametrize("name", ["llama3", "qwen2", "gemma3"])
def test_family_templates(tmp_path, name):
    tokenizer = load_tokenizer(str(make_family_model(tmp_path, name)))
    check(tokenizer, load_chat_template("tokenizer", tokenizer))


def test_the_renderer_can_fail():
    template = '{{ range .Messages }}{{ if eq .Role "user" }}U:{{ .Content }}{{ else if eq .Role "assistant" }}A:{{ .Content }}{{ end }}{{ end }}'
    assert render_go(template, CONVERSATION) == "U:Who are you?A:I am an alpaca.U:Where do you live?"
    with pytest.raises(AssertionError):
        render_go("{{ .Prompt }}", CONVERSATION)


def adapter_record(folder, **training_args):
    """An adapter folder's training_args.json as finetune.py writes it (the Modelfile reads nothing else of it)."""
    import json

    folder.mkdir(parents=True)
    (folder / "training_args.json").write_text(json.dumps(training_args))
    return folder


@pytest.fixture(scope="module")
def qwen_tokenizer(tmp_path_factory):
    """A tokenizer with a chat template and a system prompt of its own, as the embedded SmolLM2's."""
    return load_tokenizer(str(make_family_model(tmp_path_factory.mktemp("qwen2"), "qwen2")))


def served_prompt(tmp_path, adapter, tokenizer, message: str) -> str:
    """What Ollama sends the model for one user message: the Modelfile's TEMPLATE over SYSTEM and the message."""
    from utils.ollama import write_modelfile

    fields = parse(write_modelfile(tmp_path / "model.gguf", str(adapter), tokenizer).read_text())
    system = [{"role": "system", "content": fields["SYSTEM"]}] if "SYSTEM" in fields else []
    return render_go(fields["TEMPLATE"], system + [{"role": "user", "content": message}])


@pytest.mark.parametrize("template", ["alpaca", "vigogne", "alpaca_short", "alpaca_legacy"])
@pytest.mark.parametrize("where", [".", "checkpoint-200"])
def test_an_instruction_adapter_is_served_in_its_training_prompt(tmp_path, qwen_tokenizer, template, where):
    """Every instruction template (not only alpaca, which has a shipped alpaca_chat), and for a checkpoint inside the
    run too (its training_args.json is the run's)."""
    from tiny import ALPACA
    from utils.prompts import Prompter

    run = adapter_record(tmp_path / "run", data_path=str(ALPACA), prompt_template_name=template, chat_template="")
    adapter = run / where
    adapter.mkdir(exist_ok=True)
    message = "Name three colours."
    assert served_prompt(tmp_path, adapter, qwen_tokenizer, message) == Prompter(template).generate_prompt(message)


def test_a_conversation_adapter_trained_in_the_tokenizers_template_keeps_it(tmp_path, qwen_tokenizer):
    """Conversations trained with finetune.py's default chat template (the tokenizer's) record chat_template "" and
    conversations true: the Modelfile renders the tokenizer's template, not an instruction template's."""
    from tiny import REPO

    data = REPO / "data" / "fastchat_dummy_conversation.json"
    adapter = adapter_record(tmp_path / "chat", data_path=str(data), prompt_template_name="alpaca", chat_template="",
                             conversations=True)
    message = "Name three colours."
    expected = load_chat_template("tokenizer", qwen_tokenizer).render([{"role": "user", "content": message}],
                                                                       add_generation_prompt=True)
    assert served_prompt(tmp_path, adapter, qwen_tokenizer, message) == expected
