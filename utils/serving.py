"""The server's one pool of generations: a bounded FIFO queue in front of a batch of running sequences that share
every forward pass (continuous batching over a left-padded cache), each streamed to its own client.

The demo's tabs and the OpenAI-compatible API both submit here, so `max_running` bounds what the model computes at
once whoever asks. Each rule has one place:

- `Job`: one request's answer as it grows: its tokens, its text cut at a stop string, the pieces its client gets,
  and how it ended (its finish reason, or its error: a failure is its request's alone).
- `next_token`: one row's next token, greedy or drawn with transformers' own warpers.
- `Queue`: the bounded queue, and who may join the batch.
- `Batch`: the running rows' KV cache and attention mask (transformers). utils.llama_backend has the same surface
  over one llama.cpp sequence. Prompts are prefilled in chunks of `PREFILL_CHUNK` tokens, one chunk per round.
- `Turns`: a whole generation that transformers' generate() runs (beam search) takes one forward pass per round.
- `Engine`: the loop that runs a round: admit, one prefill chunk, one decoding step of every row, one beam step.

A request joins the batch at a round boundary; a row leaves when it ends (EOS, a stop string, its max_tokens, a stop
or a disconnect), and the padding columns no row needs any more are trimmed.
"""

import asyncio
import contextlib
import dataclasses
import sys
import threading
import time
import traceback
from collections import deque
from typing import AsyncIterator, Callable, Iterator, Optional, Sequence

import torch
from transformers import DynamicCache, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from utils import adapters
from utils.cli import UserError
from utils.generation import COMPILED_LINE, Completion, Generator, Settings, unwrapped

# Prompt tokens (per row) prefilled in one round: a long prompt takes several rounds, and every running stream gets
# a token between two of them.
PREFILL_CHUNK = 128


class QueueFull(UserError):
    """Every running slot is taken and the queue is at its bound: the request is turned away, to retry later."""


class RowFailed(RuntimeError):
    """One request's answer cannot go on (its scores are not numbers); the other rows are not affected."""


_in_flight = threading.local()  # the jobs whose rows the current forward pass computes, in row order


def rows_in_flight() -> Optional[list["Job"]]:
    """In the engine's thread, during a forward pass: the job of each row (tests script answers per row with it)."""
    return getattr(_in_flight, "rows", None)


# --- one request's answer ------------------------------------------------------------------------------------------

class Job:
    """One streamed generation. Iterate it (or `async for` over `job.pieces()`) for text pieces; `completion` is set
    once it has ended; `stop()` ends it, whether it still waits in the queue or runs."""

    def __init__(self, prompt: str, input_ids: torch.Tensor, settings: Settings, stop_strings: Sequence[str],
                 stop: threading.Event, adapter: Optional[str] = None):
        self.prompt, self.input_ids, self.settings = prompt, input_ids, settings
        self.adapter = adapter  # with several adapters served (utils.adapters), the one its row takes
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

    def add(self, token: int, eos: set[int], decode: Callable[..., str]) -> Optional[str]:
        """Take the next token: the text grows (cut at a stop string); returns why the answer ends there, if it does.
        An EOS counts as a completion token, as the unbatched path counts it, but is not decoded."""
        self.tokens.append(token)
        text = decode(self.tokens[:-1] if token in eos else self.tokens, skip_special_tokens=True)
        cut = min((text.find(s) for s in self.stop_strings if s in text), default=-1)
        with self._changed:
            self.text = text[:cut] if cut >= 0 else text
        if token in eos or cut >= 0:
            return "stop"
        if len(self.tokens) >= self.settings.max_new_tokens:
            return "length"
        self._notify()
        return None

    def finish(self, reason: str) -> None:
        self.completion = Completion(
            text=self.text.strip(), prompt_tokens=self.input_ids.shape[1], completion_tokens=len(self.tokens),
            finish_reason=reason)
        self._notify()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._notify()

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


