"""Command-line plumbing shared by every script: flags checked before anything runs, help, one-line errors.

The flags keep fire's syntax (`--name value`, `--name=value`, `--flag` / `--noflag`, lists as `[a,b]`), which the
original's users know, and every entry is a plain function of keyword arguments (`fire.Fire(train)` still works on
it). The command line is parsed once, here, against the entry's signature and type hints, and the entry is called
with the values: fire itself reports an unknown flag only after the function has returned (after a whole training
run), lets a repeated flag win silently, and turns values into whatever they look like (`--bf16 maybe` is the
string "maybe").
"""

import difflib
import inspect
import logging
import os
import re
import sys
import typing
import warnings
from contextlib import suppress
from pathlib import Path
from typing import Any, Callable, Optional

# On CPUs with AVX512-BF16, importing bitsandbytes (which transformers' Trainer does) warns that an optional fast
# 4-bit kernel could not be fetched from the Hugging Face Hub and tells the user to install `kernels`. Its built-in
# CPU kernel works without it, and fetching would need the network: the warning is noise in every one-line error.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# peft 0.21 still asks every model for the renamed `is_gradient_checkpointing`: a warning about peft's code that a
# user of these scripts can do nothing about, printed on every run.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
# With deepspeed installed (for the ZeRO configs), accelerate imports it on every run, and on a machine without a GPU
# deepspeed warns that it "was unable to detect" one: true, expected, and nothing to act on. Its other logs stay.
logging.getLogger("DeepSpeed").addFilter(lambda record: "Setting accelerator to CPU" not in record.getMessage())

REPO = Path(__file__).resolve().parent.parent
TRUE, FALSE = ("true", "yes", "1"), ("false", "no", "0")


class UserError(Exception):
    """A problem with the user's input or environment: printed as one line, never as a traceback."""


def is_main_process() -> bool:
    """True on the only process, or on rank 0 under torchrun/accelerate."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) == 0


def log(*args: Any) -> None:
    """print() on the main process only, so torchrun ranks do not repeat every line."""
    if is_main_process():
        print(*args, flush=True)


def check_writable(path: str, flag: str) -> None:
    """Prove files can be written at `path` (a directory, existing or to be made) without creating anything, so a
    mistake found later leaves no trace: probe its nearest existing ancestor with an unnamed temporary file."""
    import tempfile

    target = Path(path).expanduser().absolute()
    existing = next(p for p in [target, *target.parents] if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, f"{existing} is a file")
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as err:
        raise UserError(f"--{flag} {path} is not writable ({err.strerror})") from None


def run(entry: Callable, argv: Optional[list[str]] = None) -> None:
    """Parse and type-check the flags, then call `entry` with them (each entry checks its values' ranges first,
    with utils/checks.py); a UserError anywhere is `error: ...` on stderr and exit status 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    path = Path(sys.argv[0]).resolve()
    script = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name  # as run from the repository
    try:
        if "--help" in argv or "-h" in argv:
            print(help_text(entry, script))
            return
        entry(**parse_flags(entry, argv, script))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


# --- parsing ------------------------------------------------------------------------------------------------------

def is_flag(token: str) -> bool:
    """fire's rule: --name or -x, but not a negative number such as -1 or -0.5."""
    return token.startswith("--") or re.match(r"^-[a-zA-Z]", token) is not None


def parse_flags(entry: Callable, argv: list[str], script: str = "the script") -> dict:
    """The entry's keyword arguments from argv, each converted to its parameter's type; any mistake raises."""
    params = inspect.signature(entry).parameters
    kwargs, given = {}, {}
    index = 0
    while index < len(argv):
        token = argv[index]
        if not is_flag(token):
            raise UserError(f"unexpected argument {token!r}: settings are flags such as --{next(iter(params))} VALUE "
                            f"(python {script} --help lists them)")
        key, has_value, value = token.lstrip("-").partition("=")
        key = key.replace("-", "_")
        bare = not has_value and (index + 1 == len(argv) or is_flag(argv[index + 1]))
        name = key[2:] if bare and key.startswith("no") and key not in params and key[2:] in params else key
        if name not in params:
            raise UserError(unknown_flag(token.partition("=")[0], params, script))
        annotation = params[name].annotation
        if bare:
            if bool not in type_options(annotation):
                raise UserError(f"--{name} needs a value, e.g. --{name} {example(params[name])}")
            value = "False" if name != key else "True"
        elif not has_value:
            index += 1
            value = argv[index]
        if name in given:
            raise UserError(f"--{name} is given twice ({given[name]} and {value}): give it once")
        given[name] = value
        kwargs[name] = convert(name, value, annotation)
        index += 1
    return kwargs


