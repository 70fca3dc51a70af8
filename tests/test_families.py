"""Today's bases end to end, on tiny random models of each family (tests/families.py): training lowers the loss
with LoRA on all-linear, the adapter reloads, the merged export equals base + adapter, the family's chat layout
puts the loss on the assistant turns only, a tokenizer whose pad token is EOS still learns to stop, and the
demo's generator answers instructions and conversations, and the server's batch answers overlapping requests as
it answers them one at a time (sliding windows included)."""

import json

import pytest
import torch

import finetune
from families import FAMILIES, make_family_model
from tiny import ALPACA
from utils.data import IGNORE_INDEX, tokenize_records
from utils.models import load_tokenizer
from utils.prompts import Prompter

CONVERSATION = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am an alpaca."},
                {"role": "user", "content": "Where do you live?"}, {"role": "assistant", "content": "In the Andes."}]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(name, tiny base model, LoRA adapter trained on it with all-linear, the run's metrics)."""
    name = request.param
    base = make_family_model(tmp_path_factory.mktemp(name), name)
    data = tmp_path_factory.mktemp("data") / "alpaca.json"
    data.write_text(json.dumps(json.loads(ALPACA.read_text())[:40]))
    out = tmp_path_factory.mktemp("run") / "lora"
    finetune.train(base_model=str(base), data_path=str(data), output_dir=str(out), batch_size=8, micro_batch_size=4,
                   cutoff_len=128, val_set_size=8, max_steps=8, save_steps=4, logging_steps=1, warmup_steps=0,
                   learning_rate=1e-2, lora_target_modules="all-linear")
    return name, base, out, json.loads((out / "metrics.json").read_text())


def test_training_lowers_the_loss(family):
    name, _, _, metrics = family
    assert metrics["eval_loss_best"] < metrics["eval_loss_first"] - 0.05, (name, metrics["eval_loss_first"], metrics["eval_loss_best"])


def test_adapter_reloads_and_merge_equals_base_plus_adapter(family, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from export_hf_checkpoint import export

    name, base, adapter, _ = family
    ids = load_tokenizer(str(base))(["Name three colours."], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(base)(ids).logits
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()(ids).logits
        export(base_model=str(base), lora_weights=str(adapter), output_dir=str(tmp_path / "merged"), dtype="float32")
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")(ids).logits
    assert (tuned - plain).abs().max() > 1e-3, name  # the adapter changes the model
    torch.testing.assert_close(merged, tuned, atol=1e-4, rtol=1e-4)


def test_chat_template_puts_the_loss_on_assistant_turns_only(family):
    from utils.chat import load_chat_template

    name, base, _, _ = family
    tokenizer = load_tokenizer(str(base))
    chat = load_chat_template("", tokenizer)  # the tokenizer's own: the family's layout
    row = tokenize_records([{"messages": CONVERSATION}], tokenizer, Prompter(), cutoff_len=256, train_on_inputs=False,
                           add_eos_token=True, chat=chat)[0]
    trained = [(t, l != IGNORE_INDEX) for t, l in zip(row["input_ids"], row["labels"])]
    pieces, current = [], []
    for token, on in trained + [(None, False)]:  # the runs of trained tokens, decoded
        if on:
            current.append(token)
        elif current:
            pieces.append(tokenizer.decode(current).strip())
            current = []
    assert pieces == [f"I am an alpaca.{tokenizer.eos_token}", f"In the Andes.{tokenizer.eos_token}"], (name, pieces)


@pytest.mark.parametrize("name", [n for n, (_, _, tokens, _) in FAMILIES.items() if tokens["pad"] in (None, tokens["eos"])])
def test_pad_token_equal_to_eos_still_learns_to_stop(name, tmp_path):
    """Llama 3 and Mistral pad with EOS: padding is masked by position, never by id, so EOS stays a label."""
    from utils.generation import Settings, load_generator

    # Wider random weights than the default 0.02: a tiny model's logits must be able to single out one token.
    base = make_family_model(tmp_path / "base", name, initializer_range=0.5)
    tokenizer = load_tokenizer(str(base))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    data = tmp_path / "one.json"
    data.write_text(json.dumps([{"instruction": "Say hello.", "input": "", "output": "Hello there."}] * 16))
    finetune.train(base_model=str(base), data_path=str(data), output_dir=str(tmp_path / "lora"), batch_size=4,
                   micro_batch_size=2, val_set_size=0, max_steps=40, logging_steps=10, save_steps=100, warmup_steps=0,
                   learning_rate=2e-2, lora_dropout=0.0, packing=False, train_on_inputs=False, lora_target_modules="all-linear")
    generator = load_generator(str(base), str(tmp_path / "lora"), device="cpu")
    answer = generator.complete([generator.render("Say hello.")], Settings(temperature=0, num_beams=1, max_new_tokens=20))[0]
    assert (answer.text, answer.finish_reason) == ("Hello there.", "stop")


def test_the_demo_generator_answers_instructions_and_conversations(family):
    from utils.generation import Settings, load_generator

    name, base, adapter, _ = family
    generator = load_generator(str(base), str(adapter), device="cpu", chat_template="")
    settings = Settings(temperature=0, num_beams=1, max_new_tokens=8)
    instruction = generator.complete([generator.render("Name three colours.")], settings)[0]
    with generator.stream(generator.chat.render(CONVERSATION[:1], add_generation_prompt=True), settings) as stream:
        streamed = "".join(stream)
    assert instruction.completion_tokens > 0 and stream.completion.completion_tokens > 0, name
    assert streamed.strip() == stream.completion.text


def test_overlapping_requests_answer_as_one_at_a_time(family):
    """The server's batch (utils.serving.Engine) with the family's adapter: requests joining a running batch one
    after another and leaving it at different lengths get, token for token, the greedy answers generate() gives each
    alone, with windows shorter than the prompts (tests/families.py) on the sliding-window families."""
    import threading
    import time

    from gen_helpers import never_eos, slowed

    from utils.generation import Settings, load_generator, unwrapped
    from utils.serving import Engine

    name, base, adapter, _ = family
    generator = load_generator(str(base), str(adapter), device="cpu")
    prompts = [generator.render(p) for p in ("Name three colours.", "Tell me about alpacas.", "Hi.",
                                             "Write a short poem about llamas and vicunas in the Andes.")]
    lengths = [14, 5, 20, 9]
    widest = []
    with never_eos(generator.model, generator.tokenizer.eos_token_id):
        alone = [generator.complete([p], Settings(temperature=0, num_beams=1, max_new_tokens=n))[0]
                 for p, n in zip(prompts, lengths)]
        engine = Engine(generator, max_running=4, max_waiting=4)
        hook = unwrapped(generator.model).register_forward_pre_hook(
            lambda m, a, kw: widest.append(kw["input_ids"].shape[0]), with_kwargs=True)
        with slowed(generator.model, 0.01):
            jobs = []
            for prompt, n in zip(prompts, lengths):
                jobs.append(engine.stream(prompt, Settings(temperature=0, num_beams=1, max_new_tokens=n)))
                deadline = time.time() + 30
                while not jobs[-1].tokens and time.time() < deadline:  # it joins a batch already running
                    threading.Event().wait(0.005)
            for job in jobs:
                "".join(job)
        hook.remove()
        engine.close()
    assert min(generator.prompt_tokens(p) for p in prompts) > 8  # longer than the sliding windows
    assert [(j.completion.text, j.completion.completion_tokens) for j in jobs] == \
        [(c.text, c.completion_tokens) for c in alone], name
    assert max(widest) >= 3, name  # the rows really shared forward passes
