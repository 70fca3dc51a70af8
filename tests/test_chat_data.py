"""Conversation data (ShareGPT / OpenAI records), chat templates and the assistant-only loss mask, token by token."""

import json

import pytest

from utils.chat import chat_messages, load_chat_template
from utils.cli import UserError
from utils.data import IGNORE_INDEX, load_records, tokenize_records
from utils.models import load_tokenizer
from utils.prompts import Prompter

TURNS = [("human", "Who are you?"), ("gpt", "I am Vicuna."), ("human", "Have a nice day!"), ("gpt", "You too!")]
SHAREGPT = {"id": "identity_0", "conversations": [{"from": f, "value": v} for f, v in TURNS]}
ROLES = {"human": "user", "gpt": "assistant"}
MESSAGES = [{"role": ROLES[f], "content": v} for f, v in TURNS]


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model):
    return load_tokenizer(str(tiny_model))


def write(tmp_path, name, records):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r) for r in records) if name.endswith(".jsonl") else json.dumps(records))
    return str(path)


def test_sharegpt_and_openai_records_become_the_same_messages(tmp_path):
    assert load_records(write(tmp_path, "s.json", [SHAREGPT])) == [{"messages": MESSAGES}]
    assert load_records(write(tmp_path, "o.jsonl", [{"messages": MESSAGES}])) == [{"messages": MESSAGES}]
    with_system = load_records(write(tmp_path, "sys.json", [dict(SHAREGPT, system="Be brief.")]))[0]["messages"]
    assert with_system[0] == {"role": "system", "content": "Be brief."} and with_system[1:] == MESSAGES


def test_shipped_conversation_file_loads():
    records = load_records("data/fastchat_dummy_conversation.json")
    assert len(records) == 500 and [m["role"] for m in records[0]["messages"]] == ["user", "assistant"] * 2
    assert records[0]["messages"][1]["content"].startswith("I am Vicuna, a language model")


@pytest.mark.parametrize("records, message", [
    ([{"conversations": [{"from": "human", "value": "Hi"}, {"from": "function_call", "value": "{}"}]}],
     r"c.json: record 0, turn 1: unknown role 'function_call' \(known: system, human, user, gpt, assistant\)"),
    ([SHAREGPT, {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "  "}]}],
     r"record 1, turn 1: empty assistant turn"),
    ([{"messages": [{"role": "user", "content": "Hi"}]}], r"record 0: the conversation has no assistant turn"),
    ([SHAREGPT, {"instruction": "x", "output": "y"}],
     r"record 1 is an instruction record \(instruction/input/output\) but record 0 is a ShareGPT conversation"),
    ([{"messages": MESSAGES}, SHAREGPT], r"record 1 is a ShareGPT conversation .* but record 0 is an OpenAI conversation"),
    ([{"messages": [{"role": "assistant", "content": "Hello"}]}], r"record 0: the conversation should start with a user turn"),
    ([{"messages": MESSAGES + [{"role": "system", "content": "x"}]}], r"record 0, turn 4: a system turn can only come first"),
    ([{"messages": []}], r"record 0: messages should be a non-empty list of turns"),
    ([{"messages": [{"role": "user", "content": 3}]}], r"record 0, turn 0: content should be text, found int"),
])
def test_bad_conversations_are_one_line_naming_the_record(tmp_path, records, message):
    with pytest.raises(UserError, match=message):
        load_records(write(tmp_path, "c.json", records))


def labelled_pieces(tokenizer, row) -> list[tuple[bool, str]]:
    """The tokenized text cut where the mask changes: (trained on?, the decoded tokens), token by token."""
    pieces: list[tuple[bool, list[int]]] = []
    for token, label in zip(row["input_ids"], row["labels"]):
        trained = label != IGNORE_INDEX
        assert not trained or label == token
        if pieces and pieces[-1][0] == trained:
            pieces[-1][1].append(token)
        else:
            pieces.append((trained, [token]))
    return [(trained, tokenizer.decode(ids)) for trained, ids in pieces]


def tokenize(tokenizer, chat, records, **kw):
    args = dict(cutoff_len=256, train_on_inputs=False, add_eos_token=True) | kw
    return tokenize_records(records, tokenizer, Prompter("alpaca"), chat=chat, **args)


def test_embedded_chat_template_trains_on_every_assistant_turn(embedded_model):
    """SmolLM2's own template: each answer and its <|im_end|> are trained on, nothing else (not the newline after)."""
    tokenizer = load_tokenizer(embedded_model)
    chat = load_chat_template("", tokenizer)
    assert chat.name == "tokenizer"
    row = tokenize(tokenizer, chat, [{"messages": MESSAGES}])[0]
    system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    assert labelled_pieces(tokenizer, row) == [
        (False, system + "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n"),
        (True, "I am Vicuna.<|im_end|>"),
        (False, "\n<|im_start|>user\nHave a nice day!<|im_end|>\n<|im_start|>assistant\n"),
        (True, "You too!<|im_end|>"),
        (False, "\n"),
    ]
    assert tokenizer.decode(row["input_ids"]) == chat.render(MESSAGES)  # nothing added: EOS is the template's <|im_end|>


