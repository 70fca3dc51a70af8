"""The adapter methods in llama.cpp: the merged GGUF of each computes the unmerged adapter's logits, the adapter
alone as a GGUF LoRA too (rsLoRA's scale included), and what llama.cpp cannot apply (DoRA's magnitude vector) is
refused in one line before any work. The runs: tests/test_methods.py's."""

import pytest
import torch

from test_export import peft_logits
from test_gguf import F32, export, hf_tokenizer, llama_cpp, llama_logits, load  # noqa: F401 (llama_cpp: a fixture)
from test_methods import METHODS, data, runs  # noqa: F401 (fixtures)
from utils.cli import UserError


@pytest.mark.parametrize("method", METHODS)
def test_gguf_computes_the_adapter(llama_cpp, runs, tiny_model, tmp_path, method):
    """The merged GGUF, and (but for DoRA) the base's GGUF with the adapter as a GGUF LoRA: rsLoRA's alpha/sqrt(r)
    scale included, which llama.cpp would read as alpha/r from the adapter's own alpha."""
    out, _ = runs(method)
    ids = hf_tokenizer(tiny_model)("Name three colours.").input_ids
    want = peft_logits(tiny_model, out, torch.tensor([ids]))[0].numpy()
    merged = export(tiny_model, tmp_path / "merged.gguf", out, outtype="f32")
    assert abs(llama_logits(load(llama_cpp, merged), ids) - want).max() < F32
    if method == "dora":
        return
    lora = export(tiny_model, tmp_path / "lora.gguf", out, outtype="f32", adapter_only=True)
    base = export(tiny_model, tmp_path / "base.gguf", outtype="f32")
    assert abs(llama_logits(load(llama_cpp, base, lora_path=str(lora)), ids) - want).max() < F32


def test_llama_cpp_refuses_dora_before_any_work(runs, tiny_model, tmp_path):
    from export_gguf import export
    from utils.llamacpp import check_backend

    out, _ = runs("dora")
    with pytest.raises(UserError, match="DoRA adapter: llama.cpp cannot apply its magnitude vector"):
        export(base_model=str(tiny_model), lora_weights=str(out), output_file=str(tmp_path / "a.gguf"), adapter_only=True)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="DoRA adapter: llama.cpp cannot apply"):
        check_backend("llama.cpp", "", str(out), "auto")
