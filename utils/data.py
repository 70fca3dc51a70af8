"""Training data: load Alpaca/Dolly records or ShareGPT/OpenAI conversations from a file or the hub, validate,
split and tokenize."""

import json
from pathlib import Path
from typing import Optional, Union

from utils.chat import SHAPE_NAMES, ChatTemplate, record_messages, record_shape
from utils.cli import UserError, log
from utils.prompts import Prompter

DEFAULT_DATA = str(Path(__file__).resolve().parent.parent / "data" / "alpaca_en_demo.json")
DEFAULT_DATA_NAME = "data/alpaca_en_demo.json"  # how runs record the shipped sample: its place in the repository
IGNORE_INDEX = -100  # the label value the loss skips
# Dolly's columns mean the same as Alpaca's; they are renamed, not converted.
DOLLY_COLUMNS = {"context": "input", "response": "output"}


def parse_column_map(column_map: Union[None, str, dict]) -> dict:
    """`{"question": "instruction", "answer": "output"}` or the flag form "question=instruction,answer=output"."""
    if not column_map:
        return {}
    if isinstance(column_map, dict):
        return {str(k): str(v) for k, v in column_map.items()}
    pairs = [p.split("=") for p in str(column_map).split(",")]
    if any(len(p) != 2 for p in pairs):
        raise UserError(f"--column_map '{column_map}' should look like question=instruction,answer=output")
    return {src.strip(): dst.strip() for src, dst in pairs}


