"""Conversations: ShareGPT and OpenAI records as messages, chat templates, and where the assistant turns lie.

Every conversation becomes a list of {"role": "system" | "user" | "assistant", "content": text}. A ChatTemplate renders
that list as the exact text the model sees: for training, together with the character spans of the assistant turns
(the only tokens the loss is on, unless train_on_inputs); for generation, ending with the prompt for the next answer.
Training data, the demo's chat tab and the OpenAI-compatible API all go through the same functions here.
"""

from typing import Optional

from utils.cli import UserError
from utils.prompts import Prompter, adapter_prompt_template, read_template
from utils.run_record import RunRecord

DEFAULT_CHAT_TEMPLATE = "alpaca_chat"  # for tokenizers that bring no chat template of their own
# Record shapes: the key holding the turns -> (the role key, the text key, accepted role names -> our roles).
SHAPES = {
    "conversations": ("from", "value", {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}),
    "messages": ("role", "content", {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}),
}
SHAPE_NAMES = {
    "conversations": "a ShareGPT conversation (conversations: from/value)",
    "messages": "an OpenAI conversation (messages: role/content)",
    None: "an instruction record (instruction/input/output)",
}


def record_shape(record) -> Optional[str]:
    """"conversations" (ShareGPT), "messages" (OpenAI) or None (an Alpaca/Dolly instruction record)."""
    return next((key for key in SHAPES if isinstance(record, dict) and key in record), None)


def text_of(content) -> Optional[str]:
    """A turn's text: a string, or OpenAI/Gradio content parts [{"type": "text", "text": ...}] joined; None otherwise."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return None


def parse_messages(turns, where: str, shape: str = "messages") -> list[dict]:
    """Validated messages from a record's (or a request's) turns; every problem is one line naming the turn."""
    role_key, text_key, roles = SHAPES[shape]
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{where}: {shape} should be a non-empty list of turns")
    messages = []
    for number, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise UserError(f"{where}, turn {number}: should be an object with {role_key}/{text_key}, found {type(turn).__name__}")
        role = roles.get(turn.get(role_key))
        if role is None:
            raise UserError(f"{where}, turn {number}: unknown role {turn.get(role_key)!r} (known: {', '.join(roles)})")
        text = text_of(turn.get(text_key))
        if text is None:
            found = turn.get(text_key)
            raise UserError(f"{where}, turn {number}: {text_key} should be text, found "
                            f"{'null' if found is None else type(found).__name__}")
        if not text.strip():
            raise UserError(f"{where}, turn {number}: empty {role} turn")
        messages.append({"role": role, "content": text})
    order = [m["role"] for m in messages]
    if "system" in order[1:]:
        raise UserError(f"{where}, turn {order.index('system', 1)}: a system turn can only come first")
    if order[0] == "system":
        order = order[1:]
    if not order or order[0] != "user":  # templates render the answer as a reply: someone has to speak first
        raise UserError(f"{where}: the conversation should start with a user turn (after an optional system turn)")
    return messages


def record_messages(record: dict, where: str) -> list[dict]:
    """A training conversation (ShareGPT or OpenAI shape); a top-level "system" field becomes its system turn."""
    shape = record_shape(record)
    messages = parse_messages(record[shape], where, shape)
    system = record.get("system")
    if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: the conversation has no assistant turn, so there is nothing to learn")
    return messages


def chat_messages(system: str, history: list, message: str) -> list[dict]:
    """A chat front end's conversation: optional system prompt, the earlier turns, the new user message.

    Turns without text (an answer stopped before its first token) are left out rather than refused."""
    earlier = [{"role": t["role"], "content": text_of(t["content"])} for t in history if (text_of(t.get("content")) or "").strip()]
    system_turn = [{"role": "system", "content": system}] if (system or "").strip() else []
    return parse_messages(system_turn + earlier + [{"role": "user", "content": message}], "the chat")


class ChatTemplate:
    """Renders conversations as text; the two kinds below differ only in `render`."""

    name = ""

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        raise NotImplementedError

    def assistant_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The training text and the [start, end) character span of every assistant turn in it.

        A turn's span is found by rendering the conversation up to it twice, ending with the prompt for the answer
        and ending with the answer, so it is right for any template that renders turn by turn. The span keeps the
        template's end-of-turn marker (the model learns to stop) but not the whitespace after it."""
        text = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[: i + 1])
            if not (through.startswith(before) and text.startswith(through)):
                raise UserError(
                    f"chat template {self.name} does not render conversations turn by turn, so the assistant turns "
                    f"cannot be located for the loss; use --chat_template {DEFAULT_CHAT_TEMPLATE} or a template file"
                )
            spans.append((len(before), len(before) + len(through[len(before):].rstrip())))
        return text, spans