def test_template_file_trains_on_every_assistant_turn(tiny_tokenizer):
    """templates/alpaca_chat.json on a SentencePiece tokenizer: the answers and their EOS, after BOS and the headings."""
    chat = load_chat_template("alpaca_chat", tiny_tokenizer)
    row = tokenize(tiny_tokenizer, chat, [{"messages": MESSAGES}])[0]
    assert row["input_ids"][0] == tiny_tokenizer.bos_token_id
    preamble = Prompter("alpaca").generate_prompt("Who are you?")  # the first exchange is exactly the Alpaca prompt
    assert labelled_pieces(tiny_tokenizer, row) == [
        (False, "<s> " + preamble),
        (True, "I am Vicuna.</s>"),
        (False, "\n\n### Instruction:\nHave a nice day!\n\n### Response:\n"),
        (True, "You too!</s>"),
        (False, "\n\n"),
    ]


def test_alpaca_chat_starts_as_the_alpaca_prompt(tiny_tokenizer):
    chat = load_chat_template("alpaca_chat", tiny_tokenizer)
    assert chat.render(MESSAGES[:1], add_generation_prompt=True) == Prompter("alpaca").generate_prompt("Who are you?")
    assert chat.render(MESSAGES[:2]).endswith("### Response:\nI am Vicuna.</s>\n\n")


def test_train_on_inputs_and_truncation(tiny_tokenizer):
    chat = load_chat_template("alpaca_chat", tiny_tokenizer)
    row = tokenize(tiny_tokenizer, chat, [{"messages": MESSAGES}], train_on_inputs=True)[0]
    assert row["labels"] == row["input_ids"]
    long = MESSAGES[:3] + [{"role": "assistant", "content": "word " * 300}]
    row = tokenize(tiny_tokenizer, chat, [{"messages": long}], cutoff_len=128)[0]
    assert len(row["input_ids"]) == 128  # cut inside the second answer: the first is still trained on
    assert [p for trained, p in labelled_pieces(tiny_tokenizer, row) if trained][0] == "I am Vicuna.</s>"


def test_template_that_writes_bos_does_not_double_it(tiny_model):
    tokenizer = load_tokenizer(str(tiny_model))
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}"
                               "{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
                               "{% if add_generation_prompt %}[assistant] {% endif %}")
    chat = load_chat_template("", tokenizer)
    row = tokenize(tokenizer, chat, [{"messages": MESSAGES}])[0]
    assert row["input_ids"].count(tokenizer.bos_token_id) == 1
    assert [p for trained, p in labelled_pieces(tokenizer, row) if trained] == ["I am Vicuna.</s>", "You too!</s>"]


def test_template_that_rewrites_earlier_turns_is_refused(tiny_model):
    tokenizer = load_tokenizer(str(tiny_model))
    tokenizer.chat_template = "{% for m in messages|reverse %}{{ m.content }}\n{% endfor %}"
    with pytest.raises(UserError, match="does not render conversations turn by turn"):
        tokenize(tokenizer, load_chat_template("tokenizer", tokenizer), [{"messages": MESSAGES}])


@pytest.mark.parametrize("name, message", [
    ("tokenizer", "this tokenizer has no chat template; use --chat_template alpaca_chat"),
    ("alpaca", "lacks system, user, assistant, so it cannot render conversations"),
    ("nope", "unknown chat template 'nope'"),
])
def test_bad_chat_template_names(tiny_tokenizer, name, message):
    with pytest.raises(UserError, match=message):
        load_chat_template(name, tiny_tokenizer)


def test_chat_front_end_history():
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]},
               {"role": "user", "content": "Tell me more"}, {"role": "assistant", "content": ""}]  # a stopped answer
    assert chat_messages("Be brief.", history, "Thanks") == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Tell me more"},
        {"role": "user", "content": "Thanks"},
    ]


def test_finetune_trains_a_chat_adapter_on_a_conversation_file(tiny_model, tmp_path, capsys):
    """finetune.py end to end on 40 shipped ShareGPT conversations: alpaca_chat (the tiny tokenizer has no template)."""
    import finetune
    from safetensors.torch import load_file

    data = write(tmp_path, "chat.json", json.loads(open("data/fastchat_dummy_conversation.json").read())[:40])
    out = tmp_path / "chat-lora"
    finetune.train(base_model=str(tiny_model), data_path=data, output_dir=str(out), batch_size=8, micro_batch_size=4,
                   cutoff_len=256, val_set_size=8, max_steps=6, save_steps=3, logging_steps=1, warmup_steps=0,
                   learning_rate=1e-2)
    assert "Conversations rendered with chat template alpaca_chat" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_loss_best"] < metrics["eval_loss_first"]
    assert any(t.abs().sum() > 0 for k, t in load_file(out / "adapter_model.safetensors").items() if "lora_B" in k)
