"""evaluate.py and what training leaves behind, on a tiny random LLaMA (seconds)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate
import finetune
from tiny import REPO
from utils.cli import UserError
from utils.evaluation import DEFAULT_PROMPTS, answers_table, markdown_cell, response_loss

QUICK = dict(batch_size=8, micro_batch_size=4, cutoff_len=128, val_set_size=8, logging_steps=1, save_steps=4,
             warmup_steps=0, learning_rate=1e-2, lora_target_modules="q_proj,k_proj,v_proj,o_proj")


@pytest.fixture(scope="module")
def resumed_run(tiny_model, tmp_path_factory):
    """A run stopped after 4 steps (as an interrupted run would be) and resumed to step 8."""
    data = tmp_path_factory.mktemp("data") / "alpaca.json"
    data.write_text(json.dumps(json.loads((REPO / "data" / "alpaca_en_demo.json").read_text())[:40]))
    out = tmp_path_factory.mktemp("run") / "lora"
    args = dict(QUICK, base_model=str(tiny_model), data_path=str(data), output_dir=str(out))
    finetune.train(**args, max_steps=4)
    first = json.loads((out / "metrics.json").read_text())
    finetune.train(**args, max_steps=8, resume_from_checkpoint=True)
    return out, first


@pytest.fixture(scope="module")
def evaluated(resumed_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    evaluate.main(lora_weights=str(resumed_run[0]), output_dir=str(out), max_new_tokens=6, batch_size=4)
    return out


def test_curve_and_metrics_span_an_interrupted_and_resumed_run(resumed_run):
    out, first = resumed_run
    assert [h["step"] for h in first["log_history"] if "loss" in h] == [1, 2, 3, 4]
    metrics = json.loads((out / "metrics.json").read_text())
    history = metrics["log_history"]
    assert [h["step"] for h in history if "loss" in h] == list(range(1, 9))  # both halves, none repeated
    assert {h["step"] for h in history if "eval_loss" in h} == {0, 4, 8}
    assert metrics["eval_loss_first"] == first["eval_loss_first"]  # still the base model's loss at step 0
    assert metrics["perplexity_best"] == pytest.approx(2.718281828 ** metrics["eval_loss_best"])
    assert all(h["tokens_per_second"] > 0 for h in history if "loss" in h and h["step"] not in (1, 5))
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "loss_curve.png").stat().st_size > 10_000  # a drawn chart, not an empty canvas


def test_held_out_loss_equals_the_models_own_loss(tiny_model, alpaca_file):
    """Batched, padded, token-weighted: the same number as one forward pass over all records together."""
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq

    from utils.data import load_records, tokenize_records
    from utils.models import load_tokenizer
    from utils.prompts import Prompter

    tokenizer = load_tokenizer(str(tiny_model))
    records = load_records(str(alpaca_file))[:10]
    dataset = tokenize_records(records, tokenizer, Prompter(), cutoff_len=128, train_on_inputs=False, add_eos_token=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    measured = response_loss(model, dataset, tokenizer.pad_token_id, batch_size=3)
    batch = DataCollatorForSeq2Seq(tokenizer, padding=True, return_tensors="pt")(dataset.to_list())
    with torch.no_grad():
        direct = model(**batch).loss.item()
    assert measured["loss"] == pytest.approx(direct, rel=1e-5)
    assert measured["perplexity"] == pytest.approx(torch.tensor(direct).exp().item(), rel=1e-5)
    assert measured["tokens"] == int((batch["labels"][:, 1:] != -100).sum()) and measured["records"] == len(dataset)


def test_evaluation_compares_base_and_adapter_on_the_runs_held_out_records(evaluated, resumed_run, tiny_model):
    """Defaults come from training_args.json: the 8 records the run held out; the adapter beats the base there."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq

    from utils.data import load_records, split_records, tokenize_records
    from utils.models import load_tokenizer
    from utils.prompts import Prompter

    report = json.loads((evaluated / "evaluation.json").read_text())
    held = report["held_out"]
    assert held["adapter"]["loss"] < held["base"]["loss"]
    # The same figures computed by hand from finetune.py's own split.
    run = json.loads((resumed_run[0] / "training_args.json").read_text())
    tokenizer = load_tokenizer(str(tiny_model))
    records = split_records(load_records(run["data_path"]), 8, seed=42)[1]
    dataset = tokenize_records(records, tokenizer, Prompter(), cutoff_len=128, train_on_inputs=False, add_eos_token=True)
    assert held["base"]["records"] == held["adapter"]["records"] == len(dataset)  # 8 held out, less those cut off
    batch = DataCollatorForSeq2Seq(tokenizer, padding=True, return_tensors="pt")(dataset.to_list())
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        assert held["base"]["loss"] == pytest.approx(model(**batch).loss.item(), rel=1e-5)
        tuned = PeftModel.from_pretrained(model, resumed_run[0]).eval()
        assert held["adapter"]["loss"] == pytest.approx(tuned(**batch).loss.item(), rel=1e-5)