def safe_end(text: str, stops: Sequence[str]) -> int:
    """How much of `text` may be sent: all but a tail that could be the start of a stop string."""
    for keep in range(min(len(text), max((len(s) for s in stops), default=1) - 1), 0, -1):
        if any(s.startswith(text[-keep:]) for s in stops):
            return len(text) - keep
    return len(text)


# --- sampling --------------------------------------------------------------------------------------------------------

def warpers(settings: Settings) -> Optional[LogitsProcessorList]:
    """transformers' own sampling warpers for one request (None: greedy), in the order generate() applies them."""
    if settings.temperature <= 0:
        return None
    chain = [TemperatureLogitsWarper(float(settings.temperature))]
    if settings.top_k:
        chain.append(TopKLogitsWarper(settings.top_k))
    if settings.top_p < 1:
        chain.append(TopPLogitsWarper(settings.top_p))
    return LogitsProcessorList(chain)


def candidates(logits: torch.Tensor, warp, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, token ids) of the tokens a sampled answer may take next: transformers' warpers (temperature,
    top-k, top-p) applied, with a top_k, to the top_k most likely tokens only. The same distribution, as the others
    get probability 0 either way, without sorting the whole vocabulary for top-p at every token."""
    ids = torch.arange(len(logits))
    if 0 < top_k < len(logits):
        logits, ids = torch.topk(logits, top_k)
    return warp(None, logits[None])[0].softmax(dim=-1), ids


def next_token(job: Job, logits: torch.Tensor) -> int:
    """One row's next token from its last position's logits (1-D): their argmax, or a draw with the job's settings.
    Scores that are not numbers raise RowFailed: that request ends with the error, the batch goes on."""
    scores = logits.float()
    if torch.isnan(scores).any():
        raise RowFailed("generation failed: the model's scores for this answer are not numbers (NaN)")
    if job.warp is None:
        return int(scores.argmax())
    probs, ids = candidates(scores, job.warp, job.settings.top_k)
    if not torch.isfinite(probs).all() or not probs.sum() > 0:
        raise RowFailed(f"generation failed: temperature {job.settings.temperature} turned this answer's scores into "
                        "numbers that are not finite; use a larger temperature, or 0 for greedy")
    return int(ids[int(torch.multinomial(probs, 1))])


# --- the queue -------------------------------------------------------------------------------------------------------

class Queue:
    """Requests waiting for a running place (streams) or for their turn (beam searches), first come first served,
    `max_waiting` of them beside what runs. The engine's lock guards it."""

    def __init__(self, max_running: int, max_waiting: int):
        self.max_running, self.max_waiting = max_running, max_waiting
        self.waiting: deque[Job] = deque()
        self.tasks: deque["Guest"] = deque()

    def __len__(self) -> int:
        return len(self.waiting) + len(self.tasks)

    def check_room(self, taken: int) -> None:
        """QueueFull unless a new request fits. Running places that are free, or about to be (the loop has not taken
        the queue's head yet), count as room too: 40 requests at once on 8 running + 32 waiting places all get in,
        however the loop interleaves."""
        if len(self) >= self.max_waiting + max(self.max_running - taken, 0):
            raise QueueFull(f"the server is busy: {self.max_running} answers are being generated and "
                            f"{self.max_waiting} wait; retry shortly")

    def take(self, taken: int) -> list[Job]:
        """The waiting streams that fit in the free running places, oldest first."""
        jobs = []
        while self.waiting and taken + len(jobs) < self.max_running:
            jobs.append(self.waiting.popleft())
        return jobs

    def cancelled(self) -> list:
        """Take out the waiting requests whose client has stopped or left."""
        gone = [item for item in [*self.waiting, *self.tasks] if item.stop_event.is_set()]
        for item in gone:
            (self.waiting if isinstance(item, Job) else self.tasks).remove(item)
        return gone


# --- the batch's cache (transformers) ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Prefill:
    """Prompts being prefilled together: left-padded ids and mask, the cache they fill, the columns done so far."""

    jobs: list[Job]
    ids: torch.Tensor
    mask: torch.Tensor
    cache: object
    done: int = 0


