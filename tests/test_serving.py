"""utils.serving.Engine, the server's one pool, on the tiny model: batched answers equal unbatched ones, requests
join and leave the batch between steps, each with its own settings, and stopped requests free their place."""

import threading
import time

import pytest
import torch
from gen_helpers import hold_back_inductor, make_adapter, never_eos, slowed

from utils.generation import Settings, load_generator, unwrapped
from utils.cli import UserError
from utils.serving import PREFILL_CHUNK, Engine, QueueFull, RowFailed, rows_in_flight, safe_end

GREEDY = Settings(temperature=0, num_beams=1, max_new_tokens=12)
PROMPTS = ["Hi.", "Tell me about alpacas.", "Write a long poem about llamas and vicunas in the Andes mountains, please.",
           "Name three colours.", "What is two plus two?"]


@pytest.fixture(scope="module")
def gen(tiny_model, tmp_path_factory):
    adapter = make_adapter(tiny_model, tmp_path_factory.mktemp("adapter"))  # a PEFT adapter, unmerged
    return load_generator(str(tiny_model), str(adapter), device="cpu")


def wait_until(condition, what: str) -> None:
    deadline = time.time() + 30
    while not condition():
        assert time.time() < deadline, what
        time.sleep(0.005)


def test_greedy_answers_in_a_batch_equal_the_unbatched_ones(gen):
    """Prompts of different lengths join a running batch one after another (left-padded), ask for different
    max_tokens, and share it with sampled answers: each greedy answer is token for token the one generate() gives
    alone, and the rows really shared forward passes."""
    engine = Engine(gen, max_running=8, max_waiting=8)
    lengths = [12, 5, 12, 9, 3]
    prompts = [gen.render(p) for p in PROMPTS]
    with never_eos(gen.model, gen.tokenizer.eos_token_id):
        alone = [gen.complete([p], Settings(temperature=0, num_beams=1, max_new_tokens=n))[0] for p, n in zip(prompts, lengths)]
        widest, passes = [], []

        def count(module, args, kwargs):
            passes.append(1)
            widest.append(kwargs["input_ids"].shape[0])

        counter = unwrapped(gen.model).register_forward_pre_hook(count, with_kwargs=True)
        with slowed(gen.model, 0.01):
            jobs, sampled = [], []
            for prompt, n in zip(prompts, lengths):
                jobs.append(engine.stream(prompt, Settings(temperature=0, num_beams=1, max_new_tokens=n)))
                sampled.append(engine.stream(prompt, Settings(temperature=1.5, top_p=0.9, top_k=0, num_beams=1, max_new_tokens=n)))
                wait_until(lambda: jobs[-1].tokens, "the request never started")  # it joins a batch already running
            for job in jobs + sampled:
                "".join(job)
        counter.remove()
    assert [(j.completion.text, j.completion.completion_tokens, j.completion.finish_reason) for j in jobs] == \
        [(c.text, c.completion_tokens, c.finish_reason) for c in alone]
    assert [j.completion.completion_tokens for j in sampled] == lengths  # each its own max_tokens
    assert max(widest) >= 4 and len(passes) < sum(lengths) * 2  # 10 answers, 82 tokens: passes shared
    assert engine.busy == 0


def test_beam_search_answers_as_generate_does(gen):
    engine = Engine(gen, max_running=4, max_waiting=4)
    prompts = [gen.render(p) for p in PROMPTS[:2]]
    beams = Settings(temperature=0, num_beams=3, max_new_tokens=6)
    assert [c.text for c in engine.complete(prompts, beams)] == [c.text for c in gen.complete(prompts, beams)]