def read_json_records(path: Path) -> list:
    """A JSON array or JSON Lines file; a file that is not UTF-8, not valid JSON, or JSON Lines under a .json name
    (or the other way round) is one line naming the file and the place."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM, as Windows editors write, is fine
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text (byte {err.start} is {err.object[err.start:err.start + 1]!r}): "
                        "save it as UTF-8") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory: pass a .json or .jsonl file") from None
    if path.suffix != ".jsonl":
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            if err.msg == "Extra data" and looks_like_json_lines(text):
                raise UserError(f"{path} holds JSON Lines (one record per line), not one JSON document: rename it to "
                                f"{path.with_suffix('.jsonl').name}") from None
            raise UserError(f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}") from None
    records = []
    for lineno, line in enumerate(text.splitlines(), 1):
        try:
            if line.strip():
                records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if text.lstrip().startswith("["):
                raise UserError(f"{path} holds one JSON array, not JSON Lines: rename it to "
                                f"{path.with_suffix('.json').name}") from None
            raise UserError(f"{path} is not valid JSON Lines: {err.msg} at line {lineno}, column {err.colno}") from None
    return records


def looks_like_json_lines(text: str) -> bool:
    lines = [line for line in text.splitlines() if line.strip()]
    try:
        return len(lines) > 1 and all(isinstance(json.loads(line), dict) for line in lines[:2])
    except json.JSONDecodeError:
        return False


def read_instructions(path: str, what: str) -> list[dict]:
    """Instructions to answer (generate.py --input_file, evaluate.py --prompts_path): a .json list or a .jsonl file of
    strings or of objects with an "instruction" string and an optional "input" string (other fields are kept)."""
    file = Path(path).expanduser()
    if file.suffix not in (".json", ".jsonl"):
        raise UserError(f"{what} {path} should be a .json or .jsonl file")
    if not file.is_file():
        raise UserError(f"{what} {path} not found")
    items = read_json_records(file)
    items = [items] if isinstance(items, dict) else items
    if not isinstance(items, list) or not items:
        raise UserError(f"{path} should hold a non-empty list of instructions")
    records = []
    for index, item in enumerate(items):
        record = {"instruction": item} if isinstance(item, str) else item
        if not isinstance(record, dict) or not isinstance(record.get("instruction"), str):
            raise UserError(f'{path}: record {index} should be a string or an object with an "instruction" string')
        check_text(record.get("input", ""), f"{path}: record {index} field 'input'")
        records.append(record)
    return records


def load_raw_records(data_path: str) -> list:
    """Records from a local .json/.jsonl file or, for anything else, a Hugging Face Hub data set id."""
    path = Path(data_path).expanduser()
    if path.suffix in (".json", ".jsonl"):
        if not path.is_file():
            raise UserError(f"data file {data_path} not found")
        records = read_json_records(path)
        if not isinstance(records, list):
            raise UserError(f"{data_path} should hold a list of records, found a {type(records).__name__}")
        return records
    if path.exists():
        raise UserError(f"data file {data_path} should be .json or .jsonl")
    from utils.hub import check_hub_repo

    check_hub_repo(data_path, "dataset", "data set")
    from datasets import load_dataset

    try:  # the real hub path (yahma/alpaca-cleaned, databricks/databricks-dolly-15k, ...)
        return load_dataset(data_path, split="train").to_list()
    except Exception as err:  # datasets raises many types for "no such data set" / offline
        raise UserError(f"could not load data set '{data_path}' from the Hugging Face Hub: {str(err).splitlines()[0]}") from None


def recorded_data_path(data_path: str) -> str:
    """A run's data as training_args.json records it: as the user gave it, the shipped sample by DEFAULT_DATA_NAME
    (its absolute path would name one machine's checkout)."""
    return DEFAULT_DATA_NAME if data_path == DEFAULT_DATA else data_path


def recorded_data_file(recorded: str) -> str:
    """The data a run recorded, to load here: DEFAULT_DATA_NAME is the shipped sample wherever the script runs from."""
    if not recorded or (recorded == DEFAULT_DATA_NAME and not Path(recorded).is_file()):
        return DEFAULT_DATA
    return recorded


def rename(record, column_map: dict):
    """The record with its fields renamed by --column_map."""
    return {column_map.get(k, k): v for k, v in record.items()} if isinstance(record, dict) else record


def normalize_record(record, index: int, source: str, column_map: dict) -> dict:
    """One record as {instruction, input, output}, from Alpaca, Dolly or mapped column names, or a conversation
    (ShareGPT or OpenAI shape) as {messages: [{role, content}, ...]}."""
    if not isinstance(record, dict):
        raise UserError(f"{source}: record {index} is a {type(record).__name__}, not an object with instruction/output fields")
    record = rename(record, column_map)
    if record_shape(record):
        return {"messages": record_messages(record, f"{source}: record {index}")}
    origin = {dst: src for src, dst in column_map.items()}  # to name fields as the file does
    if "output" not in record and "response" in record:
        record = {DOLLY_COLUMNS.get(k, k): v for k, v in record.items()}
        origin.update({dst: src for src, dst in DOLLY_COLUMNS.items()})
    missing = [k for k in ("instruction", "output") if k not in record]
    if missing:
        raise UserError(
            f"{source}: record {index} lacks {' and '.join(missing)} (has {', '.join(sorted(record)) or 'no fields'}); "
            "records need instruction/input/output (Alpaca) or instruction/context/response (Dolly), "
            "or map other names with --column_map"
        )
    out = {k: record.get(k, "") for k in ("instruction", "input", "output")}
    for field, value in out.items():
        check_text(value, f"{source}: record {index} field {origin.get(field, field)!r}")
    return out


def check_text(value, where: str) -> None:
    """Null, numbers or lists where text belongs are mistakes in the data, never silently coerced."""
    if not isinstance(value, str):
        raise UserError(f"{where} should be text, found {'null' if value is None else type(value).__name__}")


def load_records(data_path: str, column_map: Union[None, str, dict] = None) -> list[dict]:
    """Validated {instruction, input, output} records or {messages} conversations; errors name the file and the record."""
    mapping = parse_column_map(column_map)
    raw = load_raw_records(data_path)
    records = [normalize_record(r, i, data_path, mapping) for i, r in enumerate(raw)]
    if not records:
        raise UserError(f"{data_path} holds no records")
    # One shape per data set: a conversation among instruction records is more likely a mistake than a plan.
    shapes = [record_shape(rename(r, mapping)) for r in raw]
    mixed = next((i for i, shape in enumerate(shapes) if shape != shapes[0]), None)
    if mixed is not None:
        raise UserError(f"{data_path}: record {mixed} is {SHAPE_NAMES[shapes[mixed]]} but record 0 is "
                        f"{SHAPE_NAMES[shapes[0]]}; keep each kind of record in its own file")
    return records


def resolve_val_set_size(val_set_size: Optional[float], num_records: int) -> int:
    """Records to hold out: an explicit count or fraction, or the original's 2000 (5% on small sets)."""
    if val_set_size is None:
        return 2000 if num_records >= 40_000 else max(1, num_records // 20) if num_records >= 20 else 0
    size = round(val_set_size * num_records) if 0 < val_set_size < 1 else int(val_set_size)
    if size < 0 or size >= num_records:
        raise UserError(
            f"--val_set_size {val_set_size} leaves no training records ({num_records} records in the data); "
            "use a smaller count, a fraction such as 0.05, or 0 for no validation"
        )
    return size


def render(record: dict, prompter: Prompter, chat: Optional[ChatTemplate] = None) -> dict:
    """The training text and the character spans the loss is on (the loss mask is derived from these): the
    response of an instruction record, every assistant turn of a conversation."""
    if "messages" in record:
        text, spans = chat.assistant_spans(record["messages"])
        return {"text": text, "spans": spans, "conversation": True}
    prompt = prompter.generate_prompt(record["instruction"], record["input"])
    text = prompt + record["output"]
    return {"text": text, "spans": [(len(prompt), len(text))], "conversation": False}


def tokenize_batch(batch: dict, tokenizer, prompter: Prompter, cutoff_len: int, train_on_inputs: bool, add_eos_token: bool,
                   chat: Optional[ChatTemplate] = None) -> dict:
    """Render and tokenize a batch of records; labels are -100 outside the spans unless train_on_inputs. Records
    left with no response token (the response cut off by cutoff_len) are dropped here, not in a second pass, with
    train_on_inputs too: they would teach the prompt alone."""
    rendered = [render(dict(zip(batch, values)), prompter, chat) for values in zip(*batch.values())]
    encodings = encode_batch(tokenizer, [r["text"] for r in rendered], cutoff_len)
    eos = tokenizer.eos_token_id
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for encoding, r in zip(encodings, rendered):
        ids = encoding.ids
        labels = list(ids) if train_on_inputs else span_labels(ids, encoding.offsets, r["spans"])
        answered = reaches_a_span(encoding, r["spans"]) if train_on_inputs else labels.count(IGNORE_INDEX) < len(labels)
        # A conversation's turns end with the template's own end-of-turn marker (in the spans) instead.
        if add_eos_token and not r["conversation"] and len(ids) < cutoff_len and (not ids or ids[-1] != eos):
            ids, labels, answered = ids + [eos], labels + [eos], True  # the EOS is the response's last token
        if not answered:
            continue
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append(labels)
    return out


def encode_batch(tokenizer, texts: list[str], cutoff_len: int) -> list:
    """`texts` tokenized (special tokens added, cut at cutoff_len) by the fast tokenizer's Rust backend itself,
    without transformers' slow wrapping of each result into Python lists. The backend's settings are restored
    afterwards, since the tokenizer is shared: a Generator's padding=True call leaves the backend padding every batch
    to its longest row, which here would put pad tokens inside records."""
    backend = tokenizer.backend_tokenizer
    truncation, padding = backend.truncation, backend.padding
    backend.enable_truncation(cutoff_len)
    backend.no_padding()
    try:
        return backend.encode_batch(texts, add_special_tokens=True)
    finally:
        backend.no_truncation() if truncation is None else backend.enable_truncation(**truncation)
        if padding is not None:
            backend.enable_padding(**padding)


def reaches_a_span(encoding, spans: list[tuple[int, int]]) -> bool:
    """Whether the tokens kept after truncation reach into a span (what span_labels would train on), without
    labelling every token: tokens cover the text in order, so the end of the last one with text decides (asked of
    the Rust encoding for that token alone, not for every token's offsets)."""
    last = len(encoding) - 1
    while last >= 0 and encoding.token_to_chars(last) in (None, (0, 0)):  # trailing special tokens have no text
        last -= 1
    kept = encoding.token_to_chars(last)[1] if last >= 0 else 0
    return any(start < end and start < kept for start, end in spans)


def span_labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """A token is trained on when its characters overlap a span; special tokens such as BOS have empty (0, 0)
    offsets and belong to the prompt."""
    return [t if any(end > s and start < e for s, e in spans) else IGNORE_INDEX for t, (start, end) in zip(ids, offsets)]


def tokenize_records(records, tokenizer, prompter: Prompter, cutoff_len: int, train_on_inputs: bool, add_eos_token: bool,
                     chat: Optional[ChatTemplate] = None):
    """A datasets.Dataset of input_ids/attention_mask/labels, prepared with one batched map; conversations (records
    with "messages") are rendered with `chat`. Records whose response was cut off entirely by cutoff_len teach
    nothing (and would give a NaN loss in a batch of their own), so they are dropped with a message."""
    from datasets import Dataset

    dataset = records if isinstance(records, Dataset) else Dataset.from_list(records)
    # One process: the fast tokenizer already runs on every core; worker processes (num_proc) were slower, their
    # tokenizer threads competing for the same cores.
    kept = dataset.map(
        tokenize_batch,
        batched=True,
        remove_columns=dataset.column_names,
        fn_kwargs=dict(tokenizer=tokenizer, prompter=prompter, cutoff_len=cutoff_len,
                       train_on_inputs=train_on_inputs, add_eos_token=add_eos_token, chat=chat),
        desc="Tokenizing",
    )
    if len(kept) < len(dataset):
        log(f"Dropped {len(dataset) - len(kept)} records whose response lies beyond cutoff_len={cutoff_len} tokens")
    return kept


def split_records(records: list[dict], val_set_size: int, seed: int = 42):
    """(train, val) datasets; val is None when val_set_size is 0. Same split as the original (seed 42)."""
    from datasets import Dataset

    dataset = Dataset.from_list(records)
    if not val_set_size:
        return dataset, None
    split = dataset.train_test_split(test_size=val_set_size, shuffle=True, seed=seed)
    log(f"Data: {len(split['train'])} training and {len(split['test'])} validation records")
    return split["train"], split["test"]