class Batch:
    """The running rows of a transformers model: one KV cache row and attention mask row per job, left-padded, so
    that every row's tokens stay contiguous and right-aligned.

    Every layer keeps the whole sequence (transformers' DynamicLayer), sliding-window layers too: the model's own
    sliding-window masks (transformers.masking_utils) do the windowing by cache position, which for contiguous rows is
    each row's own distance between tokens. transformers' DynamicSlidingWindowLayer cannot be used here: it keeps the
    last window of the whole batch with one offset, which rows of different lengths joining and leaving do not share
    (Gemma 2/3 failed so). Its continuous batching (generate_batch) runs on CPU with a PEFT adapter, but with one
    generation config for every request, no beam search and no stop strings (docs/serving.md)."""

    def __init__(self, generator: Generator):
        self.generator = generator
        self.model = unwrapped(generator.model)  # LoRA layers live inside it: PEFT's wrapper adds nothing to a step
        self.jobs: list[Job] = []
        self.cache, self.mask = None, None

    def start(self, jobs: list[Job]) -> Prefill:
        ids, mask = self.generator.left_padded([job.input_ids[0] for job in jobs])
        return Prefill(jobs, ids, mask, DynamicCache())  # without a config: every layer a full DynamicLayer

    @torch.no_grad()
    def prefill(self, todo: Prefill) -> Optional[torch.Tensor]:
        """The next PREFILL_CHUNK columns of the prompts; once they are all in, each row's last logits."""
        start, end = todo.done, min(todo.done + PREFILL_CHUNK, todo.ids.shape[1])
        positions = (todo.mask.cumsum(dim=1) - 1).clamp(min=0)
        out = self._forward(todo.jobs, input_ids=todo.ids[:, start:end], attention_mask=todo.mask[:, :end],
                            position_ids=positions[:, start:end], cache=todo.cache)
        todo.done = end
        return out.logits[:, -1, :] if end == todo.ids.shape[1] else None

    def join(self, todo: Prefill) -> None:
        """The prefilled rows join the batch, both left-padded to the longer length."""
        self.jobs = self.jobs + todo.jobs
        if self.cache is None:
            self.cache, self.mask = todo.cache, todo.mask
            return
        length = max(self.mask.shape[1], todo.mask.shape[1])
        for layer, new in zip(self.cache.layers, todo.cache.layers):
            layer.keys = torch.cat([left_pad(layer.keys, length), left_pad(new.keys, length)])
            layer.values = torch.cat([left_pad(layer.values, length), left_pad(new.values, length)])
        self.mask = torch.cat([left_pad(self.mask, length), left_pad(todo.mask, length)])

    @torch.no_grad()
    def step(self) -> tuple[list[tuple[Job, torch.Tensor]], list[tuple[Job, Exception]]]:
        """One decoding step of every row: (job, its logits) for each row, and (job, error) for the rows whose forward
        pass failed. Those have left the batch: after a failed batched pass the rows run apart, so that only the
        culprit fails and the others get the tokens they would have had."""
        last = torch.tensor([[job.tokens[-1]] for job in self.jobs], device=self.mask.device)
        positions = self.mask.sum(dim=1, keepdim=True)
        mask = torch.cat([self.mask, torch.ones_like(last)], dim=1)
        length = self.cache.get_seq_length()
        try:
            out = self._forward(self.jobs, input_ids=last, attention_mask=mask, position_ids=positions, cache=self.cache)
        except Exception:  # noqa: BLE001 - which row caused it is found below
            for layer in self.cache.layers:  # undo the layers the failed pass had already extended (crop() would
                layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]  # cut them all)
            return self._step_apart(last, mask, positions)
        self.mask = mask
        return list(zip(self.jobs, out.logits[:, -1, :])), []

    def _step_apart(self, last, mask, positions) -> tuple[list, list]:
        done, failed, caches = [], [], []
        for i, job in enumerate(self.jobs):
            alone = DynamicCache(ddp_cache_data=[(layer.keys[i:i + 1], layer.values[i:i + 1]) for layer in self.cache.layers])
            try:
                out = self._forward([job], input_ids=last[i:i + 1], attention_mask=mask[i:i + 1],
                                    position_ids=positions[i:i + 1], cache=alone)
            except Exception as err:  # noqa: BLE001 - this request's own error
                failed.append((job, err))
                continue
            done.append((i, job, out.logits[0, -1, :]))
            caches.append(alone)
        kept = [i for i, _, _ in done]
        self.jobs = [job for _, job, _ in done]
        if not kept:
            self.cache, self.mask = None, None
            return [], failed
        self.cache = DynamicCache(ddp_cache_data=[
            (torch.cat([c.layers[n].keys for c in caches]), torch.cat([c.layers[n].values for c in caches]))
            for n in range(len(self.cache.layers))])
        self.mask = trim(self.cache, mask[kept])
        return [(job, logits) for _, job, logits in done], failed

    def remove(self, job: Job) -> None:
        """Take a job's row out of the batch (nothing if it has none)."""
        if job not in self.jobs:
            return
        keep = [i for i, j in enumerate(self.jobs) if j is not job]
        self.jobs = [self.jobs[i] for i in keep]
        if not keep:
            self.cache, self.mask = None, None
            return
        self.cache.batch_select_indices(torch.tensor(keep, device=self.mask.device))
        self.mask = trim(self.cache, self.mask[keep])

    def _forward(self, rows: list[Job], **inputs):
        """The model's forward pass over `rows`, keeping the last position's logits (rows_in_flight names them),
        each row with its job's adapter when several are served."""
        _in_flight.rows = rows
        try:
            with adapters.rows([job.adapter for job in rows] if self.generator.served else None):
                return self.model(**inputs, use_cache=True, logits_to_keep=1)
        finally:
            _in_flight.rows = None


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


