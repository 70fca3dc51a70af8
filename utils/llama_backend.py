"""generate.py --backend llama.cpp (docs/serving.md, "llama.cpp backend"): the same demo, batch mode and API, answered
by llama.cpp (llama-cpp-python) from GGUF files, the adapter applied at run time as a GGUF LoRA.

The prompt's token ids, the answer's text, the EOS ids and the choice of each token stay the transformers path's:
greedy is the argmax of llama.cpp's logits, sampling applies transformers' own warpers to them (llama.cpp's own sampler
chain applies top-p before the temperature). A llama_cpp.Llama is not thread-safe: it computes one sequence at a time,
the others wait in utils.serving's queue.
"""

import contextlib
import dataclasses
import hashlib
import sys
import threading
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from utils.cli import UserError
from utils.generation import Completion, Generator, Prepared, Settings, stop_ids
from utils.serving import PREFILL_CHUNK, Engine, Job

DEFAULT_GGUF_TYPE = "f16"  # an exported base: greedy answers as transformers' float32 ones (tests/test_llama_backend.py)
LORA_TYPE = "f32"  # the adapter is small: kept exact
MAX_CONTEXT = 8192  # llama.cpp allocates its KV cache whole at load: a 128K-context base would take gigabytes


# --- the GGUF files -------------------------------------------------------------------------------------------------

def gguf_files(prepared: Prepared, lora_weights: str, gguf_type: str) -> tuple[Path, Optional[Path]]:
    """(the base's GGUF, the adapter's GGUF LoRA or None): files as given, or exports made once into the cache."""
    from utils.models import EMBEDDED_NAME, embedded_gguf

    base = prepared.base_model
    if not gguf_type and base.endswith(".gguf"):
        base_file = Path(base).expanduser()
    elif not gguf_type and base in ("", EMBEDDED_NAME):
        base_file = embedded_gguf()
    else:
        outtype = gguf_type or DEFAULT_GGUF_TYPE
        base_file = cached_export(f"{Path(base or EMBEDDED_NAME).stem}-{outtype}", [prepared.path, outtype],
                                  dict(base_model=base, outtype=outtype))
    if not lora_weights:
        return base_file, None
    lora_file = cached_export(f"{Path(lora_weights).name}-adapter-{LORA_TYPE}", [lora_weights, prepared.path],
                              dict(base_model=base, lora_weights=lora_weights, outtype=LORA_TYPE, adapter_only=True))
    return base_file, lora_file


