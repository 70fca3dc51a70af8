"""The server's one pool of generations: a bounded FIFO queue in front of a batch of running sequences that share
every forward pass (continuous batching over a left-padded cache), each streamed to its own client.

The demo's tabs and the OpenAI-compatible API both submit here, so `max_running` bounds what the model computes at
once whoever asks. A request joins the batch at the next step boundary: its prompt is prefilled alone (as an
unbatched generation would), its cache is left-padded to the batch's length and appended as a new row. A row leaves
the batch when it ends (EOS, a stop string, its max_tokens, or a stop/disconnect), and the padding columns no row
needs any more are trimmed. Beam search does not fit this loop: such requests run whole, between two steps.
"""

import asyncio
import contextlib
import dataclasses
import sys
import threading
import time
import traceback
from collections import deque
from concurrent.futures import Future
from typing import AsyncIterator, Callable, Iterator, Optional, Sequence

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from utils.cli import UserError
from utils.generation import COMPILED_LINE, Completion, Generator, Settings, unwrapped


class QueueFull(UserError):
    """Every running slot is taken and the queue is at its bound: the request is turned away, to retry later."""


_in_flight = threading.local()  # the jobs whose rows the current forward pass computes, in row order


def rows_in_flight() -> Optional[list["Job"]]:
    """In the engine's thread, during a forward pass: the job of each row (tests script answers per row with it)."""
    return getattr(_in_flight, "rows", None)


class Job:
    """One streamed generation. Iterate it (or `async for` over `job.pieces()`) for text pieces; `completion` is set
    once it has ended; `stop()` ends it, whether it still waits in the queue or runs."""

    def __init__(self, prompt: str, input_ids: torch.Tensor, settings: Settings, stop_strings: Sequence[str],
                 stop: threading.Event):
        self.prompt, self.input_ids, self.settings = prompt, input_ids, settings
        self.stop_strings = [s for s in stop_strings if s]
        self.stop_event = stop
        self.tokens: list[int] = []
        self.text = ""  # the answer decoded so far, cut at a stop string
        self.sent = 0  # characters of `text` handed out as pieces
        self.completion: Optional[Completion] = None
        self.error: Optional[BaseException] = None
        self.warp = warpers(settings)
        self._changed = threading.Condition()
        self._wakers: list[Callable[[], None]] = []

    @property
    def done(self) -> bool:
        return self.completion is not None or self.error is not None

    def stop(self) -> None:
        self.stop_event.set()

    def _notify(self) -> None:
        with self._changed:
            self._changed.notify_all()
            wakers = list(self._wakers)
        for wake in wakers:
            wake()

    def _ready(self) -> str:
        """Text not yet handed out that no stop string could still claim."""
        end = len(self.text) if self.done else safe_end(self.text, self.stop_strings)
        return self.text[self.sent:end]

    def _take(self) -> tuple[str, bool]:
        """The next piece, and whether it is the last (under self._changed)."""
        piece = self._ready()
        self.sent += len(piece)
        return piece, self.done and not self._ready()

    def __iter__(self) -> Iterator[str]:
        finished = False
        try:
            while not finished:
                with self._changed:
                    self._changed.wait_for(lambda: self.done or self._ready())
                    piece, finished = self._take()
                if piece:
                    yield piece
        finally:  # also when the consumer leaves the loop early
            self.stop()
        if self.error is not None:
            raise self.error

    async def pieces(self) -> AsyncIterator[str]:
        """The same pieces for an asyncio consumer, without holding a thread while it waits."""
        loop, changed = asyncio.get_running_loop(), asyncio.Event()
        waker = lambda: loop.call_soon_threadsafe(changed.set)  # noqa: E731
        with self._changed:
            self._wakers.append(waker)
        finished = False
        try:
            while not finished:
                changed.clear()
                with self._changed:
                    piece, finished = self._take()
                if piece:
                    yield piece
                elif not finished:
                    await changed.wait()
        finally:
            self.stop()
            with self._changed:
                self._wakers.remove(waker)
        if self.error is not None:
            raise self.error

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def warpers(settings: Settings) -> Optional[LogitsProcessorList]:
    """transformers' own sampling warpers for one request (None: greedy), in the order generate() applies them."""
    if settings.temperature <= 0:
        return None
    chain = [TemperatureLogitsWarper(settings.temperature)]
    if settings.top_k:
        chain.append(TopKLogitsWarper(settings.top_k))
    if settings.top_p < 1:
        chain.append(TopPLogitsWarper(settings.top_p))
    return LogitsProcessorList(chain)


