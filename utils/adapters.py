"""Several adapters on one base in one process (generate.py --lora_weights en=./lora-en,fr=./lora-fr): the form
parsed and checked before any model loads, every adapter loaded onto one PeftModel (unmerged), the models a server
answers as (the base by its own name, each adapter by its own, each with its own prompt and chat template), and the
routing that lets rows of different adapters share one forward pass (PEFT's mixed-adapter batches).

A bare path or Hub id is not this form: it loads one adapter, as before.
"""

import contextlib
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

from utils.cli import UserError

BASE = "__base__"  # PEFT's name for the rows that take no adapter
# An adapter's name is its API model id and PEFT's key for its weights (a ModuleDict key: no dots).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
EXAMPLE = "en=./lora-en,fr=./lora-fr"


@dataclass(frozen=True)
class Served:
    """One model a server answers as: its id (the API's `model`, the demo's choice), PEFT's adapter name for its
    rows (BASE for the base), and the templates its prompts are rendered with."""

    name: str
    adapter: Optional[str]  # None: the one model of a server without the NAME=PATH form
    prompter: object  # utils.prompts.Prompter
    chat: object  # utils.chat.ChatTemplate, None without chat
    parent: Optional[str] = None  # the base's id, for an adapter


def parse(lora_weights: str) -> dict[str, str]:
    """{name: path} of the NAME=PATH form, in order; {} for none, a bare path or a Hub id (one adapter)."""
    value = str(lora_weights or "")
    if not ("=" in value or "," in value) or Path(value).expanduser().exists():
        return {}
    named: dict[str, str] = {}
    for pair in value.split(","):
        name, sep, path = (part.strip() for part in pair.partition("="))
        if not (sep and name and path):
            raise UserError(f"--lora_weights {value}: {pair.strip()!r} is not NAME=PATH; write e.g. {EXAMPLE}")
        if not NAME.fullmatch(name):
            raise UserError(f"--lora_weights: adapter name {name!r} is not a model id: use letters, digits, - and _ "
                            "(starting with a letter or digit)")
        if name in named:
            raise UserError(f"--lora_weights names {name} twice: give each adapter its own name")
        named[name] = path
    return named


def check(named: dict[str, str], batch_mode: bool, backend: str, compile: Optional[bool]) -> None:
    """The NAME=PATH form against the other flags, and each adapter's folder: one line, before any model loads."""
    if not named:
        return
    problems = [
        (batch_mode, "--instruction/--input_file answer with one adapter: pass its path alone as --lora_weights "
                     "(NAME=PATH serves several models to the demo and the API)"),
        (backend == "llama.cpp", "--backend llama.cpp applies one GGUF LoRA per process: serve one adapter (a bare "
                                 "--lora_weights path), or several with --backend transformers"),
        (bool(compile), "--compile compiles one adapter's decoding step; with several adapters each row picks its "
                        "own: drop --compile"),
    ]
    for bad, message in problems:
        if bad:
            raise UserError(message)
    from utils import models
    from utils.methods import adapter_config

    for name, path in named.items():
        models.check_adapter_dir(path)
        check_mixable(name, path, adapter_config(path))  # {} for one on the Hub: load_all checks it once downloaded


def check_mixable(name: str, path: str, config: dict) -> None:
    """PEFT 0.21 refuses DoRA in mixed-adapter batches (adapter_names), so a DoRA adapter cannot share one."""
    if config.get("use_dora"):
        raise UserError(f"adapter {name} ({path}) is DoRA, whose rows PEFT cannot batch with other adapters' "
                        f"(adapter_names): serve it alone (--lora_weights {path}) or merge it into the base")


def base_id(base_model: str) -> str:
    """The id the API and the demo give the base model (and the one served model, without the NAME=PATH form)."""
    from utils.models import EMBEDDED_NAME

    return Path(base_model or EMBEDDED_NAME).name