def test_answers_are_written_as_jsonl_and_markdown(evaluated):
    prompts = json.loads(Path(DEFAULT_PROMPTS).read_text())
    rows = [json.loads(line) for line in (evaluated / "answers.jsonl").read_text().splitlines()]
    assert [r["instruction"] for r in rows] == prompts
    for row in rows:
        assert isinstance(row["base"], str) and isinstance(row["adapter"], str)
        assert row["base_finish"] in ("stop", "length") and row["adapter_finish"] in ("stop", "length")
    markdown = (evaluated / "evaluation.md").read_text()
    assert "## Held-out loss" in markdown and "## Answers" in markdown
    for prompt in prompts:
        assert markdown_cell(prompt) in markdown


def test_the_original_prompts_are_shipped_verbatim():
    prompts = json.loads(Path(DEFAULT_PROMPTS).read_text())
    assert prompts[:9] == [
        "Tell me about alpacas.",
        "Tell me about the president of Mexico in 2019.",
        "Tell me about the king of France in 2019.",
        "List all Canadian provinces in alphabetical order.",
        "Write a Python program that prints the first 10 Fibonacci numbers.",
        "Write a program that prints the numbers from 1 to 100. But for multiples of three print 'Fizz' instead of the "
        "number and for the multiples of five print 'Buzz'. For numbers which are multiples of both three and five "
        "print 'FizzBuzz'.",
        "Tell me five words that rhyme with 'shock'.",
        "Translate the sentence 'I have no mouth but I must scream' into Spanish.",
        "Count up from 1 to 500.",
    ]
    assert len(prompts) == 12


def test_markdown_table_keeps_each_answer_in_its_cell():
    rows = [
        dict(instruction="Pipes | and\nlines", input="", base="a | b\n\nc", adapter="def f():\n    return 1 < 2"),
        dict(instruction="Second", input="with input", base="", adapter="x\\|y"),
    ]
    lines = answers_table(rows).splitlines()
    assert len(lines) == 4  # header, rule, one line per row
    for line in lines[2:]:
        cells = re.split(r"(?<!\\)\|", line)[1:-1]  # split on unescaped pipes only
        assert len(cells) == 4, line
    assert "Pipes \\| and<br>lines" in lines[2] and "a \\| b<br><br>c" in lines[2]
    assert "def f():<br>&nbsp;&nbsp;&nbsp;&nbsp;return 1 &lt; 2" in lines[2]  # indentation and '<' survive rendering
    assert "Second<br><br>Input: with input" in lines[3]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(lora_weights=""), "--lora_weights is required"),
        (dict(lora_weights="./no-such-adapter"), "adapter directory ./no-such-adapter not found"),
        (dict(data_path="missing.json"), "data file missing.json not found"),
        (dict(prompts_path="missing-prompts.json"), "prompts file missing-prompts.json not found"),
        (dict(loss=False, answers=False), "leave nothing to do"),
    ],
)
def test_bad_input_fails_before_loading_the_model(resumed_run, monkeypatch, tmp_path, overrides, message):
    import utils.generation

    monkeypatch.setattr(utils.generation, "load_generator", lambda *a, **k: pytest.fail("the model was loaded"))
    args = dict(lora_weights=str(resumed_run[0]), output_dir=str(tmp_path)) | overrides
    with pytest.raises(UserError, match=message):
        evaluate.main(**args)


