"""Shared fixtures: tiny LLaMA models built on the fly, the embedded SmolLM2, small data files."""

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny import ALPACA, make_tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer LLaMA with 4 attention and 4 KV heads and a SentencePiece tokenizer."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gqa_model(tmp_path_factory, tiny_model) -> Path:
    """The same shape with grouped-query attention (2 KV heads for 4 query heads)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-gqa"), num_key_value_heads=2, seed=1, tokenizer_from=tiny_model)


@pytest.fixture(scope="session")
def embedded_model() -> str:
    """The embedded SmolLM2-135M-Instruct as a plain HF checkpoint (converted once into the user cache)."""
    from utils.models import resolve_base_model

    return resolve_base_model(None)


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """generate.main sets torch's (process-wide) thread count for serving; later tests get the default back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def alpaca_file(tmp_path) -> Path:
    """40 real Alpaca records from the shipped sample."""
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(json.loads(ALPACA.read_text())[:40]))
    return path


# Tiers (docs/testing.md): `-m unit` is the fast tier a contributor runs on every change (no model is trained, no
# server, subprocess, build, browser or Docker); integration tests train, serve and export tiny models; system tests
# run the real outside runtimes and launchers (llama.cpp, a browser, Docker, torchrun/accelerate ranks); slow ones
# are full-size runs on the embedded model. `python -m pytest -q` runs them all.
INTEGRATION = {"test_adapters", "test_bench", "test_chat_api", "test_cli", "test_durable", "test_evaluation", "test_export",
               "test_families", "test_finetune", "test_generate", "test_methods"}
SYSTEM = {"test_ddp", "test_default_path", "test_demo", "test_docker", "test_gguf", "test_methods_gguf", "test_scale",
          "test_shard"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a full-size run on the embedded model (minutes)")
    config.addinivalue_line("markers", "unit: the fast tier (seconds each; -m unit runs it in under 2 minutes)")
    config.addinivalue_line("markers", "integration: trains, serves or exports tiny models end to end")
    config.addinivalue_line("markers", "system: real outside runtimes and launchers (llama.cpp, browser, Docker, ranks)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        tier = "system" if module in SYSTEM else "integration" if module in INTEGRATION else "unit"
        item.add_marker(tier)