# --- beam search, a step at a time -----------------------------------------------------------------------------------

_guest = threading.local()  # .turns: this thread runs a Guest's generate(), one forward pass per turn


def _wait_for_turn(module, args, kwargs) -> None:
    """A forward pre-hook: in a guest's thread, wait until the engine hands it the next forward pass."""
    turns = getattr(_guest, "turns", None)
    if turns is not None:
        turns.wait()


class Guest:
    """A whole generation (beam search) that transformers' generate() runs in the caller's thread, a forward pass
    per turn, with its own beams, cache and stopping criteria: the request's stop event ends it between two steps."""

    def __init__(self, stop: threading.Event):
        self.stop_event = stop
        self.admitted = threading.Event()
        self.cancelled = False


class Turns:
    """The engine's thread and one guest take turns at the model: the engine hands the guest a turn once a round,
    and waits until the guest is about to start its next forward pass (or has ended)."""

    def __init__(self):
        self._changed = threading.Condition()
        self.active = False  # a guest is admitted and has not ended
        self._guest_turn = False

    @contextlib.contextmanager
    def guest(self) -> Iterator[None]:
        """Within it, this thread's forward passes wait for their turn."""
        _guest.turns = self
        try:
            yield
        finally:
            _guest.turns = None
            with self._changed:
                self.active, self._guest_turn = False, False
                self._changed.notify_all()

    def wait(self) -> None:
        """The guest, before a forward pass: give the turn back, then wait for the next one."""
        with self._changed:
            self._guest_turn = False
            self._changed.notify_all()
            self._changed.wait_for(lambda: self._guest_turn)

    def grant(self) -> None:
        """The engine: let the guest run until it is about to start another forward pass, or has ended."""
        with self._changed:
            if not self.active:
                return
            self._guest_turn = True
            self._changed.notify_all()
            self._changed.wait_for(lambda: not self._guest_turn or not self.active)


# --- the engine ------------------------------------------------------------------------------------------------------