@pytest.mark.parametrize("where", ["sampling", "prefill", "step"])
def test_a_poisoned_request_fails_alone(gen, where):
    """Among ordinary requests that share its prefill and its decoding steps, one whose scores turn to NaN, or
    whose forward pass raises, ends with its own error; each other one gets the tokens it would have had alone."""
    engine = Engine(gen, max_running=8, max_waiting=8)
    prompts, poison = [gen.render(p) for p in PROMPTS[:4]], gen.render("Poison me.")
    settings = Settings(temperature=0, num_beams=1, max_new_tokens=10)

    def poisoned():
        return [i for i, job in enumerate(rows_in_flight() or []) if job.prompt == poison]

    def not_a_number(module, args, output):
        output[poisoned()] = float("nan")

    def failing(module, args, kwargs):
        if poisoned() and (kwargs["input_ids"].shape[1] > 1) == (where == "prefill"):
            raise RuntimeError("poisoned forward pass")

    with never_eos(gen.model, gen.tokenizer.eos_token_id):
        alone = [gen.complete([p], settings)[0] for p in prompts]
        model = unwrapped(gen.model)
        hook = (model.lm_head.register_forward_hook(not_a_number) if where == "sampling"
                else model.register_forward_pre_hook(failing, with_kwargs=True))
        try:
            with engine.lock:  # all queued before the engine takes any: one prefill, then one batch
                jobs = [engine.stream(p, settings) for p in prompts[:2] + [poison] + prompts[2:]]
            bad = jobs.pop(2)
            with pytest.raises(RowFailed if where == "sampling" else RuntimeError,
                               match="not numbers" if where == "sampling" else "poisoned forward pass"):
                "".join(bad)
            for job in jobs:
                "".join(job)
        finally:
            hook.remove()
    assert [(j.completion.text, j.completion.completion_tokens) for j in jobs] == \
        [(c.text, c.completion_tokens) for c in alone]
    assert engine.busy == 0


def test_a_temperature_that_can_only_overflow_is_refused_up_front(gen):
    engine = Engine(gen, max_running=2, max_waiting=2)
    with pytest.raises(UserError, match=r"^temperature must be 0 for greedy or at least 0.001, not 1e-45$"):
        engine.stream(gen.render("Hi."), Settings(temperature=1e-45, num_beams=1))
    assert engine.busy == 0


