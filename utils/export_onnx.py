"""ONNX: the merged model as one graph (input_ids, attention_mask -> logits) for ONNX Runtime and friends.

Exported with torch.onnx's dynamo exporter. Two things matter (both measured): the example batch must hold at
least 2 rows, or the exporter specializes the batch axis to 1 and the graph then fails on other batch sizes;
and the KV cache stays off, so the graph is one plain forward pass over the whole sequence.
"""

import logging
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from utils.cli import UserError, log

MODEL_FILE = "model.onnx"
EXAMPLE_SHAPE = (2, 8)  # (batch, seq) of the export example: batch >= 2, see above
CHECK_SHAPE = (3, 13)  # a different batch and length, to prove the axes really are dynamic
ATOL = 1e-3  # float32 logits; ONNX Runtime reorders sums, differences are ~1e-6 on small models


class LogitsOnly(torch.nn.Module):
    """The causal LM as a function of token ids and padding mask that returns only the logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def example_inputs(vocab_size: int, shape: tuple[int, int], seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, shape, generator=generator)
    attention_mask = torch.ones(shape, dtype=torch.int64)
    attention_mask[0, : shape[1] // 3] = 0  # left padding in one row, so the mask is a real input of the graph
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@contextmanager
def quiet_exporter():
    """Silence what torch.onnx says on every export that a user can do nothing about: that torchvision's detection
    ops are not registered (no torchvision here), a deprecation inside torch's own pytree code, and that the two
    dynamic axes share a name."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
            warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used")
            yield
    finally:
        logger.setLevel(level)


def write_onnx(model, out: Path) -> Path:
    """model.onnx (and model.onnx.data for the weights when the exporter splits them off) in `out`."""
    model.config.use_cache = False
    wrapper = LogitsOnly(model).eval()
    inputs = example_inputs(model.config.vocab_size, EXAMPLE_SHAPE)
    axes = {0: "batch", 1: "sequence"}
    path = out / MODEL_FILE
    start = time.perf_counter()
    with torch.no_grad(), quiet_exporter():
        torch.onnx.export(wrapper, (), str(path), kwargs=inputs, dynamo=True, input_names=list(inputs), verbose=False,
                          output_names=["logits"], dynamic_shapes={name: axes for name in inputs})
    log(f"Exported the graph in {time.perf_counter() - start:.1f} s")
    return path


def check_onnx(model, path: Path) -> float:
    """Run the exported graph in ONNX Runtime at a new batch size and length; fail unless it matches PyTorch."""
    import onnxruntime

    inputs = example_inputs(model.config.vocab_size, CHECK_SHAPE, seed=1)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {name: tensor.numpy() for name, tensor in inputs.items()})
    with torch.no_grad():
        want = LogitsOnly(model)(**inputs).float()
    real = inputs["attention_mask"].bool()  # logits at padded positions are meaningless in both runtimes
    diff = (torch.from_numpy(got)[real] - want[real]).abs().max().item()
    if not diff <= ATOL:
        raise UserError(f"ONNX Runtime's logits differ from PyTorch's by {diff:.3g} (> {ATOL}): the export is wrong")
    log(f"ONNX Runtime matches PyTorch at batch {CHECK_SHAPE[0]}, length {CHECK_SHAPE[1]} (max |Δlogit| {diff:.2g})")
    return diff