def check_base(named: dict[str, str], base_model: str) -> None:
    """Every adapter was trained on the served base (as its training_args.json or adapter_config.json names it),
    and none is named as the base is; shapes are models.check_adapter_fits'."""
    from utils.models import embedded_as_empty
    from utils.run_record import RunRecord

    served = same_base(base_model)
    for name, path in named.items():
        if name == base_id(base_model):
            raise UserError(f"--lora_weights: adapter name {name} is the base model's own id (how the API asks for "
                            "the base): name the adapter otherwise")
        trained = RunRecord.read(path).base_model
        if trained is not None and same_base(embedded_as_empty(trained)) != served:
            raise UserError(f"adapter {name} ({path}) was trained on {trained or 'the embedded model'}, not on the "
                            f"served base {base_model or 'the embedded model'}: serve adapters of one base together, "
                            f"and this one alone (--lora_weights {path})")


def same_base(name: str) -> str:
    """A base's name, comparable: a local folder by its resolved path."""
    path = Path(name).expanduser()
    return str(path.resolve()) if name and path.exists() else name


def served_models(named: dict[str, str], base_model: str, prompt_template: str, chat_template: Optional[str],
                  tokenizer) -> dict[str, Served]:
    """The base (its default templates) and each adapter (the templates it was trained with), by id, base first."""
    from utils.chat import trained_chat_template
    from utils.prompts import Prompter, adapter_prompt_template

    base = base_id(base_model)
    served = {}
    for name, path in {base: "", **named}.items():
        prompter = Prompter(adapter_prompt_template(prompt_template, path))
        chat = trained_chat_template(chat_template, path, tokenizer, prompter) if chat_template is not None else None
        served[name] = Served(name, name if path else BASE, prompter, chat, base if path else None)
    return served


def default_model(served: dict[str, Served]) -> Served:
    """What a request that names no model gets: the first adapter (as a lone adapter answers every request)."""
    return next(s for s in served.values() if s.parent is not None)


def load_all(model, named: dict[str, str]):
    """Every adapter onto one PeftModel, unmerged (merged weights could not differ by row), routed per row."""
    from utils.models import load_adapter

    (first, path), *rest = named.items()
    model = load_adapter(model, path, adapter_name=first)
    for name, path in rest:
        model.load_adapter(path, adapter_name=name)
    for name, path in named.items():
        check_mixable(name, path, model.peft_config[name].to_dict())
    route(model)
    return model


# --- which adapter each row takes -------------------------------------------------------------------------------

_rows = threading.local()  # .names: this thread's rows' adapters (a list, one per row), or one for every row


def route(model) -> None:
    """A pre-hook on every LoRA layer that hands PEFT the adapter of each row of the calling thread's forward pass
    (`rows`). PEFT's own per-call hooks (adapter_names=...) sit on the shared modules for a whole generate(), where a
    beam search in another thread (utils.serving.Turns) would impose them on the engine's passes; these read the
    thread's own rows. Without `rows` PEFT applies its active adapter: the first."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import AuxiliaryTrainingWrapper

    for module in model.modules():
        if isinstance(module, (LoraLayer, AuxiliaryTrainingWrapper)):
            module.register_forward_pre_hook(_with_adapter_names, with_kwargs=True)


def _with_adapter_names(module, args, kwargs):
    names = getattr(_rows, "names", None)
    if names is None:
        return None
    rows = len(args[0] if args else kwargs["x"])  # beam search: the prompts' rows times the beams
    return args, {**kwargs, "adapter_names": names if isinstance(names, list) else [names] * rows}


@contextlib.contextmanager
def rows(names: Union[list[str], str, None]) -> Iterator[None]:
    """Within it, this thread's forward passes give row i adapter names[i] (a str: every row that adapter)."""
    before = getattr(_rows, "names", None)
    _rows.names = names
    try:
        yield
    finally:
        _rows.names = before