class TokenizerChatTemplate(ChatTemplate):
    """The tokenizer's own Jinja chat template (what an instruct model such as SmolLM2 was tuned with)."""

    name = "tokenizer"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        # Some templates (LLaMA-2's) write BOS into the text; a tokenizer that adds BOS itself would double it.
        ids = tokenizer("a")["input_ids"]
        adds_bos = tokenizer.bos_token is not None and bool(ids) and ids[0] == tokenizer.bos_token_id
        self.leading = tokenizer.bos_token if adds_bos else None

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        except Exception as err:  # jinja2's raise_exception, e.g. "roles must alternate user/assistant"
            first = messages[0]["content"][:40] if messages else ""
            raise UserError(f"the tokenizer's chat template refuses the conversation starting {first!r}: {err}") from None
        return text[len(self.leading):] if self.leading and text.startswith(self.leading) else text


class FileChatTemplate(ChatTemplate):
    """A templates/*.json file with "system", "user" and "assistant" turn formats (see templates/README.md)."""

    KEYS = ("system", "user", "assistant")

    def __init__(self, template_name: str, eos_token: str):
        path, self.template = read_template(template_name, "chat template")
        missing = [k for k in self.KEYS if k not in self.template]
        if missing or "{content}" not in self.template["assistant"]:
            raise UserError(f"template {path} lacks {', '.join(missing) or '{content} in assistant'}, so it cannot "
                            "render conversations; see templates/README.md")
        self.name = path.stem
        self.eos_token = eos_token

    def turn(self, role: str, content: str) -> str:
        return self.template[role].format(content=content, eos_token=self.eos_token)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        parts = []
        if self.template.get("default_system") and (not messages or messages[0]["role"] != "system"):
            parts.append(self.turn("system", self.template["default_system"]))
        parts += [self.turn(m["role"], m["content"]) for m in messages]
        if add_generation_prompt:  # the assistant format up to its content: what the model continues from
            parts.append(self.template["assistant"].split("{content}", 1)[0].format(eos_token=self.eos_token))
        return "".join(parts)


class InstructionChatTemplate(FileChatTemplate):
    """An instruction template (alpaca, vigogne, ...) continued turn by turn: how an adapter trained on its records is
    talked to. The preamble is the default system prompt; the first exchange renders exactly as its prompt_no_input."""

    def __init__(self, prompter: Prompter, eos_token: str):
        own = all(key in prompter.template for key in self.KEYS)  # alpaca_chat carries its turns itself
        self.template = prompter.template if own else {**prompter.template, **instruction_turns(prompter.template)}
        self.name = prompter.name
        self.eos_token = eos_token


def instruction_turns(template: dict) -> dict:
    """The system/user/assistant formats of an instruction template: its prompt_no_input split at {instruction} and
    at the response marker (alpaca gives alpaca_chat's). Each answer ends with EOS, as training ends it."""
    head, _, tail = template["prompt_no_input"].partition("{instruction}")
    preamble, _, user = head.rpartition("\n\n")
    between, marker, after = tail.partition(template["response_split"])
    turns = {"system": "{content}\n\n", "user": user + "{content}" + between,
             "assistant": marker + after + "{content}{eos_token}\n\n"}
    if preamble:
        turns["default_system"] = preamble.replace("{{", "{").replace("}}", "}")  # a content, not a format string
    return turns


def trained_chat_template(chat_template: str, lora_weights: Optional[str], tokenizer,
                          prompter: Optional[Prompter] = None) -> ChatTemplate:
    """How conversations with base + adapter are rendered (the Chat tab, the API, Ollama's Modelfile): --chat_template
    when given, else the adapter's own (finetune.py --chat_template); for an adapter trained on instruction records,
    its prompt template (`prompter`, default: the adapter's) continued turn by turn, so that a conversation's first
    exchange is the very prompt it was trained on, with no system prompt of the tokenizer's; with no adapter, or one
    trained on conversations with finetune.py's default, load_chat_template's default."""
    if chat_template or not lora_weights:
        return load_chat_template(chat_template, tokenizer)
    run = RunRecord.read(lora_weights)
    if run.conversations:
        return load_chat_template(run.get("chat_template") or "", tokenizer)
    prompter = prompter or Prompter(adapter_prompt_template("", lora_weights))
    return InstructionChatTemplate(prompter, tokenizer.eos_token)


def load_chat_template(name: str, tokenizer) -> ChatTemplate:
    """"tokenizer" (its own template), a template name or .json path; empty: the tokenizer's if any, else alpaca_chat."""
    has_own = bool(getattr(tokenizer, "chat_template", None))
    name = name or ("tokenizer" if has_own else DEFAULT_CHAT_TEMPLATE)
    if name == "tokenizer":
        if not has_own:
            raise UserError(f"--chat_template tokenizer: this tokenizer has no chat template; "
                            f"use --chat_template {DEFAULT_CHAT_TEMPLATE} (or another template in templates/)")
        return TokenizerChatTemplate(tokenizer)
    return FileChatTemplate(name, tokenizer.eos_token)