def fingerprint(items: list[str]) -> str:
    """A short hash of paths (each file's path, size and modification time; a folder's files) or names (Hub ids),
    with the llama.cpp version whose converter writes the files."""
    from utils.llamacpp import runtime_version

    parts = [runtime_version()]
    for item in items:
        path = Path(item).expanduser()
        files = sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path] if path.is_file() else []
        parts += [f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files] or [str(item)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def exports_dir() -> Path:
    from utils.models import cache_root

    return cache_root() / "gguf-exports"


def cached_export(name: str, sources: list[str], args: dict) -> Path:
    """export_gguf.py's file for `args`, made once into the cache (a changed source makes a new one)."""
    from export_gguf import export

    target = exports_dir() / f"{name}-{fingerprint(sources)}.gguf"
    if not target.is_file():
        print(f"Exporting {name} for llama.cpp (once; cached in {target.parent})", file=sys.stderr, flush=True)
        with contextlib.redirect_stdout(sys.stderr):  # --instruction prints its answer alone on stdout
            export(output_file=str(target), overwrite=True, **args)
    return target


# --- the generator and its engine -------------------------------------------------------------------------------------

class LlamaCppGenerator(Generator):
    """Generator's surface over a llama_cpp.Llama (`model`): render, prompt_tokens and check_length are inherited
    (the HF tokenizer's); complete() and the engine decode with llama.cpp. Not Generator.__init__: no torch model."""

    def __init__(self, llm, prepared: Prepared):
        self.model = llm
        self.tokenizer, self.prompter, self.chat = prepared.tokenizer, prepared.prompter, prepared.chat
        self.base_model = prepared.base_model
        self.served = {}  # one GGUF LoRA per process (utils.adapters.check refuses several)
        self.compiled = self.compile_pending = False
        self.lock = threading.Lock()  # one generation at a time in this Llama, whichever engine runs it
        self._eos = eos_ids(prepared)

    @property
    def context_length(self) -> int:
        return self.model.n_ctx()

    def eos_ids(self) -> set[int]:
        return self._eos

    def encode(self, prompts: list[str], max_new_tokens: int) -> dict:
        """The prompt's HF token ids (the engine takes one prompt at a time); too long for the context raises."""
        [prompt] = prompts
        ids = self.token_ids(prompt)
        self.check_length(len(ids), max_new_tokens)
        return {"input_ids": torch.tensor([ids])}

    def stream(self, *args, **kwargs):
        raise NotImplementedError("stream through the server's pool: serving.engine_for(generator, ...).stream(...)")

    def complete(self, prompts: list[str], settings: Settings = Settings(), stop: Optional[threading.Event] = None) -> list[Completion]:
        """Whole answers, one after another, through a private engine (one beam)."""
        engine = LlamaCppEngine(self, max_waiting=len(prompts))
        try:
            return engine.complete(prompts, settings, stop)
        finally:
            engine.close()

    def compile(self, now: bool = True) -> None:
        raise UserError("--compile compiles transformers' decoding step: drop it with --backend llama.cpp")


def eos_ids(prepared: Prepared) -> set[int]:
    """The EOS ids transformers stops at (Generator.eos_ids): the tokenizer's and the generation config's."""
    from transformers import GenerationConfig

    try:
        configured = GenerationConfig.from_pretrained(prepared.path).eos_token_id
    except OSError:  # no generation_config.json
        configured = None
    return stop_ids(prepared.tokenizer, configured)


class LlamaCppEngine(Engine):
    """utils.serving.Engine (its queue, Jobs, sampling, stop strings and finish reasons) over one llama.cpp sequence
    at a time (LlamaRows): the next request waits until the running one has ended (first come, first served)."""

    def __init__(self, generator: LlamaCppGenerator, max_waiting: int, max_running: int = 1):
        # max_running: serving.engine_for passes --concurrency_limit; llama.cpp runs one sequence whatever it is.
        super().__init__(generator, max_running=1, max_waiting=max_waiting, batch=LlamaRows(generator))

    def complete(self, prompts: list[str], settings: Settings = Settings(), stop: Optional[threading.Event] = None,
                 adapter: Optional[str] = None) -> list[Completion]:
        return super().complete(prompts, dataclasses.replace(settings.checked(), num_beams=1), stop, adapter)


@dataclasses.dataclass
class LlamaPrefill:
    jobs: list[Job]
    done: int = 0


class LlamaRows:
    """utils.serving.Batch's surface over llama.cpp's one sequence: its prompt is evaluated PREFILL_CHUNK tokens a
    round, then one token a step. The generator's lock is held from its prefill until its row leaves."""

    def __init__(self, generator: LlamaCppGenerator):
        self.generator, self.llm = generator, generator.model
        self.jobs: list[Job] = []
        self.holder: Optional[Job] = None  # the job whose sequence is in llama.cpp's context

    def start(self, jobs: list[Job]) -> LlamaPrefill:
        return LlamaPrefill(jobs)  # max_running is 1: one job

    def prefill(self, todo: LlamaPrefill) -> Optional[torch.Tensor]:
        [job] = todo.jobs
        if self.holder is not job:
            self.generator.lock.acquire()
            self.holder = job
            self.llm.reset()  # each request evaluates its whole prompt
        ids = job.input_ids[0].tolist()
        end = min(todo.done + PREFILL_CHUNK, len(ids))
        self.llm.eval(ids[todo.done:end])
        todo.done = end
        return self._logits()[None] if end == len(ids) else None

    def join(self, todo: LlamaPrefill) -> None:
        self.jobs = list(todo.jobs)

    def step(self) -> tuple[list, list]:
        [job] = self.jobs
        try:
            self.llm.eval(job.tokens[-1:])
        except Exception as err:  # noqa: BLE001 - this request's own error
            self.remove(job)
            return [], [(job, err)]
        return [(job, self._logits())], []

    def remove(self, job: Job) -> None:
        """The job's row leaves, or its prefill ends: llama.cpp is free for the next one."""
        self.jobs = [j for j in self.jobs if j is not job]
        if self.holder is job:
            self.holder = None
            self.generator.lock.release()

    def _logits(self) -> torch.Tensor:
        """The last position's logits (a copy: llama.cpp reuses its buffer)."""
        import llama_cpp

        llm = self.llm
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        return torch.from_numpy(logits.copy())


LlamaCppGenerator.engine_class = LlamaCppEngine  # what serving.engine_for builds for the demo and the API


def load_llamacpp_generator(base_model: str = "", lora_weights: str = "", prompt_template: str = "",
                            chat_template: Optional[str] = "", gguf_type: str = "", threads: int = 1) -> LlamaCppGenerator:
    """Base (+ adapter) in llama.cpp, ready to answer: what load_generator checks and chooses (utils.generation.
    prepare_model), the GGUF files (gguf_files), then the Llama with the GGUF LoRA applied at run time."""
    import llama_cpp

    from utils.generation import prepare_model
    from utils.models import read_config

    prepared = prepare_model(base_model, lora_weights, prompt_template, chat_template)
    base_file, lora_file = gguf_files(prepared, lora_weights, gguf_type)
    context = min(read_config(prepared.path).get("max_position_embeddings") or MAX_CONTEXT, MAX_CONTEXT)
    print(f"Loading {base_file.name}{' + GGUF LoRA ' + lora_file.name if lora_file else ''} in llama.cpp "
          f"({threads} thread{'s' if threads > 1 else ''}, {context}-token context)", file=sys.stderr, flush=True)
    try:
        llm = llama_cpp.Llama(str(base_file), lora_path=str(lora_file) if lora_file else None, n_ctx=context,
                              n_threads=threads, n_threads_batch=threads, verbose=False)
    except (ValueError, RuntimeError) as err:  # llama.cpp's "Failed to load model from file", an unknown type
        raise UserError(f"llama.cpp could not load {base_file}{' + ' + str(lora_file) if lora_file else ''}: "
                        f"{str(err).splitlines()[0]}") from None
    return LlamaCppGenerator(llm, prepared)