def test_a_stream_keeps_flowing_during_a_beam_search_and_a_long_prefill(gen):
    """A 4-beam answer takes one forward pass a round and a long prompt one PREFILL_CHUNK a round: a running stream
    gets a token in every round meanwhile. Stopping ends the beam search and the prefill part way."""
    engine = Engine(gen, max_running=4, max_waiting=4)
    long_prompt = gen.render("Tell me about alpacas and llamas, please. " * 14)
    chunks = -(-gen.prompt_tokens(long_prompt) // PREFILL_CHUNK)
    assert chunks >= 3
    received = {}
    with never_eos(gen.model, gen.tokenizer.eos_token_id):
        stream = engine.stream(gen.render("Hi."), Settings(temperature=0, num_beams=1, max_new_tokens=400))
        wait_until(lambda: stream.tokens, "the stream never started")

        def beams():
            before = len(stream.tokens)
            received["answer"] = engine.complete([gen.render("Name three colours.")],
                                                 Settings(temperature=0, num_beams=4, max_new_tokens=12))[0]
            received["beams"] = len(stream.tokens) - before

        beam_thread = threading.Thread(target=beams, daemon=True)
        beam_thread.start()
        before = len(stream.tokens)
        long = engine.stream(long_prompt, Settings(temperature=0, num_beams=1, max_new_tokens=2))
        wait_until(lambda: long.tokens, "the long prompt was never prefilled")
        received["prefill"] = len(stream.tokens) - before
        beam_thread.join(60)

        stop = threading.Event()
        cancelled = {}
        beam_thread = threading.Thread(target=lambda: cancelled.update(answer=engine.complete(
            [gen.render("Name three colours.")], Settings(temperature=0, num_beams=4, max_new_tokens=300), stop)[0]),
            daemon=True)
        with slowed(gen.model, 0.01):  # rounds slow enough to stop both part way
            beam_thread.start()
            long = engine.stream(long_prompt, Settings(temperature=0, num_beams=1, max_new_tokens=2), stop)
            wait_until(lambda: engine.guest and engine.prefilling and engine.prefilling[0].done, "neither started")
            stop.set()
            beam_thread.join(60)
            wait_until(lambda: long.done, "the stopped prefill never ended")
        stream.stop()
    assert received["answer"].completion_tokens == 12 and received["beams"] >= 10
    assert received["prefill"] >= chunks - 1
    assert cancelled["answer"].finish_reason == "cancelled" and cancelled["answer"].completion_tokens < 300
    assert long.completion.finish_reason == "cancelled" and long.completion.completion_tokens == 0
    wait_until(lambda: engine.busy == 0, "a stopped request kept its place")


def test_stopping_frees_the_place_of_a_running_and_a_waiting_request(gen):
    engine = Engine(gen, max_running=1, max_waiting=1)
    long = Settings(temperature=0, num_beams=1, max_new_tokens=200)
    with never_eos(gen.model, gen.tokenizer.eos_token_id), slowed(gen.model, 0.01):
        running = engine.stream(gen.render("Hi."), long)
        wait_until(lambda: running.tokens, "the first request never started")
        waiting = engine.stream(gen.render("Hello."), long)
        with pytest.raises(QueueFull, match="the server is busy"):  # one running, one waiting: full
            engine.stream(gen.render("Hey."), long)
        waiting.stop()
        wait_until(lambda: waiting.done, "the waiting request was not dropped")
        assert waiting.completion.completion_tokens == 0 and waiting.completion.finish_reason == "cancelled"
        assert not running.done  # dropped from the queue, not waiting its turn
        pieces = iter(running)
        next(pieces)
        pieces.close()  # the consumer leaves: the request stops
        wait_until(lambda: engine.busy == 0, "the running request kept its place")
    assert running.completion.finish_reason == "cancelled" and running.completion.completion_tokens < 200


def test_requests_arriving_during_a_prefill_may_fill_every_running_and_waiting_place(gen):
    """While the loop prefills the first request, the next ones arrive: 2 running + 2 waiting places take all 4,
    the 5th is turned away. (Counting only the queue turned away late arrivals that a free running place would
    take: 4 of 40 in CI.)"""
    engine = Engine(gen, max_running=2, max_waiting=2)
    prefilling, release = threading.Event(), threading.Event()

    def hold(module, args, kwargs):
        if kwargs["input_ids"].shape[1] > 1:  # a prefill, not a decoding step
            prefilling.set()
            release.wait(30)

    hook = unwrapped(gen.model).register_forward_pre_hook(hold, with_kwargs=True)
    try:
        settings = Settings(temperature=0, num_beams=1, max_new_tokens=3)
        jobs = [engine.stream(gen.render("Hi."), settings)]
        assert prefilling.wait(30)
        jobs += [engine.stream(gen.render(p), settings) for p in PROMPTS[1:4]]
        with pytest.raises(QueueFull):
            engine.stream(gen.render("Hey."), settings)
        release.set()
        answers = ["".join(job) for job in jobs]  # until each has ended
        assert len(answers) == 4 and all(job.completion.finish_reason in ("stop", "length") for job in jobs)
    finally:
        release.set()
        hook.remove()
    assert engine.busy == 0


def test_a_stop_string_ends_the_answer_and_is_never_streamed(gen):
    engine = Engine(gen, max_running=2, max_waiting=2)
    free = engine.complete([gen.render("Tell me about alpacas.")], GREEDY)[0].text
    stop = free[4:7]
    job = engine.stream(gen.render("Tell me about alpacas."), GREEDY, stop_strings=[stop])
    streamed = "".join(job)
    assert streamed.strip() == free[:free.index(stop)].strip() and stop not in streamed
    assert job.completion.finish_reason == "stop"


@pytest.mark.parametrize("text, stops, end", [
    ("Alpacas are gen", ["gentle"], 12),  # "gen" may be the start of "gentle": held back
    ("Alpacas are", ["gentle"], 11),
    ("Alpacas g", ["gentle", "go"], 8),
    ("", ["x"], 0),
])
def test_safe_end_holds_back_what_may_become_a_stop_string(text, stops, end):
    assert safe_end(text, stops) == end


def test_a_compiled_step_is_compiled_for_the_engine_at_start_not_at_a_request(tiny_model):
    """After warm_up, a crowd joining and leaving the batch down to a lone row (the compiled step's shape) compiles
    nothing more, and the lone row's greedy tokens are the eager ones."""
    import torch._dynamo

    gen = load_generator(str(tiny_model), device="cpu")
    prompts = [gen.render(p) for p in PROMPTS]
    settings = [Settings(temperature=0, num_beams=1, max_new_tokens=n) for n in (3, 6, 9, 12, 24)]
    with never_eos(gen.model, gen.tokenizer.eos_token_id):
        eager = gen.complete([prompts[-1]], settings[-1])[0]
        gen.compile()
        engine = Engine(gen, max_running=8, max_waiting=8)
        engine.warm_up()
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        jobs = [engine.stream(p, s) for p, s in zip(prompts, settings)]  # the last runs alone for its last 12 tokens
        for job in jobs:
            "".join(job)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert (jobs[-1].completion.text, jobs[-1].completion.completion_tokens) == (eager.text, eager.completion_tokens)


def test_the_engine_answers_while_its_step_compiles_then_switches_between_steps(tiny_model, monkeypatch):
    """compile_in_background: with the compiler held back in the middle of compiling (dynamo has traced, inductor
    waits), a request is answered, token for token the eager answer; once the compiled step is in use, a crowd
    joining and leaving compiles nothing more, and the lone row's greedy tokens are still the eager ones."""
    import torch._dynamo

    reached, go = hold_back_inductor(monkeypatch)

    calls, real_compile = [], torch.compile

    def counted_compile(fn, **kwargs):  # which threads run the compiled step
        compiled = real_compile(fn, **kwargs)
        return lambda *a, **kw: calls.append(threading.current_thread()) or compiled(*a, **kw)

    monkeypatch.setattr(torch, "compile", counted_compile)
    gen = load_generator(str(tiny_model), device="cpu", compile=True, compile_in_background=True)
    assert gen.compile_pending and not gen.compiled  # nothing compiled at load
    prompts = [gen.render(p) for p in PROMPTS]
    settings = [Settings(temperature=0, num_beams=1, max_new_tokens=n) for n in (3, 6, 9, 12, 24)]
    with never_eos(gen.model, gen.tokenizer.eos_token_id):
        eager = gen.complete([prompts[-1]], settings[-1])[0]
        engine = Engine(gen, max_running=8, max_waiting=8)
        compiling = engine.compile_in_background()
        assert reached.wait(120), "the compiler never started"
        during = engine.complete([prompts[-1]], settings[-1])[0]
        assert compiling.is_alive() and not gen.compiled  # answered before the compiled step was ready
        go.set()
        compiling.join(300)
        assert gen.compiled and not gen.compile_pending
        assert engine.thread not in calls  # the warm-up ran on a thread of its own
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        jobs = [engine.stream(p, s) for p, s in zip(prompts, settings)]  # the last runs alone for its last 12 tokens
        for job in jobs:
            "".join(job)
    assert (during.text, during.completion_tokens) == (eager.text, eager.completion_tokens)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert calls.count(engine.thread) >= 12  # the lone row's steps went through the compiled step
    assert (jobs[-1].completion.text, jobs[-1].completion.completion_tokens) == (eager.text, eager.completion_tokens)


@pytest.mark.parametrize("temperature, top_p, top_k", [(0.1, 0.75, 40), (1.5, 0.9, 3), (0.7, 1.0, 50), (1.0, 0.5, 0)])
def test_llama_backend_samples_as_transformers_warpers_do(temperature, top_p, top_k):
    """The engines warp only the top_k most likely tokens: the distribution over the whole vocabulary is the
    one transformers' warpers give."""
    from utils.serving import candidates, warpers

    torch.manual_seed(0)
    logits = torch.randn(1000) * 0.3  # at temperature 0.1, several tokens still have a chance
    warp = warpers(Settings(temperature=temperature, top_p=top_p, top_k=top_k, num_beams=1))
    want = warp(None, logits[None].clone())[0].softmax(dim=-1)
    probs, ids = candidates(logits.clone(), warp, top_k)
    got = torch.zeros_like(want).index_put_((ids,), probs)
    assert torch.allclose(got, want, atol=1e-7) and int((want > 0).sum()) > 1