def unknown_flag(flag: str, params, script: str) -> str:
    key = flag.lstrip("-").replace("-", "_")
    close = difflib.get_close_matches(key, list(params), n=1, cutoff=0.6)
    hint = f"did you mean --{close[0]}?" if close else f"python {script} --help lists the flags"
    return f"unknown flag {flag}: {hint}"


def type_options(annotation) -> list:
    """The plain types a parameter accepts: Optional[float] -> [NoneType, float], Union[str, list[str]] -> [str, list]."""
    if annotation is inspect.Parameter.empty:
        return [str]
    options = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Union else (annotation,)
    return [typing.get_origin(o) or o for o in options]


def convert(name: str, raw: str, annotation) -> Any:
    """One flag's text as its parameter's type, or a one-line error saying what was expected."""
    options = type_options(annotation)
    text = raw.strip()
    if type(None) in options and text in ("None", "none", ""):
        return None
    if bool in options and text.lower() in TRUE + FALSE:
        return text.lower() in TRUE
    for kind in (int, float):
        if kind in options:
            with suppress(ValueError):
                return kind(text)
    if list in options and text.startswith("["):
        return [part.strip().strip("'\"") for part in text.strip("[]").split(",") if part.strip()]
    if dict in options and text.startswith("{"):
        import ast

        try:
            return dict(ast.literal_eval(text))
        except (ValueError, SyntaxError, TypeError):
            raise UserError(f"--{name} {raw!r} is not a valid mapping such as {{'question': 'instruction'}}") from None
    if str in options:
        return raw
    expected = {bool: "True or False", int: "a whole number", float: "a number"}
    wanted = " or ".join(expected.get(o, o.__name__) for o in options if o is not type(None))
    raise UserError(f"--{name} takes {wanted}, not {raw!r}")


# --- help ---------------------------------------------------------------------------------------------------------

def shown(value) -> str:
    """A default as a user would type it: paths inside the repository relative to it, lists as [a,b]."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(str, value)) + "]"
    text = str(value)
    return text.replace(f"{REPO}{os.sep}", "") if text.startswith(str(REPO)) else text


def example(param: inspect.Parameter) -> str:
    return shown(param.default) if param.default not in ("", None, inspect.Parameter.empty) else "VALUE"


def type_name(annotation) -> str:
    names = {bool: "BOOL", int: "INT", float: "FLOAT", str: "TEXT", list: "LIST", dict: "MAP"}
    options = [o for o in type_options(annotation) if o is not type(None)]
    return "|".join(dict.fromkeys(names.get(o, "TEXT") for o in options))


# Help that several scripts share, written once: a docstring says {NAME}. BASE_MODEL is utils.models.choose_base_model's
# rule (not imported from there: --help loads nothing).
SHARED_HELP = {
    "BASE_MODEL": "Hub id, local HF directory or .gguf file; default: $BASE_MODEL, else the base the adapter was trained "
                  "on (its training_args.json or adapter_config.json), else the embedded SmolLM2-135M-Instruct.",
}


def flag_help(entry: Callable) -> dict:
    """name -> help line, from the Args section of the entry's docstring (with SHARED_HELP filled in)."""
    doc = inspect.getdoc(entry) or ""
    for name, text in SHARED_HELP.items():
        doc = doc.replace(f"{{{name}}}", text)
    return dict(re.findall(r"^\s{4}(\w+): (.*)$", doc.split("Args:", 1)[-1], re.M))


def help_text(entry: Callable, script: str) -> str:
    """Usage, the entry's summary and every flag with its type, default and meaning."""
    doc = (inspect.getdoc(entry) or "").split("Args:", 1)[0].strip()
    helps = flag_help(entry)
    lines = [f"usage: python {script} [--FLAG VALUE ...]", "", doc, "", "flags:"]
    for name, param in inspect.signature(entry).parameters.items():
        if name.startswith("_"):  # internal (a benchmark's child process), not for users
            continue
        default = "" if param.default in ("", None) else f" (default: {shown(param.default)})"
        lines += [f"  --{name} {type_name(param.annotation)}{default}", f"      {helps.get(name, '')}"]
    lines += ["", "Booleans: --FLAG alone means True, --noFLAG False. Unknown or repeated flags are errors."]
    return "\n".join(lines)
