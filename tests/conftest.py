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


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes minutes (deselected by default, run with -m slow)")
