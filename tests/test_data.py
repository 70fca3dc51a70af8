"""Loading, validating, splitting and tokenizing instruction records."""

import json

import pytest

from utils.cli import UserError
from utils.data import IGNORE_INDEX, load_records, resolve_val_set_size, tokenize_records
from utils.models import load_tokenizer
from utils.prompts import Prompter

RECORD = {"instruction": "Name a primary color.", "input": "", "output": "Red is a primary color."}


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(str(tiny_model))


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_alpaca_json_and_jsonl(tmp_path):
    assert load_records(write(tmp_path, "a.json", [RECORD])) == [RECORD]
    jsonl = json.dumps(RECORD) + "\n\n" + json.dumps({"instruction": "x", "output": "y"}) + "\n"
    assert load_records(write(tmp_path, "a.jsonl", jsonl))[1] == {"instruction": "x", "input": "", "output": "y"}


def test_dolly_records_need_no_conversion(tmp_path):
    dolly = {"instruction": "Summarize.", "context": "Long text.", "response": "Short.", "category": "summarization"}
    assert load_records(write(tmp_path, "d.jsonl", json.dumps(dolly))) == [
        {"instruction": "Summarize.", "input": "Long text.", "output": "Short."}
    ]


def test_column_map(tmp_path):
    path = write(tmp_path, "q.json", [{"question": "2+2?", "answer": "4"}])
    expected = [{"instruction": "2+2?", "input": "", "output": "4"}]
    assert load_records(path, "question=instruction,answer=output") == expected
    assert load_records(path, {"question": "instruction", "answer": "output"}) == expected


def test_null_field_is_an_error_not_an_empty_string(tmp_path):
    with pytest.raises(UserError, match=r"n.json: record 1 field 'input' should be text, found null"):
        load_records(write(tmp_path, "n.json", [RECORD, dict(RECORD, input=None)]))
    assert load_records(write(tmp_path, "absent.json", [{"instruction": "x", "output": "y"}]))[0]["input"] == ""


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.json", None, r"data file .*missing.json not found"),
        ("broken.json", '[{"instruction": "x",\n "output": }]', r"broken.json is not valid JSON: Expecting value at line 2"),
        ("broken.jsonl", '{"instruction": "x", "output": "y"}\n{oops}\n', r"broken.jsonl is not valid JSON Lines: .* at line 2"),
        ("fields.json", [RECORD, {"instruction": "x", "answer": "y"}], r"fields.json: record 1 lacks output \(has answer, instruction\)"),
        ("type.json", [{"instruction": "x", "output": 3}], r"record 0 field 'output' should be text, found int"),
        ("list.json", [["x"]], r"record 0 is a list"),
        ("dict.json", {"instruction": "x"}, r"should hold a list of records, found a dict"),
        ("empty.json", [], r"holds no records"),
        ("data.csv", "a,b\n", r"should be .json or .jsonl"),
    ],
)
def test_bad_data_files(tmp_path, name, content, message):
    path = str(tmp_path / name) if content is None else write(tmp_path, name, content)
    with pytest.raises(UserError, match=message):
        load_records(path)


def test_bad_column_map():
    with pytest.raises(UserError, match="should look like question=instruction"):
        load_records("x.json", "question")


def test_val_set_size():
    assert resolve_val_set_size(None, 52_000) == 2000  # the original's default on full-size data
    assert resolve_val_set_size(None, 999) == 49
    assert resolve_val_set_size(0.1, 1000) == 100
    assert resolve_val_set_size(0, 10) == 0
    with pytest.raises(UserError, match="--val_set_size 2000 leaves no training records \\(999 records"):
        resolve_val_set_size(2000, 999)


def tokenize(tokenizer, records, **kw):
    args = dict(cutoff_len=256, train_on_inputs=False, add_eos_token=True) | kw
    return tokenize_records(records, tokenizer, Prompter("alpaca"), **args)


