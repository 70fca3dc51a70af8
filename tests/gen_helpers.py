"""Helpers for the generate.py tests: a quick LoRA adapter, model hooks that shape generation, a live demo server."""

import socket
import time
from contextlib import contextmanager
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"  # git-ignored: screenshots of the tests that drive a browser


def make_adapter(base: Path, folder: Path, seed: int = 0) -> Path:
    """A LoRA adapter (q_proj, v_proj) with non-zero weights, saved as finetune.py saves one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    torch.manual_seed(seed)
    with torch.no_grad():  # PEFT starts lora_B at zero, which would make the adapter a no-op
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.save_pretrained(folder)
    return folder


def base_of(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


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

    handle = base_of(model).lm_head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def never_eos(model, eos_id: int):
    handle = base_of(model).lm_head.register_forward_hook(lambda m, a, out: out.index_fill_(-1, torch.tensor([eos_id]), float("-inf")))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def slowed(model, seconds_per_step: float):
    """Sleep before every forward pass, so that streaming and stopping can be watched at human speed."""
    handle = base_of(model).register_forward_pre_hook(lambda *_: time.sleep(seconds_per_step))
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
    from generate import launch

    port = free_port()
    launch(app, server_name="127.0.0.1", server_port=port, share=False, auth=auth, block=False)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()