class Engine:
    """The shared pool: `stream` / `complete` queue requests, one background thread decodes them in rounds."""

    def __init__(self, generator: Generator, max_running: int, max_waiting: int, compiled_here: bool = False,
                 batch=None):
        """compiled_here: this engine's thread uses the generator's compiled step before it is in use (a warm-up).
        batch: the running rows' model state (default: a transformers Batch)."""
        self.generator, self.compiled_here, self.closed = generator, compiled_here, False
        self.eos = generator.eos_ids()
        self.queue = Queue(max_running, max_waiting)
        self.batch = batch or Batch(generator)
        self.prefilling: deque[Prefill] = deque()  # taken from the queue: neither waiting nor running yet
        self.turns, self.guest = Turns(), None
        model = unwrapped(generator.model)
        if isinstance(model, torch.nn.Module) and not getattr(model, "_turn_hook", None):
            model._turn_hook = model.register_forward_pre_hook(_wait_for_turn, with_kwargs=True)
        self.lock = threading.Condition()
        self.thread = threading.Thread(target=self._serve, name="generation", daemon=True)
        self.thread.start()

    max_running = property(lambda self: self.queue.max_running)
    max_waiting = property(lambda self: self.queue.max_waiting)
    waiting = property(lambda self: self.queue.waiting)
    running = property(lambda self: self.batch.jobs)

    @property
    def busy(self) -> int:
        """Requests queued or running: 0 once every request has ended or been dropped."""
        with self.lock:
            return len(self.queue) + self._taken() + (self.guest is not None)

    def _taken(self) -> int:
        return len(self.batch.jobs) + sum(len(todo.jobs) for todo in self.prefilling)

    def stream(self, prompt: str, settings: Settings = Settings(), stop: Optional[threading.Event] = None,
               stop_strings: Sequence[str] = (), adapter: Optional[str] = None) -> Job:
        """Queue a generation (one beam: num_beams is ignored); a prompt too long raises PromptTooLong, a full
        queue QueueFull, both before anything is queued. `adapter`: with several served, the one it takes (default:
        Generator.default_adapter)."""
        settings = dataclasses.replace(settings.checked(), num_beams=1)
        input_ids = self.generator.encode([prompt], settings.max_new_tokens)["input_ids"]
        job = Job(prompt, input_ids, settings, stop_strings, stop or threading.Event(),
                  adapter or self.generator.default_adapter)
        with self.lock:
            self.queue.check_room(self._taken())
            self.queue.waiting.append(job)
            self.lock.notify()
        return job

    def complete(self, prompts: list[str], settings: Settings = Settings(), stop: Optional[threading.Event] = None,
                 adapter: Optional[str] = None) -> list[Completion]:
        """Whole answers: one beam joins the batch like a stream; beam search runs in this thread through
        transformers' generate(), one forward pass a round (Turns), so that the batch's streams go on meanwhile."""
        settings = settings.checked()
        if settings.num_beams == 1:
            jobs = []
            try:
                for prompt in prompts:
                    jobs.append(self.stream(prompt, settings, stop, adapter=adapter))
                for job in jobs:
                    "".join(job)  # until it has ended (and raise its error, if any)
            finally:  # a full queue or an error part way: the others end too
                for job in jobs:
                    job.stop()
            return [job.completion for job in jobs]
        stop = stop or threading.Event()
        guest = Guest(stop)
        with self.lock:
            self.queue.check_room(self._taken())
            self.queue.tasks.append(guest)
            self.lock.notify()
        guest.admitted.wait()
        if guest.cancelled:
            return [Completion("", self.generator.prompt_tokens(p), 0, "cancelled") for p in prompts]
        try:
            with self.turns.guest(), adapters.rows(adapter or self.generator.default_adapter):
                return self.generator.complete(prompts, settings, stop)
        finally:
            with self.lock:
                self.guest = None
                self.lock.notify()

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

    # --- the generation thread ------------------------------------------------------------------------------------

    def _work(self) -> bool:
        return bool(self.queue or self.prefilling or self.batch.jobs or self.guest is not None)

    def _serve(self) -> None:
        with self.generator.compiled_here() if self.compiled_here else contextlib.nullcontext():
            while True:
                with self.lock:
                    self.lock.wait_for(lambda: self._work() or self.closed)
                    if self.closed and not self._work():
                        return
                    self._admit()
                try:
                    self._round()
                except Exception as err:  # noqa: BLE001 - a bug of the engine's own: its requests end, serving goes on
                    self._fail_all(err)

    def _fail_all(self, error: Exception) -> None:
        with self.lock:
            jobs = [*self.batch.jobs, *(job for todo in self.prefilling for job in todo.jobs)]
            self.prefilling.clear()
        for job in jobs:
            with self.lock, contextlib.suppress(Exception):  # the batch may be what broke
                self.batch.remove(job)
            job.fail(error)

    def _admit(self) -> None:
        """Under the lock: drop what was cancelled while waiting, start prefilling the streams that fit, and let the
        next beam search in once none runs."""
        for item in self.queue.cancelled():
            if isinstance(item, Job):
                item.finish("cancelled")
            else:
                item.cancelled = True
                item.admitted.set()
        if not self.prefilling:
            jobs = self.queue.take(self._taken())
            if jobs:
                self.prefilling.append(self.batch.start(jobs))
        if self.guest is None and self.queue.tasks:
            self.guest = self.queue.tasks.popleft()
            self.turns.active = True
            self.guest.admitted.set()

    def _round(self) -> None:
        """One prefill chunk, one decoding step of every running row, one forward pass of a beam search."""
        if self.prefilling:
            self._prefill(self.prefilling[0])
        if self.batch.jobs:
            rows, failed = self.batch.step()
            for job, error in failed:
                self._end(job, error=error)
            self._advance(rows)
        self.turns.grant()

    def _prefill(self, todo: Prefill) -> None:
        """A chunk of the oldest prompts being prefilled; once they are all in, their rows join the batch. A failure
        is retried prompt by prompt, so that it ends only the request that causes it."""
        try:
            logits = self.batch.prefill(todo)
        except Exception as err:  # noqa: BLE001 - re-raised in that request's consumer
            with self.lock:
                self.prefilling.popleft()
                if len(todo.jobs) == 1:
                    self._end(todo.jobs[0], error=err)
                else:
                    self.prefilling.extendleft(self.batch.start([job]) for job in reversed(todo.jobs))
            return
        if logits is None:
            if all(job.stop_event.is_set() for job in todo.jobs):  # every client left: no more chunks for nobody
                with self.lock:
                    self.prefilling.popleft()
                for job in todo.jobs:
                    self._end(job, "cancelled")
            return
        with self.lock:
            self.prefilling.popleft()
            self.batch.join(todo)
        self._advance(list(zip(todo.jobs, logits)))

    def _advance(self, rows: list[tuple[Job, torch.Tensor]]) -> None:
        """Each row's next token (its own settings): stream its text, end the rows that are done or failed."""
        for job, logits in rows:
            if job.stop_event.is_set():
                self._end(job, "cancelled")
                continue
            try:
                reason = job.add(next_token(job, logits), self.eos, self.generator.decode)  # under the tokenizer's lock
            except RowFailed as err:
                self._end(job, error=err)
                continue
            if reason:
                self._end(job, reason)

    def _end(self, job: Job, reason: str = "", error: Optional[BaseException] = None) -> None:
        """The job leaves the batch, then ends: with `reason`, or failed with `error`."""
        with self.lock:
            self.batch.remove(job)
        if error is not None:
            job.fail(error)
        else:
            job.finish(reason)


def engine_for(generator: Generator, max_running: int, max_waiting: int) -> Engine:
    """The server's pool for a generator: its `engine_class` (llama.cpp's one sequence at a time,
    utils.llama_backend), else this module's batched Engine."""
    return getattr(generator, "engine_class", Engine)(generator, max_running=max_running, max_waiting=max_waiting)