def test_prompt_masked_and_eos_appended(tokenizer):
    row = tokenize(tokenizer, [RECORD])[0]
    ids, labels = row["input_ids"], row["labels"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert labels[-1] == tokenizer.eos_token_id  # the model is taught to stop
    first = next(i for i, l in enumerate(labels) if l != IGNORE_INDEX)
    assert all(l == IGNORE_INDEX for l in labels[:first]) and labels[first:] == ids[first:]
    # The masked part decodes to the prompt, the trained part to the output and EOS, token for token.
    prompt = Prompter("alpaca").generate_prompt(RECORD["instruction"])
    assert tokenizer.decode(ids[:first], skip_special_tokens=True).strip() == prompt.strip()
    assert tokenizer.decode(labels[first:-1]).strip() == RECORD["output"]


def test_train_on_inputs_labels_everything(tokenizer):
    row = tokenize(tokenizer, [RECORD], train_on_inputs=True)[0]
    assert row["labels"] == row["input_ids"]


def test_add_eos_token_off(tokenizer):
    assert tokenize(tokenizer, [RECORD], add_eos_token=False)[0]["input_ids"][-1] != tokenizer.eos_token_id


def test_truncation_at_cutoff(tokenizer):
    long = dict(RECORD, output="word " * 400)
    row = tokenize(tokenizer, [long], cutoff_len=128)[0]
    assert len(row["input_ids"]) == 128 and row["input_ids"][-1] != tokenizer.eos_token_id


def test_tokens_are_the_tokenizers_own_and_its_settings_are_left_alone(tokenizer, embedded_model):
    """Data preparation calls the Rust backend directly: the same ids as the tokenizer, cut the same way, and the
    shared tokenizer's truncation setting unchanged afterwards."""
    long = dict(RECORD, output="Ünïcode 東京 🦙 12345 " * 60)
    for tok in (tokenizer, load_tokenizer(embedded_model)):
        text = Prompter("alpaca").generate_prompt(long["instruction"]) + long["output"]
        before = tok.backend_tokenizer.truncation
        rows = tokenize(tok, [long], cutoff_len=128, train_on_inputs=True, add_eos_token=False)
        assert tok.backend_tokenizer.truncation == before
        assert rows[0]["input_ids"] == tok(text, truncation=True, max_length=128)["input_ids"]


def test_a_padded_call_before_leaves_the_records_unpadded(tiny_model):
    """A Generator pads its batches (padding=True), which the fast tokenizer's backend keeps as a setting: records
    tokenized after it (evaluate.py, a test's perplexity) must not come out padded to the longest, nor that setting
    be lost."""
    tok = load_tokenizer(str(tiny_model))
    records = [RECORD, dict(RECORD, output="A long answer about colours. " * 10)]
    alone = [row["input_ids"] for row in tokenize(tok, records)]
    tok(["a", "b c d e"], padding=True)
    padding = tok.backend_tokenizer.padding
    assert [row["input_ids"] for row in tokenize(tok, records)] == alone and len(alone[0]) < len(alone[1])
    assert tok.backend_tokenizer.padding == padding


def test_records_cut_before_their_response_are_dropped(tokenizer):
    long_prompt = dict(RECORD, input="word " * 400)
    assert len(tokenize(tokenizer, [long_prompt, RECORD], cutoff_len=128)) == 1


def test_records_cut_before_their_response_are_dropped_with_the_prompt_trained_on_too(tokenizer, alpaca_file):
    """--train_on_inputs (the default for instruction records) drops the same records: one whose response is cut off
    entirely would teach the prompt alone. Those whose response starts within cutoff_len stay, with it or not."""
    records = load_records(str(alpaca_file))
    for cutoff_len in (110, 160, 200):  # the tiny tokenizer's prompts here take 92 to 202 tokens
        masked = tokenize(tokenizer, records, cutoff_len=cutoff_len, train_on_inputs=False)
        whole = tokenize(tokenizer, records, cutoff_len=cutoff_len, train_on_inputs=True)
        assert whole["input_ids"] == masked["input_ids"], cutoff_len
        assert 0 < len(whole) < len(records)


def test_embedded_tokenizer_masks_at_the_response(embedded_model):
    """SmolLM2's byte-level BPE has no BOS and merges across '\\n': the mask still splits at the response."""
    tok = load_tokenizer(embedded_model)
    assert tok.pad_token_id == tok.eos_token_id == 2  # read from the tokenizer, never assumed to be 0
    row = tokenize(tok, [RECORD])[0]
    first = next(i for i, l in enumerate(row["labels"]) if l != IGNORE_INDEX)
    assert tok.decode(row["labels"][first:]) == RECORD["output"] + "<|im_end|>"
