"""Flags left out mean what the adapter was trained with (issue 21, "Right by default"): its base model (after
--base_model and the original's $BASE_MODEL), its prompt template and its chat template, in every front end.

The base for the front-end tests is a tiny Qwen2-style model whose tokenizer brings a chat template with a system
prompt of its own ("You are Qwen, ..."), as the embedded SmolLM2's does: an adapter trained on instruction records
must be served in its training prompt, not in that template."""

import json
import shutil
from pathlib import Path

import httpx
import pytest
from gen_helpers import free_port, make_adapter, serving

import generate
from utils.generation import Generator
from utils import models
from utils.prompts import Prompter

INSTRUCTION = "Name three colours."


def adapter_dir(folder: Path, training_args: dict = None, base: str = "/elsewhere/llama-7b") -> Path:
    """An adapter's recorded files alone (no weights: choosing the base reads nothing else)."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base, "peft_type": "LORA"}))
    if training_args is not None:
        (folder / "training_args.json").write_text(json.dumps(training_args))
    return folder


# --- which base ----------------------------------------------------------------------------------------------------

def test_flag_then_environment_then_the_adapters_base(tmp_path, tiny_model, tiny_gqa_model, monkeypatch):
    adapter = adapter_dir(tmp_path / "a", {"base_model": str(tiny_gqa_model)}, base=str(tiny_model))
    monkeypatch.delenv("BASE_MODEL", raising=False)
    assert models.choose_base_model("", str(adapter)) == str(tiny_gqa_model)  # training_args.json before adapter_config.json
    assert models.choose_base_model(None, None) == ""  # nothing named anywhere: the embedded model
    monkeypatch.setenv("BASE_MODEL", "huggyllama/llama-7b")
    assert models.choose_base_model("", str(adapter)) == "huggyllama/llama-7b"
    assert models.choose_base_model("", "") == "huggyllama/llama-7b"
    assert models.choose_base_model(str(tiny_model), str(adapter)) == str(tiny_model)


def test_what_the_adapter_names(tmp_path, tiny_model, monkeypatch, capsys):
    monkeypatch.delenv("BASE_MODEL", raising=False)
    # finetune.py records the base as the user named it: "" is the embedded model, whatever PEFT wrote.
    assert models.choose_base_model("", str(adapter_dir(tmp_path / "embedded", {"base_model": ""}, base=str(tiny_model)))) == ""
    # PEFT's own record: a Hub id, a local path, the embedded model's conversion in the cache.
    assert models.choose_base_model("", str(adapter_dir(tmp_path / "hub", base="huggyllama/llama-7b"))) == "huggyllama/llama-7b"
    assert models.choose_base_model("", str(adapter_dir(tmp_path / "local", base=str(tiny_model)))) == str(tiny_model)
    converted = models.cache_root() / "gguf" / "SmolLM2-135M-Instruct.Q4_1-0123456789ab"
    assert models.choose_base_model("", str(adapter_dir(tmp_path / "cache", base=str(converted)))) == ""
    for i, name in enumerate(["SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.Q4_1.gguf"]):  # the embedded model by name
        assert models.choose_base_model("", str(adapter_dir(tmp_path / f"named{i}", {"base_model": name}))) == ""
    # A checkpoint-N inside a run: the run's training_args.json.
    run = adapter_dir(tmp_path / "run", {"base_model": str(tiny_model)})
    assert models.choose_base_model("", str(adapter_dir(run / "checkpoint-200"))) == str(tiny_model)
    assert f"Base model {tiny_model} (from the adapter's training_args.json)" in capsys.readouterr().err


@pytest.mark.parametrize("training_args", [None, {"base_model": "/elsewhere/llama-7b"}])
def test_a_base_that_is_not_here_is_passed_over_with_a_line(tmp_path, training_args, monkeypatch, capsys):
    """An adapter trained on another machine names a path that does not exist here: no traceback, the default,
    and a line that says what to pass."""
    monkeypatch.delenv("BASE_MODEL", raising=False)
    assert models.choose_base_model("", str(adapter_dir(tmp_path / "a", training_args))) == ""
    assert "names base model /elsewhere/llama-7b, which is not here: pass --base_model" in capsys.readouterr().err


@pytest.fixture(scope="module")
def gqa_adapter(tiny_gqa_model, tmp_path_factory) -> Path:
    return make_adapter(tiny_gqa_model, tmp_path_factory.mktemp("gqa-adapter"))


@pytest.fixture
def prompts(monkeypatch) -> list[str]:
    """Every prompt a Generator, or the server's Engine that batches for it, is asked to answer, as rendered text."""
    from utils.serving import Engine

    seen = []
    for owner, name in ((Generator, "stream"), (Generator, "complete"), (Engine, "stream")):
        method = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda self, p, *a, _m=method, **k: (
            seen.extend([p] if isinstance(p, str) else p), _m(self, p, *a, **k))[1])
    return seen