def test_cli_bad_input_is_one_line_and_help_documents_every_flag():
    proc = subprocess.run([sys.executable, "evaluate.py"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: --lora_weights is required")
    assert "Traceback" not in proc.stderr
    import inspect

    doc = evaluate.main.__doc__
    for flag in inspect.signature(evaluate.main).parameters:
        assert f"\n        {flag}: " in doc, flag


# --- runs on every default: what finetune.py records is what it resolved, and evaluate.py relies on it -------------

@pytest.fixture
def embedded_is_tiny(monkeypatch, tiny_model):
    """The embedded default (no --base_model) stands for the tiny model: the default path, in seconds."""
    patch_embedded(monkeypatch, tiny_model)


def patch_embedded(monkeypatch, tiny_model):
    import utils.models

    monkeypatch.setattr(utils.models, "embedded_gguf", lambda: Path(utils.models.EMBEDDED_GGUF))
    monkeypatch.setattr(utils.models, "gguf_to_hf", lambda gguf: tiny_model)


@pytest.fixture(scope="module")
def default_run(tiny_model, tmp_path_factory):
    """`python finetune.py` with no model, data or validation flags (only a short, small-batch run), from a working
    directory of its own, as the quick start runs it; returns (the working directory, the plot titles drawn)."""
    import utils.metrics

    cwd = tmp_path_factory.mktemp("quick-start")
    titles = []
    draw = utils.metrics.plot_loss_curve
    with pytest.MonkeyPatch.context() as patch:
        patch_embedded(patch, tiny_model)
        patch.chdir(cwd)
        patch.setattr(utils.metrics, "plot_loss_curve", lambda history, path, title="": titles.append(title) or draw(history, path, title))
        finetune.train(batch_size=8, micro_batch_size=4, max_steps=2, save_steps=2, logging_steps=1)
    return cwd, titles


def test_a_default_run_records_what_it_resolved_and_no_machine_paths(default_run, tiny_model):
    from utils.data import DEFAULT_DATA, resolve_val_set_size
    from utils.models import EMBEDDED_NAME, resolve_base_model

    cwd, titles = default_run
    run = cwd / "lora-alpaca"
    args = json.loads((run / "training_args.json").read_text())
    shipped = len(json.loads(Path(DEFAULT_DATA).read_text()))
    assert args["val_set_size"] == resolve_val_set_size(None, shipped) == 49  # the count held out, not null
    assert args["data_path"] == "data/alpaca_en_demo.json" and args["base_model"] == ""  # as the user gave them
    assert (args["train_on_inputs"], args["prompt_template_name"], args["chat_template"]) == (True, "alpaca", "")
    assert args["quantization"] == "none" and args["lora_target_modules"] == ["q_proj", "v_proj"]
    assert args["warmup_steps"] == 0  # --warmup_steps 100 is capped at a tenth of this 2-step run
    adapter = json.loads((run / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == EMBEDDED_NAME  # not the converted copy's cache folder
    assert resolve_base_model(EMBEDDED_NAME) == resolve_base_model("")  # which loads the embedded model back
    assert titles[-1] == f"LoRA r=8 on {EMBEDDED_NAME}"
    assert f"base_model: {EMBEDDED_NAME}" in (run / "README.md").read_text()  # PEFT's model card
    for written in ("training_args.json", "adapter_config.json", "README.md"):
        text = (run / written).read_text()
        assert str(REPO) not in text and str(tiny_model) not in text and str(cwd) not in text, written


def test_evaluate_scores_exactly_the_held_out_records_of_a_default_run(default_run, embedded_is_tiny, monkeypatch, tmp_path):
    """`python evaluate.py --lora_weights ./lora-alpaca` after the quick start, from any directory: it scores the
    records the run held out (finetune.py's split, recomputed here), none of those it trained on."""
    import utils.evaluation
    from utils.data import DEFAULT_DATA, load_records, split_records

    cwd, _ = default_run
    scored = []
    compare = utils.evaluation.compare_losses
    monkeypatch.setattr(utils.evaluation, "compare_losses", lambda g, records, *a: scored.extend(records) or compare(g, records, *a))
    monkeypatch.chdir(tmp_path)
    evaluate.main(lora_weights=str(cwd / "lora-alpaca"), answers=False)
    train, held_out = split_records(load_records(DEFAULT_DATA), 49, seed=42)
    assert scored == held_out.to_list()
    data = load_records(DEFAULT_DATA)
    also_trained_on = [r for r in scored if r in train.to_list()]
    assert all(data.count(r) > 1 for r in also_trained_on)  # only the file's own duplicates (985 of 999 are unique)
    report = json.loads((cwd / "lora-alpaca" / "evaluation" / "evaluation.json").read_text())
    settings = report["settings"]
    assert (settings["data_path"], settings["prompts_path"]) == ("data/alpaca_en_demo.json", "data/eval_prompts.json")
    assert str(REPO) not in json.dumps(settings)


def test_a_run_that_held_out_nothing_has_nothing_to_score(tiny_model, alpaca_file, tmp_path, monkeypatch):
    """val_set_size 0 trains on every record: evaluate.py refuses (before loading a model) instead of scoring them."""
    import utils.generation
    from utils.evaluation import held_out_records

    out = tmp_path / "lora"
    finetune.train(**dict(QUICK, val_set_size=0), base_model=str(tiny_model), data_path=str(alpaca_file),
                   output_dir=str(out), max_steps=1)
    monkeypatch.setattr(utils.generation, "load_generator", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(UserError, match="--val_set_size 0 holds out none of the 40 records of .*alpaca.json"):
        evaluate.main(lora_weights=str(out), answers=False)
    # A run recorded before val_set_size was resolved (null): finetune.py's default split of its data.
    assert held_out_records(str(alpaca_file), None, 42) == held_out_records(str(alpaca_file), 2, 42)


@pytest.fixture(scope="module")
def chat_model(tiny_model, tmp_path_factory):
    """The tiny model with a chat template of its own, as instruct models have (not alpaca_chat's Alpaca look)."""
    import shutil

    from utils.models import load_tokenizer

    folder = tmp_path_factory.mktemp("chat-model") / "tiny-chat"
    shutil.copytree(tiny_model, folder)
    tokenizer = load_tokenizer(str(folder))
    tokenizer.chat_template = ("{% for m in messages %}<{{ m.role }}> {{ m.content }}{% if m.role == 'assistant' %}"
                               "{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}<assistant> {% endif %}")
    tokenizer.save_pretrained(folder)
    return folder


def test_evaluate_scores_and_asks_a_chat_adapter_in_its_chat_template(chat_model, tmp_path, monkeypatch):
    """A chat run on the shipped conversations, evaluated with --lora_weights alone: the held-out conversations are
    scored on their assistant turns, rendered as in training, and the prompts are asked as conversations."""
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq

    from utils.chat import load_chat_template
    from utils.data import load_records, split_records, tokenize_records
    from utils.generation import Generator
    from utils.models import load_tokenizer
    from utils.chat import trained_chat_template

    data = tmp_path / "chat.json"
    data.write_text(json.dumps(json.loads((REPO / "data" / "fastchat_dummy_conversation.json").read_text())[:40]))
    out = tmp_path / "chat-lora"
    finetune.train(**QUICK, base_model=str(chat_model), data_path=str(data), output_dir=str(out), max_steps=2)
    args = json.loads((out / "training_args.json").read_text())
    assert (args["chat_template"], args["train_on_inputs"], args["val_set_size"]) == ("tokenizer", False, 8)
    tokenizer = load_tokenizer(str(chat_model))
    assert trained_chat_template("", str(out), tokenizer).name == "tokenizer"  # the Ollama export's template too

    asked = []
    complete = Generator.complete
    monkeypatch.setattr(Generator, "complete", lambda self, prompts, *a, **k: asked.extend(prompts) or complete(self, prompts, *a, **k))
    evaluate.main(lora_weights=str(out), output_dir=str(tmp_path / "eval"), max_new_tokens=4)
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert report["settings"]["chat_template"] == "tokenizer"
    chat = load_chat_template("tokenizer", tokenizer)
    held_out = split_records(load_records(str(data)), 8, seed=42)[1]
    dataset = tokenize_records(held_out, tokenizer, None, cutoff_len=128, train_on_inputs=False, add_eos_token=True, chat=chat)
    batch = DataCollatorForSeq2Seq(tokenizer, padding=True, return_tensors="pt")(dataset.to_list())
    with torch.no_grad():
        base_loss = AutoModelForCausalLM.from_pretrained(chat_model)(**batch).loss.item()
    assert report["held_out"]["base"]["records"] == 8
    assert report["held_out"]["base"]["loss"] == pytest.approx(base_loss, rel=1e-5)
    assert asked[0] == "<user> Tell me about alpacas.<assistant> "  # (Jinja's trim_blocks eats the newline)


def test_the_documented_run_names_paths_as_they_were_given():
    """docs/real-run/*.json are the README's evidence: paths as typed (or the shipped files by their place in the
    repository), not the checkout of the machine that ran them."""
    for name in ("training_args.json", "evaluation.json", "metrics.json"):
        text = (REPO / "docs" / "real-run" / name).read_text()
        assert not re.search(r'"(/|[A-Za-z]:\\\\)', text), name


def test_a_hub_adapters_results_do_not_shadow_its_id(tmp_path, monkeypatch, capsys):
    """Results under ./owner/name/evaluation made every later `--lora_weights owner/name` read that folder instead."""
    from utils.evaluation import output_dir_for
    from utils.models import check_adapter_dir

    monkeypatch.chdir(tmp_path)
    assert output_dir_for("owner/name", "") == Path("evaluations/owner--name")
    assert "Results of the Hub adapter owner/name go to evaluations/owner--name" in capsys.readouterr().out
    assert output_dir_for(str(tmp_path / "lora"), "") == tmp_path / "lora" / "evaluation"  # a local adapter: beside it
    with pytest.raises(UserError, match="--output_dir owner/name/evaluation would create a folder named like the Hub adapter"):
        output_dir_for("owner/name", "owner/name/evaluation")
    (tmp_path / "owner" / "name" / "evaluation").mkdir(parents=True)  # what earlier versions left
    with pytest.raises(UserError, match="local folder owner/name \\(no adapter_config.json\\) shadows the Hub adapter owner/name"):
        check_adapter_dir("owner/name")
