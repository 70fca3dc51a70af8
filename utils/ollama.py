"""Ollama's Modelfile beside a GGUF export: FROM the file, the conversation template the adapter was trained with as a
Go template over .Messages, its stop strings and its default system prompt, so `ollama create NAME -f FILE` works.

A chat template (a templates/*.json file or the tokenizer's Jinja) is read back turn by turn: rendering a system, a
user and an assistant turn one after another gives each role's text before and after its content, which is all a
turn-by-turn template is (training already requires that, to find the assistant turns).
"""

from pathlib import Path
from typing import Optional

from utils import durable
from utils.chat import ChatTemplate, trained_chat_template
from utils.cli import log

MARK = {"system": "\x00SYSTEM\x00", "user": "\x00USER\x00", "assistant": "\x00ASSISTANT\x00"}
CHECK = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am an alpaca."},
         {"role": "user", "content": "Where do you live?"}]


def turn_formats(chat: ChatTemplate) -> dict[str, tuple[str, str]]:
    """role -> (text before the content, text after it), plus "generation" -> (the prompt for an answer, "")."""
    turns = [{"role": role, "content": MARK[role]} for role in ("system", "user", "assistant")]
    formats, before = {}, ""
    for i, turn in enumerate(turns):
        text = chat.render(turns[: i + 1])
        prefix, _, suffix = text[len(before):].partition(turn["content"])
        formats[turn["role"]] = (prefix, suffix)
        before = text
    prompt = chat.render(turns[:2], add_generation_prompt=True)
    formats["generation"] = (prompt[len(chat.render(turns[:2])):], "")
    return formats


def default_system(chat: ChatTemplate, formats: dict) -> str:
    """The system prompt the template writes when a conversation brings none ("" if it writes none)."""
    user_only = chat.render([{"role": "user", "content": MARK["user"]}])
    head = user_only.split(formats["user"][0] + MARK["user"], 1)[0]
    prefix, suffix = formats["system"]
    return head[len(prefix): len(head) - len(suffix)] if head.startswith(prefix) and head.endswith(suffix) and head else ""


def go_template(formats: dict) -> str:
    """Ollama's TEMPLATE: every message in its role's format, then the prompt for the answer. No {{- trimming: the
    formats' own whitespace is part of the text the model was trained on."""
    cases = "".join(f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{formats[role][0]}{{{{ .Content }}}}'
                    f"{formats[role][1]}" for i, role in enumerate(("system", "user", "assistant")))
    return f"{{{{ range .Messages }}}}{cases}{{{{ end }}}}{{{{ end }}}}{formats['generation'][0]}"


def stop_strings(formats: dict, eos_token: str) -> list[str]:
    """EOS, and the start of a user turn (a model that runs on would begin the next question)."""
    user_start = formats["user"][0].strip()
    return list(dict.fromkeys(s for s in (eos_token, user_start) if s))


def modelfile(gguf_name: str, chat: ChatTemplate, eos_token: str) -> Optional[str]:
    """The Modelfile's text, or None (with a log line) when the template does not render turn by turn."""
    formats = turn_formats(chat)
    system = default_system(chat, formats)
    conversation = ([{"role": "system", "content": system}] if system else []) + CHECK
    rendered = "".join(formats[m["role"]][0] + m["content"] + formats[m["role"]][1] for m in conversation)
    if rendered + formats["generation"][0] != chat.render(CHECK, add_generation_prompt=True):
        log(f"No Modelfile: chat template {chat.name} does not render turn by turn, so Ollama's template cannot "
            "repeat it; write its TEMPLATE by hand")
        return None
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{go_template(formats)}"""']
    lines += [f'PARAMETER stop "{stop}"' for stop in stop_strings(formats, eos_token)]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def write_modelfile(gguf: Path, lora_weights: Optional[str], tokenizer) -> Optional[Path]:
    """NAME.Modelfile beside NAME.gguf (one per file: exports of several types can share a folder)."""
    text = modelfile(gguf.name, trained_chat_template("", lora_weights, tokenizer), tokenizer.eos_token)
    if text:
        durable.write_text(gguf.with_suffix(".Modelfile"), text)
        return gguf.with_suffix(".Modelfile")
    return None