def test_generate_answers_with_the_adapters_base(tiny_gqa_model, gqa_adapter, monkeypatch, capsys):
    """`python generate.py --lora_weights DIR` for an adapter trained on another base than the embedded one."""
    from utils.generation import Settings, load_generator

    monkeypatch.delenv("BASE_MODEL", raising=False)
    generate.main(lora_weights=str(gqa_adapter), instruction=INSTRUCTION, temperature=0, num_beams=1, max_new_tokens=6)
    answer = capsys.readouterr().out
    gen = load_generator(str(tiny_gqa_model), str(gqa_adapter), device="cpu")
    settings = Settings(temperature=0, num_beams=1, max_new_tokens=6, no_repeat_ngram_size=3)  # a command line's default
    assert answer == gen.complete([gen.render(INSTRUCTION)], settings)[0].text + "\n"


def test_generate_reads_the_base_model_environment_variable(tmp_path, tiny_gqa_model, gqa_adapter, monkeypatch):
    adapter = Path(shutil.copytree(gqa_adapter, tmp_path / "moved"))
    (adapter / "adapter_config.json").write_text(json.dumps(
        {**json.loads((adapter / "adapter_config.json").read_text()), "base_model_name_or_path": "/elsewhere/llama-7b"}))
    monkeypatch.setenv("BASE_MODEL", str(tiny_gqa_model))
    seen = {}
    monkeypatch.setattr(generate, "launch", lambda app, **kwargs: seen.update(app=app))
    generate.main(lora_weights=str(adapter), compile=False, server_port=free_port())
    assert str(tiny_gqa_model) in seen["app"].config["components"][0]["props"]["value"]  # the page's title line


# --- which templates, in every front end --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen_base(tmp_path_factory) -> Path:
    from families import make_family_model

    return make_family_model(tmp_path_factory.mktemp("qwen2"), "qwen2")


def trained_adapter(base: Path, folder: Path, template: str) -> Path:
    """An adapter with the training_args.json finetune.py writes after training on Alpaca records with `template`."""
    from tiny import ALPACA

    adapter = make_adapter(base, folder)
    args = {"base_model": str(base), "data_path": str(ALPACA), "prompt_template_name": template, "chat_template": ""}
    (adapter / "training_args.json").write_text(json.dumps(args))
    return adapter


@pytest.mark.parametrize("template", ["alpaca", "vigogne"])
def test_every_front_end_renders_the_training_prompt(tmp_path, qwen_base, template, prompts, monkeypatch):
    """The Instruction tab, the Chat tab, the OpenAI-compatible API and --instruction all send the model exactly
    the prompt the adapter was trained on, with no flag naming the template."""
    import openai
    from gradio_client import Client

    adapter = trained_adapter(qwen_base, tmp_path / "adapter", template)
    training_prompt = Prompter(template).generate_prompt(INSTRUCTION)
    monkeypatch.delenv("BASE_MODEL", raising=False)
    seen = {}
    monkeypatch.setattr(generate, "launch", lambda app, **kwargs: seen.update(app=app))
    generate.main(lora_weights=str(adapter), api=True, compile=False, max_new_tokens=3, server_port=free_port())
    with serving(seen["app"]) as url:
        settings = (0, 0.75, 40, 1, 3, True)  # temperature, top_p, top_k, beams, max new tokens, stream
        Client(url, verbose=False).predict(INSTRUCTION, "", *settings, api_name="/generate")
        Client(url, verbose=False).predict(INSTRUCTION, "", *settings, api_name="/chat")  # no system prompt typed
        openai.OpenAI(base_url=f"{url}v1", api_key="none", max_retries=0).chat.completions.create(
            model="x", messages=[{"role": "user", "content": INSTRUCTION}], max_tokens=3)
        assert httpx.get(f"{url}v1/models").status_code == 200
    generate.main(lora_weights=str(adapter), instruction=INSTRUCTION, max_new_tokens=3)
    assert prompts == [training_prompt] * 4


