"""Helpers for the generate.py tests: a quick LoRA adapter, model hooks that shape generation, a live demo server."""

import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from utils.generation import unwrapped

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"  # git-ignored: screenshots of the tests that drive a browser


def make_adapter(base: Path, folder: Path, seed: int = 0, std: float = 0.5, **method) -> Path:
    """A LoRA adapter (q_proj, v_proj) with non-zero weights, saved as finetune.py saves one (lora_B ~ N(0, std));
    `method`: LoraConfig fields such as use_dora=True."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(seed)  # before PEFT draws lora_A: the same adapter whatever ran before (tests' order)
    config = LoraConfig(**dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM") | method)
    model = get_peft_model(model, config)
    with torch.no_grad():  # PEFT starts lora_B at zero, which would make the adapter a no-op
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, std)
    model.save_pretrained(folder)
    return folder


@contextmanager
def scripted(model, token_ids: list[int]):
    """Make the model say exactly `token_ids`, one per step (then repeat the last): its lm_head output is rigged."""
    calls = {"n": 0}

    def hook(module, args, output):
        token = token_ids[min(calls["n"], len(token_ids) - 1)]
        calls["n"] += 1
        output.fill_(float("-inf"))
        output[..., token] = 0.0
        return output

    handle = unwrapped(model).lm_head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def answering(model, tokenizer, answer_for):
    """Make the model answer every prompt with answer_for(prompt text) + EOS, one token per step.

    Unlike `scripted`, each generation follows its own script, so concurrent requests get different, predictable
    answers: a generate() call is one generation of its thread; in the server's batch (utils.serving) each row is
    its job's. Yields a list that records every generation as {"prompt", "answer", "script" (its token ids),
    "rows" (batch × beams of its prefill), "steps" (forward passes so far)}."""
    from utils.serving import rows_in_flight

    # `alive` holds every job seen: a job freed after its answer could lend its id() to the next one, which would
    # then be taken for a chunk of the old one and follow the old script.
    local, runs, by_job, alive = threading.local(), [], {}, []

    def on_forward(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if ids is None or ids.shape[1] == 1:
            return
        jobs = rows_in_flight()
        for row, job in enumerate(jobs or [None]):  # a prefill: new generations start (the engine's: one a row)
            if jobs and id(job) in by_job:  # the next chunk of a long prompt, or a retry
                continue
            prompt = tokenizer.decode(job.input_ids[0] if jobs else ids[row], skip_special_tokens=True)
            answer = answer_for(prompt)
            script = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            run = {"prompt": prompt, "answer": answer, "script": script, "rows": 1 if jobs else ids.shape[0], "steps": 0}
            runs.append(run)
            by_job[id(job)] = local.run = run
            alive.append(job)

    def on_logits(module, args, output):
        jobs = rows_in_flight()
        rows = [by_job[id(job)] for job in jobs] if jobs else [local.run] * output.shape[0]
        if jobs:  # an engine row's step is its token count, however many chunks its prefill took
            for run, job in zip(rows, jobs):
                run["steps"] = len(job.tokens)
        output.fill_(float("-inf"))
        for i, run in enumerate(rows):
            output[i, ..., run["script"][min(run["steps"], len(run["script"]) - 1)]] = 0.0
        for run in {id(run): run for run in rows}.values():
            run["steps"] += 1
        return output

    handles = [unwrapped(model).register_forward_pre_hook(on_forward, with_kwargs=True),
               unwrapped(model).lm_head.register_forward_hook(on_logits)]
    try:
        yield runs
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def never_eos(model, eos_id: int):
    handle = unwrapped(model).lm_head.register_forward_hook(lambda m, a, out: out.index_fill_(-1, torch.tensor([eos_id]), float("-inf")))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def slowed(model, seconds_per_step: float):
    """Sleep before every forward pass, so that streaming and stopping can be watched at human speed."""
    handle = unwrapped(model).register_forward_pre_hook(lambda *_: time.sleep(seconds_per_step))
    try:
        yield
    finally:
        handle.remove()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(app, auth=None):
    """The demo launched on 127.0.0.1 in this process; yields its URL and closes it afterwards."""
    from utils.demo import launch

    port = free_port()
    launch(app, server_name="127.0.0.1", server_port=port, share=False, auth=auth, block=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()


def hold_back_inductor(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Make torch.compile stop in the middle of compiling (dynamo has traced, inductor waits) until `go` is set;
    `reached` is set once it waits there. Graphs an earlier test compiled in this process are forgotten first."""
    import torch._dynamo
    import torch._inductor.compile_fx

    torch._dynamo.reset()
    reached, go, real = threading.Event(), threading.Event(), torch._inductor.compile_fx.compile_fx

    def held_back(*args, **kwargs):
        reached.set()
        assert go.wait(120), "the test never let the compiler go on"
        return real(*args, **kwargs)

    monkeypatch.setattr(torch._inductor.compile_fx, "compile_fx", held_back)
    return reached, go
