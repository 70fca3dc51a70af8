"""Text generation shared by generate.py's demo and batch mode (and any later front end: chat, an HTTP API).

Everything here works on an already-rendered prompt string, so a front end only has to render its own prompt
(an Alpaca template, a chat template) and call `Generator.stream` or `Generator.complete`.
"""

import contextlib
import dataclasses
import functools
import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer
from transformers.utils.chat_template_utils import encode_marked_chat, mark_control_tokens

from utils.cli import UserError
from utils.prompts import Prompter, adapter_prompt_template, read_template


@dataclass(frozen=True)
class Settings:
    """Decoding settings; the defaults are the original demo's."""

    temperature: float = 0.1
    top_p: float = 0.75
    top_k: int = 40
    num_beams: int = 4
    max_new_tokens: int = 128
    no_repeat_ngram_size: int = 0  # 0: off, as in the original; generate.py's command-line answers set 3

    def checked(self) -> "Settings":
        """These settings with each field of its declared type: a browser sends any slider's value as an int or a
        float (1 for 1.0, 40.0 for 40), and transformers refuses an int temperature. A value that breaks its rule
        (utils/checks.py, the same rules as the command-line flags) raises a one-line UserError."""
        from utils.checks import check_values

        for name in ("top_k", "num_beams", "max_new_tokens", "no_repeat_ngram_size"):
            value = getattr(self, name)
            if isinstance(value, float) and not value.is_integer():
                raise UserError(f"{name} must be a whole number, not {value!r}")
        check_values(dataclasses.asdict(self), flag=False)
        return dataclasses.replace(self, temperature=float(self.temperature), top_p=float(self.top_p),
                                   top_k=int(self.top_k), num_beams=int(self.num_beams),
                                   max_new_tokens=int(self.max_new_tokens),
                                   no_repeat_ngram_size=int(self.no_repeat_ngram_size))

    def generate_kwargs(self) -> dict:
        """model.generate() arguments. Temperature 0 means greedy (or plain beam search); above 0 it samples.

        The original passed temperature without do_sample, so transformers silently ignored it; here it acts."""
        kwargs = dict(max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, do_sample=self.temperature > 0)
        if self.no_repeat_ngram_size:
            kwargs["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        if kwargs["do_sample"]:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:  # unset, so a model's own sampling defaults do not draw "flags will be ignored" warnings
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


@dataclass
class Completion:
    """One finished answer; finish_reason is "stop" (EOS), "length" (max_new_tokens) or "cancelled"."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


# What the server prints once its compiled decoding step is in use (benchmarks/bench_start.py waits for it).
COMPILED_LINE = "Compiled decoding step in use"


class PromptTooLong(UserError):
    """The prompt plus max_new_tokens does not fit in the model's context window."""


class StopOnEvent(StoppingCriteria):
    """Ends generation (every beam, every row) once `event` is set: how one request is stopped, and only that one."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class Generator:
    """A loaded model, its tokenizer and prompt template, ready to answer (thread-safe: one per server).

    User text goes into prompts through `render` and `render_chat`, which mark the special tokens a user typed
    (transformers' mark_control_tokens) so that `token_ids` encodes them as plain text: only the templates' own
    markers become special tokens, and no user can forge a turn by typing `<|im_start|>assistant`."""

    # A fast tokenizer keeps its padding and split_special_tokens settings in one object that every call sets, so
    # two threads tokenizing at once (the API's worker encodes, the engine decodes) can each get the other's
    # settings. Every use of a tokenizer here holds this lock: tokenizing costs little next to a forward pass.
    tokenizer_lock = threading.RLock()

    def __init__(self, model, tokenizer, prompter: Prompter):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"  # batched generation appends new tokens on the right of every row
        self.prompter = prompter
        self.chat = None  # a ChatTemplate for conversations, when load_generator was given one
        self.base_model = ""  # the base's name as chosen (models.choose_base_model), "" for the embedded model
        # --lora_weights NAME=PATH: the models served by id, base first (utils.adapters.Served); {}: one model
        self.served: dict = {}
        self.compiled = False  # whether the compiled one-sequence decoding step (compile()) is in use
        # load_generator(compile_in_background=True): the server's Engine.compile_in_background compiles it
        self.compile_pending = False
        self._here = threading.local()  # .compiled: this thread uses the compiled step before it is in use

    def compile(self, now: bool = True) -> None:
        """Compile the one-token decoding step of one sequence (what streaming, the API and --instruction run).
        Prompts, beams and batches stay eager: their shapes would each cost a compilation in the middle of serving.

        now: warm it up and put it in use before returning, so that no request waits for the compiler. False: only
        a thread inside `compiled_here()` (a warm-up) uses it until `compiled` is set, which each forward pass reads
        once: how a server puts it in use between two steps while it answers (serving.Engine.compile_in_background);
        the calling thread then compiles at the lowest CPU priority (`lowest_priority`)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        if not now:
            lowest_priority()

        model = unwrapped(self.model)
        eager, on_cpu = model.forward, self.model.device.type == "cpu"
        if on_cpu:
            # Weights become constants that inductor repacks for oneDNN's matrix-vector kernels: the main gain on CPU.
            # (A process-wide setting, read while tracing; it applies to no_grad graphs only.)
            torch._inductor.config.freezing = True

        def step(*args, **kwargs):
            # On CPU, attention for one query as plain matmuls, which inductor fuses: the flash kernel's set-up
            # costs more than the work for a single token.
            with sdpa_kernel(SDPBackend.MATH) if on_cpu else contextlib.nullcontext():
                return eager(*args, **kwargs)

        compiled = torch.compile(step, dynamic=True)  # one graph for every cache length

        @functools.wraps(eager)  # generate() reads the signature (logits_to_keep) through __wrapped__
        def forward(*args, **kwargs):
            ids = kwargs.get("input_ids")
            one_token = ids is not None and tuple(ids.shape) == (1, 1) and not torch.is_grad_enabled()
            in_use = self.compiled or getattr(self._here, "compiled", False)
            return (compiled if one_token and in_use else eager)(*args, **kwargs)

        model.forward = forward
        if now:
            self.compiled = True
            self.complete([self.render("Hi.")], Settings(temperature=0, num_beams=1, max_new_tokens=3))

    @contextlib.contextmanager
    def compiled_here(self) -> Iterator[None]:
        """Within it, this thread's one-token steps go through the compiled step even before it is in use."""
        self._here.compiled = True
        try:
            yield
        finally:
            self._here.compiled = False

    @property
    def context_length(self) -> Optional[int]:
        """Tokens the model can attend to (prompt + answer), None when the config does not say."""
        return getattr(self.model.config, "max_position_embeddings", None)

    def render(self, instruction: str, input: str = "", prompter: Optional[Prompter] = None) -> str:
        """The template's prompt (`prompter`'s, default: the served model's) for an instruction and optional input
        (a user's text: see `plain`)."""
        prompter = prompter or self.prompter
        return prompter.generate_prompt(self.plain(instruction), self.plain(input or "") or None)

    @property
    def default_adapter(self) -> Optional[str]:
        """With several models served, the adapter of a request that names none (utils.adapters.default_model)."""
        from utils.adapters import default_model

        return default_model(self.served).adapter if self.served else None

    def render_chat(self, chat, messages: list[dict]) -> str:
        """The prompt for the answer to a conversation, rendered by `chat` (a utils.chat.ChatTemplate); every
        message's text is a user's (see `plain`), the API's assistant and system turns included."""
        return chat.render(mark_control_tokens(messages, self.special_tokens), add_generation_prompt=True)

    def plain(self, text: str) -> str:
        """`text` with the tokenizer's special tokens in it marked, so that `token_ids` encodes them as plain text."""
        return mark_control_tokens(text, self.special_tokens)

    @functools.cached_property
    def special_tokens(self) -> re.Pattern:
        """What `plain` marks: the tokenizer's special tokens, the longest first (as transformers matches them)."""
        with self.tokenizer_lock:
            tokens = [t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special]
        return re.compile("|".join(map(re.escape, sorted(tokens, key=len, reverse=True))) or "(?!)")

    def token_ids(self, prompt: str) -> list[int]:
        """A rendered prompt's token ids, with the tokens the tokenizer adds itself (LLaMA's BOS); what `plain`
        marked is plain text (transformers' encode_marked_chat)."""
        with self.tokenizer_lock:
            ids = encode_marked_chat(self.tokenizer, prompt)
        before, after = self.added_around
        return before + ids + after

    @functools.cached_property
    def added_around(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer adds before and after a text by itself (LLaMA's BOS), found around one letter."""
        with self.tokenizer_lock:
            around = self.tokenizer("a")["input_ids"]
            bare = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        start = next(i for i in range(len(around)) if around[i:i + len(bare)] == bare)
        return around[:start], around[start + len(bare):]

    def decode(self, ids, **kwargs) -> str:
        """tokenizer.decode under the tokenizer lock (also what TextStream's streamer calls)."""
        with self.tokenizer_lock:
            return self.tokenizer.decode(ids, **kwargs)

    def encode(self, prompts: list[str], max_new_tokens: int) -> dict:
        """Left-padded input tensors on the model's device; a prompt that leaves no room for the answer raises."""
        rows = [torch.tensor(self.token_ids(prompt), dtype=torch.long) for prompt in prompts]
        for row in rows:
            self.check_length(len(row), max_new_tokens)
        ids, mask = self.left_padded(rows)
        return {"input_ids": ids, "attention_mask": mask}

    def left_padded(self, rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token id rows as one left-padded batch and its attention mask, as `encode` pads prompts."""
        length = max(len(row) for row in rows)
        ids = torch.full((len(rows), length), self.tokenizer.pad_token_id, dtype=torch.long, device=self.model.device)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, length - len(row):], mask[i, length - len(row):] = row, 1
        return ids, mask

    def check_length(self, prompt_tokens: int, max_new_tokens: int) -> None:
        limit = self.context_length
        if limit is not None and prompt_tokens + max_new_tokens > limit:
            raise PromptTooLong(
                f"the prompt is {prompt_tokens} tokens; with {max_new_tokens} new tokens that exceeds the model's "
                f"{limit}-token context: shorten the instruction or input to at most {max(0, limit - max_new_tokens)} tokens"
            )

    def prompt_tokens(self, prompt: str) -> int:
        return len(self.token_ids(prompt))

    def within_context(self, prompt: str, settings: Settings) -> Settings:
        """`settings` with max_new_tokens cut to the room the prompt leaves in the context: what the demo's slider,
        which offers up to the whole context, can only mean. A prompt that leaves no room raises PromptTooLong."""
        tokens, limit = self.prompt_tokens(prompt), self.context_length
        if limit is None or tokens >= limit:
            self.check_length(tokens, settings.max_new_tokens)
            return settings
        return dataclasses.replace(settings, max_new_tokens=min(settings.max_new_tokens, limit - tokens))

    def stream(self, prompt: str, settings: Settings = Settings(), stop: Optional[threading.Event] = None) -> "TextStream":
        """Start generating from a rendered prompt in a background thread; iterate the result for text pieces.

        Streaming decodes one sequence as it grows, so it always uses one beam (num_beams is ignored).
        Setting `stop` (or calling TextStream.stop) ends the generation after the current token."""
        settings = dataclasses.replace(settings.checked(), num_beams=1)
        return TextStream(self, self.encode([prompt], settings.max_new_tokens), settings, stop or threading.Event())

    def complete(self, prompts: list[str], settings: Settings = Settings(), stop: Optional[threading.Event] = None) -> list[Completion]:
        """Answers to a batch of rendered prompts (beam search allowed); only the new tokens are decoded."""
        settings = settings.checked()
        inputs = self.encode(prompts, settings.max_new_tokens)
        stop = stop or threading.Event()
        output = self.model.generate(**inputs, **self.generation_args(settings, stop))
        return [self.completion(row, inputs, i, settings, stop) for i, row in enumerate(output)]

    def generation_args(self, settings: Settings, stop: threading.Event) -> dict:
        return dict(
            **settings.generate_kwargs(),
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=sorted(self.eos_ids()),  # the tokenizer's EOS, which adapters are trained to emit
            stopping_criteria=StoppingCriteriaList([StopOnEvent(stop)]),
        )

    def completion(self, row: torch.Tensor, inputs: dict, index: int, settings: Settings, stop: threading.Event) -> Completion:
        """Decode the new tokens of one output row, up to and including its first EOS."""
        new = row[inputs["input_ids"].shape[1]:].tolist()
        eos = self.eos_ids()
        end = next((i + 1 for i, t in enumerate(new) if t in eos), None)
        if end is not None:
            reason = "stop"
        elif stop.is_set() and len(new) < settings.max_new_tokens:
            reason = "cancelled"
        else:
            reason = "length"
        new = new[:end]
        return Completion(
            text=self.decode(new, skip_special_tokens=True).strip(),
            prompt_tokens=int(inputs["attention_mask"][index].sum()),
            completion_tokens=len(new),
            finish_reason=reason,
        )

    def eos_ids(self) -> set[int]:
        """The tokenizer's EOS plus any the model's generation config adds (some chat models have several)."""
        return stop_ids(self.tokenizer, getattr(self.model.generation_config, "eos_token_id", None))


def stop_ids(tokenizer, configured) -> set[int]:
    """The tokenizer's EOS id plus the generation config's `eos_token_id` (an id, a list of them, or None)."""
    ids = configured if isinstance(configured, list) else [configured]
    return {i for i in [tokenizer.eos_token_id, *ids] if i is not None}


class TextStream:
    """One streamed generation: iterate for decoded text pieces; `stop()` ends it early; use it as a context manager
    so that leaving the loop for any reason (a user's stop, a closed connection) stops the background thread."""

    def __init__(self, generator: Generator, inputs: dict, settings: Settings, stop: threading.Event):
        self.generator, self.inputs, self.settings, self.stop_event = generator, inputs, settings, stop
        # The generator as the streamer's tokenizer: the streamer only calls decode, which then holds the lock.
        self.streamer = TextIteratorStreamer(generator, skip_prompt=True, skip_special_tokens=True)
        self.error: Optional[BaseException] = None
        self.completion: Optional[Completion] = None  # set once the generation has finished
        self.thread = threading.Thread(target=self._generate, daemon=True)
        self.thread.start()

    def _generate(self) -> None:
        try:
            args = self.generator.generation_args(self.settings, self.stop_event)
            output = self.generator.model.generate(**self.inputs, **args, streamer=self.streamer)
            self.completion = self.generator.completion(output[0], self.inputs, 0, self.settings, self.stop_event)
        except BaseException as err:  # re-raised in the consuming thread, which would otherwise wait forever
            self.error = err
            self.streamer.end()

    def __iter__(self) -> Iterator[str]:
        try:
            yield from self.streamer
        finally:  # also when the consumer leaves the loop early
            self.stop()
        self.thread.join()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self.stop_event.set()

    def __enter__(self) -> "TextStream":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        self.thread.join()


def unwrapped(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lowest_priority() -> None:
    """Run this thread, and the threads and compiler processes it starts from now on, only on CPU time that nothing
    else wants (nice 19; on Linux a thread's own). A compile in the background shares the cores with the answers
    being decoded: on 2 cores without native bf16 it took one from fp32 decoding for minutes
    (benchmarks/bench_serving.py --at_start)."""
    with contextlib.suppress(AttributeError, OSError):  # no per-thread priority (not Linux): compile as before
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def physical_cores() -> int:
    """The cores this process may run on, hyper-threads counted once."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    try:
        return len({Path(f"/sys/devices/system/cpu/cpu{c}/topology/core_cpus_list").read_text() for c in cpus})
    except OSError:
        return len(cpus)


def decoding_threads(serving: bool) -> int:
    """Threads for the model on CPU: every physical core, less one while serving. A streamed token wakes the
    threads that carry it to the user (the streamer, the server); with every core computing they stall each step
    (2 cores: 51 tokens/s with 1 thread, 30 with 2)."""
    return max(1, physical_cores() - serving)


def has_cpp_compiler() -> bool:
    """Whether torch.compile can build its CPU kernels, which it does with a C++ compiler (g++, clang++)."""
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except Exception:  # noqa: BLE001 - torch's own "no compiler" error (InvalidCxxCompiler) or a missing helper
        return False
    return True


def compile_decoding(asked: Optional[bool], default: bool) -> bool:
    """--compile as asked, else `default`, on a CPU only where a C++ compiler exists (a slim Docker image has none):
    without one torch.compile fails at the first token."""
    if asked is None:
        if default and not has_cpp_compiler():
            print("No C++ compiler (g++): the decoding step is not compiled; install one for up to 1.8x faster answers",
                  file=sys.stderr, flush=True)
            return False
        return default
    if asked and not has_cpp_compiler():
        raise UserError("--compile needs a C++ compiler to build torch.compile's CPU kernels: install g++ "
                        "(apt-get install g++) or drop --compile")
    return asked


def load_generator(base_model: str = "", lora_weights: str = "", quantization: str = "none", device: str = "auto",
                   prompt_template: str = "", chat_template: Optional[str] = "", dtype: Optional[torch.dtype] = None,
                   compile: bool = False, compile_in_background: bool = False) -> Generator:
    """Base model (+ LoRA adapter) ready to generate; every user mistake raises a one-line UserError first.

    What is left empty is what the adapter was trained with: the base (models.choose_base_model), the prompt template
    (else alpaca) and the chat template (chat.trained_chat_template) with which `generator.chat` renders
    conversations; `chat_template` None: no chat. `dtype`: the unquantized weights' dtype (default: full precision on
    CPU, models.pick_dtype on GPUs); `compile`: Generator.compile, now, or with `compile_in_background` later, by the
    server that answers meanwhile (serving.Engine.compile_in_background)."""
    from utils import adapters, models

    device = models.pick_device(device)
    quantization = models.pick_quantization(quantization, device)
    prepared = prepare_model(base_model, lora_weights, prompt_template, chat_template)
    dtype = dtype or models.load_dtype(device)
    print(f"Loading {prepared.base_model or 'the embedded SmolLM2-135M-Instruct'}"
          f"{' + adapter ' + lora_weights if lora_weights else ''} on {device} "
          f"({str(dtype).removeprefix('torch.') if quantization == 'none' else quantization})", file=sys.stderr, flush=True)
    model = models.load_model(prepared.path, quantization, device, dtype=dtype)
    if prepared.served:
        model = adapters.load_all(model, adapters.parse(lora_weights))
    elif lora_weights:
        try:
            model = models.load_adapter(model, lora_weights)
        except (OSError, ValueError) as err:  # a hub id that is absent or unreachable, a malformed config
            raise UserError(f"could not load adapter '{lora_weights}': {str(err).splitlines()[0]}") from None
    generator = Generator(model, prepared.tokenizer, prepared.prompter)
    generator.chat = prepared.chat
    generator.base_model = prepared.base_model
    generator.served = prepared.served
    if compile and compile_in_background:
        print("The decoding step compiles in the background: answers are uncompiled until it is in use",
              file=sys.stderr, flush=True)
        generator.compile_pending = True
    elif compile:
        print("Compiling the decoding step (once, at start)", file=sys.stderr, flush=True)
        generator.compile()
    return generator


@dataclass
class Prepared:
    """What every backend needs before it loads weights: the base as chosen and its loadable path, the tokenizer,
    the prompt template and the chat template (None: no chat)."""

    base_model: str
    path: str
    tokenizer: object
    prompter: Prompter
    chat: object
    served: dict  # --lora_weights NAME=PATH: utils.adapters.served_models; {} for one model


def prepare_model(base_model: str, lora_weights: str, prompt_template: str, chat_template: Optional[str]) -> Prepared:
    """Choose the base, check the adapter fits it (from shapes alone) and load the tokenizer and templates: the
    user's mistakes fail here, in seconds, before any weights load. With NAME=PATH adapters the first one leads (the
    base it was trained on, the default templates) and every one is checked against the base."""
    from utils import adapters, models
    from utils.chat import trained_chat_template

    named = adapters.parse(lora_weights)
    lora_weights = next(iter(named.values()), lora_weights)

    if chat_template not in (None, "", "tokenizer"):
        read_template(chat_template, "chat template")  # a typo fails now, not after the model has loaded
    if lora_weights:
        models.check_adapter_dir(lora_weights)  # before the slow part: a typo fails in a second
    prompter = Prompter(adapter_prompt_template(prompt_template, lora_weights))
    base_model = models.choose_base_model(base_model, lora_weights)
    path = models.resolve_base_model(base_model)
    adapters.check_base(named, base_model)
    for adapter in list(named.values()) or ([lora_weights] if lora_weights else []):
        models.check_adapter_fits(path, adapter)
    tokenizer = models.load_tokenizer(path)
    chat = trained_chat_template(chat_template, lora_weights, tokenizer, prompter) if chat_template is not None else None
    served = adapters.served_models(named, base_model, prompt_template, chat_template, tokenizer) if named else {}
    return Prepared(base_model, path, tokenizer, prompter, chat, served)