def safe_end(text: str, stops: Sequence[str]) -> int:
    """How much of `text` may be sent: all but a tail that could be the start of a stop string."""
    for keep in range(min(len(text), max((len(s) for s in stops), default=1) - 1), 0, -1):
        if any(s.startswith(text[-keep:]) for s in stops):
            return len(text) - keep
    return len(text)


class Engine:
    """The shared pool: `stream` / `complete` queue requests, one background thread decodes them in batches."""

    def __init__(self, generator: Generator, max_running: int, max_waiting: int, compiled_here: bool = False):
        """compiled_here: this engine's thread uses the generator's compiled step before it is in use (a warm-up)."""
        self.generator, self.compiled_here, self.closed = generator, compiled_here, False
        self.max_running, self.max_waiting = max_running, max_waiting
        self.model = unwrapped(generator.model)  # LoRA layers live inside it: PEFT's wrapper adds nothing to a step
        self.eos = generator.eos_ids()
        self.waiting: deque[Job] = deque()
        self.tasks: deque[tuple[Callable, Future]] = deque()  # whole generations (beam search) run between steps
        self.running: list[Job] = []
        self.joining: list[Job] = []  # taken from the queue, being prefilled: neither waiting nor running yet
        self.cache, self.mask = None, None  # the batch's KV cache and attention mask, one row per running job
        self.lock = threading.Condition()
        self.thread = threading.Thread(target=self._serve, name="generation", daemon=True)
        self.thread.start()

    @property
    def busy(self) -> int:
        """Requests queued or running: 0 once every request has ended or been dropped."""
        with self.lock:
            return len(self.waiting) + len(self.joining) + len(self.running) + len(self.tasks)

    def stream(self, prompt: str, settings: Settings = Settings(), stop: Optional[threading.Event] = None,
               stop_strings: Sequence[str] = ()) -> Job:
        """Queue a generation (one beam: num_beams is ignored); a prompt too long raises PromptTooLong, a full
        queue QueueFull, both before anything is queued."""
        settings = dataclasses.replace(settings.checked(), num_beams=1)
        input_ids = self.generator.encode([prompt], settings.max_new_tokens)["input_ids"]
        job = Job(prompt, input_ids, settings, stop_strings, stop or threading.Event())
        with self.lock:
            self._check_room()
            self.waiting.append(job)
            self.lock.notify()
        return job

    def complete(self, prompts: list[str], settings: Settings = Settings(), stop: Optional[threading.Event] = None) -> list[Completion]:
        """Whole answers: one beam joins the batch like a stream; beam search runs whole, between two steps."""
        settings = settings.checked()
        if settings.num_beams == 1:
            jobs = []
            try:
                for prompt in prompts:
                    jobs.append(self.stream(prompt, settings, stop))
                for job in jobs:
                    "".join(job)  # until it has ended (and raise its error, if any)
            finally:  # a full queue or an error part way: the others end too
                for job in jobs:
                    job.stop()
            return [job.completion for job in jobs]
        future: Future = Future()
        with self.lock:
            self._check_room()
            self.tasks.append((lambda: self.generator.complete(prompts, settings, stop), future))
            self.lock.notify()
        return future.result()

    def warm_up(self) -> None:
        """Run what serving runs (a lone row, rows joining and leaving) once, so that a compiled decoding step is
        compiled for the engine's calls now rather than at a user's request."""
        settings = Settings(temperature=0, num_beams=1, max_new_tokens=4)
        render = self.generator.render
        jobs = [self.stream(render("Hi."), dataclasses.replace(settings, max_new_tokens=2)),
                self.stream(render("Tell me about alpacas, please."), settings)]
        for job in jobs:  # the short one leaves first
            "".join(job)
        "".join(self.stream(render("Hi."), settings))  # alone

    def compile_in_background(self) -> threading.Thread:
        """Compile the decoding step (Generator.compile(now=False)) while this engine answers uncompiled, then put
        it in use: no request waits for the compiler.

        The compiling thread warms the step up on a private engine (its own generation thread, the same code as
        this one's, hence the graphs this one needs), never in this engine's thread. The switch is
        `generator.compiled`, read once per forward pass, so it takes effect between two steps. While dynamo traces,
        two process-wide settings reach this engine's eager passes too, torch.compiler.is_compiling() and the SDPA
        backends: for those moments they take equivalent kernels (transformers' packed GQA, math attention), and a
        sampling request's random state may be rewound. A failure is printed and the server goes on uncompiled."""
        def work() -> None:
            started = time.perf_counter()
            try:
                self.generator.compile(now=False)
                private = Engine(self.generator, max_running=2, max_waiting=4, compiled_here=True)
                try:
                    private.warm_up()
                finally:
                    private.close()
            except Exception:  # noqa: BLE001 - eager answers go on: slower, not wrong
                traceback.print_exc()
                print("Compiling the decoding step failed (above): answers stay uncompiled", file=sys.stderr, flush=True)
                return
            self.generator.compiled, self.generator.compile_pending = True, False
            print(f"{COMPILED_LINE} (compiled and warmed up in {time.perf_counter() - started:.0f} s while answering)",
                  file=sys.stderr, flush=True)

        thread = threading.Thread(target=work, name="compile", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        """End the generation thread once every request queued so far has ended."""
        with self.lock:
            self.closed = True
            self.lock.notify()
        self.thread.join()

    def _check_room(self) -> None:
        # Running places that are free, or about to be (the loop has not taken the queue's head yet), count as room
        # too: 40 requests at once on 8 running + 32 waiting places all get in, however the loop interleaves.
        free = max(self.max_running - len(self.running) - len(self.joining), 0)
        if len(self.waiting) + len(self.tasks) >= self.max_waiting + free:
            raise QueueFull(f"the server is busy: {self.max_running} answers are being generated and "
                            f"{self.max_waiting} wait; retry shortly")

    # --- the generation thread ------------------------------------------------------------------------------------

    def _serve(self) -> None:
        with self.generator.compiled_here() if self.compiled_here else contextlib.nullcontext():
            while True:
                with self.lock:
                    self.lock.wait_for(lambda: self.waiting or self.running or self.tasks or self.closed)
                    if self.closed and not (self.waiting or self.running or self.tasks):
                        return
                    for job in [j for j in self.waiting if j.stop_event.is_set()]:
                        self.waiting.remove(job)
                        self._finish(job, "cancelled")
                    task = self.tasks.popleft() if self.tasks else None
                    while self.waiting and len(self.running) + len(self.joining) < self.max_running:
                        self.joining.append(self.waiting.popleft())
                    joining = list(self.joining)
                if task:
                    self._run_task(*task)
                if joining:
                    self._guarded(self._join, joining)
                if self.running:
                    self._guarded(self._step)

    def _run_task(self, fn: Callable, future: Future) -> None:
        try:
            future.set_result(fn())
        except BaseException as err:  # noqa: BLE001 - handed to the waiting caller
            future.set_exception(err)

    def _guarded(self, fn: Callable, *args) -> None:
        """A failure (out of memory, a bug) ends the requests it touched with that error; the server goes on."""
        try:
            fn(*args)
        except Exception as err:  # noqa: BLE001 - re-raised in each consumer
            failed = args[0] if args else list(self.running)
            for job in failed:
                job.error = err
                job._notify()
            with self.lock:
                for job in failed:
                    self._remove(job)

    @torch.no_grad()
    def _join(self, jobs: list[Job]) -> None:
        """Prefill the new requests together (left-padded, as generate() batches prompts), take their first tokens,
        and add their cache rows to the batch."""
        ids, mask = self.generator.left_padded([job.input_ids[0] for job in jobs])
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        out = self._forward(jobs, input_ids=ids, attention_mask=mask, position_ids=positions)
        with self.lock:
            self.running.extend(jobs)
            self.joining.clear()
        self.cache, self.mask = merge(self.cache, self.mask, out.cache, mask)
        self._advance(jobs, out.logits[:, -1, :], ids)

    @torch.no_grad()
    def _step(self) -> None:
        """One decoding step of every running row; rows whose request ended leave the batch."""
        rows = list(self.running)
        last = torch.tensor([[job.tokens[-1]] for job in rows], device=self.mask.device)
        positions = self.mask.sum(dim=1, keepdim=True)
        self.mask = torch.cat([self.mask, torch.ones_like(last)], dim=1)
        out = self._forward(rows, input_ids=last, attention_mask=self.mask, position_ids=positions, cache=self.cache)
        self.cache = out.cache
        self._advance(rows, out.logits[:, -1, :], last)

    def _forward(self, rows: list[Job], **inputs):
        """The model's forward pass over `rows`, keeping the last position's logits (rows_in_flight names them)."""
        _in_flight.rows = rows
        try:
            return self.model(**inputs, use_cache=True, logits_to_keep=1)
        finally:
            _in_flight.rows = None

    def _advance(self, rows: list[Job], logits: torch.Tensor, context: torch.Tensor) -> None:
        """Pick each row's next token (its own settings), stream its text, retire the rows that ended."""
        for i, job in enumerate(rows):
            if job.stop_event.is_set():
                self._retire(job, "cancelled")
                continue
            scores = logits[i:i + 1].float()
            if job.warp is None:
                token = int(scores.argmax())
            else:
                scores = job.warp(context[i:i + 1], scores)
                token = int(torch.multinomial(scores.softmax(dim=-1), 1))
            self._append(job, token)

    def _append(self, job: Job, token: int) -> None:
        if token not in self.eos:
            job.tokens.append(token)
        text = self.generator.decode(job.tokens, skip_special_tokens=True)
        cut = min((text.find(s) for s in job.stop_strings if s in text), default=-1)
        with job._changed:
            job.text = text[:cut] if cut >= 0 else text
        if token in self.eos or cut >= 0:
            if token in self.eos:  # counted as a completion token, as the unbatched path counts it
                job.tokens.append(token)
            self._retire(job, "stop")
        elif len(job.tokens) >= job.settings.max_new_tokens:
            self._retire(job, "length")
        else:
            job._notify()

    def _retire(self, job: Job, reason: str) -> None:
        with self.lock:
            self._remove(job)
        self._finish(job, reason)

    def _remove(self, job: Job) -> None:
        """Take a job's row out of the batch, or out of those being prefilled (under the lock)."""
        if job in self.joining:
            self.joining.remove(job)
        if job not in self.running:
            return
        keep = [i for i, j in enumerate(self.running) if j is not job]
        self.running = [self.running[i] for i in keep]
        if not keep:
            self.cache, self.mask = None, None
            return
        self.cache.batch_select_indices(torch.tensor(keep, device=self.mask.device))
        self.mask = trim(self.cache, self.mask[keep])

    def _finish(self, job: Job, reason: str) -> None:
        job.completion = Completion(
            text=job.text.strip(), prompt_tokens=job.input_ids.shape[1], completion_tokens=len(job.tokens),
            finish_reason=reason)
        job._notify()


def engine_for(generator: Generator, max_running: int, max_waiting: int) -> Engine:
    """The server's pool for a generator: its `engine_class` (llama.cpp's one sequence at a time,
    utils.llama_backend), else this module's batched Engine."""
    return getattr(generator, "engine_class", Engine)(generator, max_running=max_running, max_waiting=max_waiting)


def merge(cache, mask: Optional[torch.Tensor], new_cache, new_mask: torch.Tensor):
    """The batch's cache and mask with a new row appended, both left-padded to the longer length."""
    if cache is None:
        return new_cache, new_mask
    length = max(mask.shape[1], new_mask.shape[1])
    for layer, new in zip(cache.layers, new_cache.layers):
        layer.keys = torch.cat([left_pad(layer.keys, length), left_pad(new.keys, length)])
        layer.values = torch.cat([left_pad(layer.values, length), left_pad(new.values, length)])
    return cache, torch.cat([left_pad(mask, length), left_pad(new_mask, length)])


def left_pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Zeros before the sequence dimension's entries (dim 2 of a cache tensor, dim 1 of a mask)."""
    dim = 2 if tensor.dim() == 4 else 1
    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def trim(cache, mask: torch.Tensor) -> torch.Tensor:
    """Drop the leading cache columns that are padding in every remaining row; returns the mask without them."""
    unused = int((mask.sum(dim=0) == 0).cumprod(dim=0).sum())
    for layer in cache.layers if unused else ():
        # contiguous: a compiled step (Generator.compile) would compile again for a strided view
        layer.keys, layer.values = layer.keys[:, :, unused:].contiguous(), layer.values[:, :, unused:].contiguous()
    return mask[:, unused:]