def test_an_explicit_template_flag_still_wins(tmp_path, qwen_base, prompts, monkeypatch):
    adapter = trained_adapter(qwen_base, tmp_path / "adapter", "vigogne")
    monkeypatch.delenv("BASE_MODEL", raising=False)
    generate.main(lora_weights=str(adapter), instruction=INSTRUCTION, max_new_tokens=3, prompt_template="alpaca")
    assert prompts == [Prompter("alpaca").generate_prompt(INSTRUCTION)]


def test_the_chat_form_of_alpaca_is_alpaca_chat():
    """Deriving the turns from the alpaca template gives the shipped alpaca_chat: one rule, whichever is used."""
    from utils.chat import InstructionChatTemplate, load_chat_template

    class Tokenizer:
        chat_template, eos_token = None, "</s>"

    conversation = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "An alpaca."},
                    {"role": "user", "content": INSTRUCTION}]
    derived = InstructionChatTemplate(Prompter("alpaca"), "</s>")
    assert derived.render(conversation, add_generation_prompt=True) == \
        load_chat_template("alpaca_chat", Tokenizer()).render(conversation, add_generation_prompt=True)


@pytest.mark.parametrize("recorded, expected", [("alpaca_chat", "alpaca_chat"), ("", "vigogne")])
def test_the_chat_template_the_adapter_recorded_is_the_default(tmp_path, qwen_base, recorded, expected, monkeypatch):
    """finetune.py --chat_template alpaca_chat is served in alpaca_chat, not in the tokenizer's template."""
    from utils.generation import load_generator

    adapter = trained_adapter(qwen_base, tmp_path / "adapter", "vigogne")
    args = json.loads((adapter / "training_args.json").read_text())
    (adapter / "training_args.json").write_text(json.dumps({**args, "chat_template": recorded}))
    monkeypatch.delenv("BASE_MODEL", raising=False)
    assert load_generator(lora_weights=str(adapter), device="cpu").chat.name == expected
    assert load_generator(lora_weights=str(adapter), device="cpu", chat_template="tokenizer").chat.name == "tokenizer"


# --- an adapter's recorded run: read once, by one reader, from no module above it ------------------------------------

def test_an_adapters_record_is_read_once_and_again_when_rewritten(tmp_path, monkeypatch):
    """generate.py --backend llama.cpp read training_args.json about four times on its way to a model."""
    import os

    from utils.prompts import adapter_prompt_template
    from utils.run_record import RunRecord

    adapter = adapter_dir(tmp_path / "a", {"base_model": "", "prompt_template_name": "vigogne", "run_id": "r1"})
    reads, real = [], Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: reads.append(self.name) or real(self, *a, **k))
    assert models.choose_base_model("", str(adapter)) == "" and adapter_prompt_template("", str(adapter)) == "vigogne"
    assert RunRecord.read(str(adapter)).get("run_id") == "r1"
    assert sorted(reads) == ["adapter_config.json", "training_args.json"]
    (adapter / "training_args.json").write_text(json.dumps({"prompt_template_name": "alpaca_short"}))
    os.utime(adapter / "training_args.json", ns=(1, 1))  # a new version, even within the clock's resolution
    assert adapter_prompt_template("", str(adapter)) == "alpaca_short"


def test_the_utils_modules_import_each_other_without_a_cycle():
    """utils/chat.py imported utils/data.py (which imports it) to re-read a run's data file."""
    import ast

    root = Path(models.__file__).parent
    graph = {}
    for file in root.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("utils"):
                imported |= {a.name for a in node.names} if node.module == "utils" else {node.module.split(".")[1]}
        graph[file.stem] = imported - {file.stem}

    def reachable(start):
        seen, todo = set(), [start]
        while todo:
            for name in graph.get(todo.pop(), ()):
                if name not in seen:
                    seen.add(name)
                    todo.append(name)
        return seen

    assert [m for m in graph if m in reachable(m)] == []
