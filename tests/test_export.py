"""The exports (merged HF checkpoint, Meta's layout, ONNX), each read back by the runtime it is for and compared with
the unmerged base + adapter (PeftModel), plus the ways every export, GGUF included, must fail: one line, nothing
left. GGUF files are judged by llama.cpp itself in tests/test_gguf.py.

Tolerance on logits (float32 models with logits of order 1): 1e-4, where only the order of float32 sums differs.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gen_helpers import make_adapter
from tiny import ALPACA
from reference_llama import check_shapes, forward, load_consolidated

REPO = Path(__file__).resolve().parent.parent
TEXTS = ["Below is an instruction that describes a task.\n\n### Instruction:\nName three colours.\n\n### Response:\n",
         "Give 3 tips for staying healthy: 1234 héllo wörld!"]
EXACT = 1e-4


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_model, tiny_gqa_model) -> dict[Path, Path]:
    """A non-zero LoRA adapter for each tiny base."""
    root = tmp_path_factory.mktemp("adapters")
    return {base: make_adapter(base, root / base.name, seed=i) for i, base in enumerate((tiny_model, tiny_gqa_model))}


def token_ids(base: Path, text: str = TEXTS[0]) -> torch.Tensor:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base)(text, return_tensors="pt").input_ids


@torch.no_grad()
def peft_logits(base: Path, adapter: Path, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """The ground truth: the base with the adapter applied unmerged, as training left it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    return model(input_ids=input_ids, attention_mask=attention_mask).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# --- merged Hugging Face checkpoint -------------------------------------------------------------------------------

def test_hf_checkpoint_matches_base_plus_adapter(tmp_path, tiny_model, adapters):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from export_hf_checkpoint import export

    out = tmp_path / "hf"
    export(base_model=str(tiny_model), lora_weights=str(adapters[tiny_model]), output_dir=str(out), dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(out)  # transformers alone: no PEFT, no adapter
    assert not any("lora" in name for name, _ in model.named_parameters())
    ids = token_ids(tiny_model)
    with torch.no_grad():
        got = model(ids).logits
    assert max_diff(got, peft_logits(tiny_model, adapters[tiny_model], ids)) < EXACT
    assert (out / "tokenizer.model").is_file() and (out / "tokenizer_config.json").is_file()
    assert AutoTokenizer.from_pretrained(out)(TEXTS[1]).input_ids == AutoTokenizer.from_pretrained(tiny_model)(TEXTS[1]).input_ids


# --- which base an adapter is merged onto ---------------------------------------------------------------------------

def merged_logits(tmp_path, adapter: Path, base_model: str = "") -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    from export_hf_checkpoint import export

    out = tmp_path / "merged"
    export(base_model=base_model, lora_weights=str(adapter), output_dir=str(out), dtype="float32")
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(out)(token_ids(out)).logits


def moved_adapter(adapter: Path, folder: Path) -> Path:
    """A copy of the adapter whose adapter_config.json names a base that is not on this machine."""
    import shutil

    copy = Path(shutil.copytree(adapter, folder))
    config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "/elsewhere/llama-7b"}))
    return copy


def test_without_base_model_the_adapter_is_merged_onto_its_own_base(tmp_path, tiny_gqa_model, adapters, monkeypatch):
    """No --base_model and no $BASE_MODEL: the base the adapter names (PEFT's adapter_config.json), not the embedded one."""
    monkeypatch.delenv("BASE_MODEL", raising=False)
    adapter = adapters[tiny_gqa_model]
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_gqa_model)
    got = merged_logits(tmp_path, adapter)
    assert max_diff(got, peft_logits(tiny_gqa_model, adapter, token_ids(tiny_gqa_model))) < EXACT


def test_base_model_environment_variable_is_honoured(tmp_path, tiny_gqa_model, adapters, monkeypatch):
    """The original's `BASE_MODEL=... python export_hf_checkpoint.py`, for an adapter whose own base is elsewhere."""
    adapter = moved_adapter(adapters[tiny_gqa_model], tmp_path / "moved")
    monkeypatch.setenv("BASE_MODEL", str(tiny_gqa_model))
    got = merged_logits(tmp_path, adapter)
    assert max_diff(got, peft_logits(tiny_gqa_model, adapter, token_ids(tiny_gqa_model))) < EXACT


def test_base_model_flag_beats_the_environment(tmp_path, tiny_model, tiny_gqa_model, adapters, monkeypatch):
    monkeypatch.setenv("BASE_MODEL", str(tiny_model))  # 4 KV heads: the GQA adapter does not fit it
    adapter = adapters[tiny_gqa_model]
    got = merged_logits(tmp_path, adapter, base_model=str(tiny_gqa_model))
    assert max_diff(got, peft_logits(tiny_gqa_model, adapter, token_ids(tiny_gqa_model))) < EXACT
    monkeypatch.delenv("BASE_MODEL")
    assert "trained for another base model" in fails(merged_logits, tmp_path / "other", adapter, base_model=str(tiny_model))


# --- Meta's consolidated layout -----------------------------------------------------------------------------------

@pytest.mark.parametrize("num_shards", [1, 2])
@pytest.mark.parametrize("which", ["tiny_model", "tiny_gqa_model"])
def test_meta_layout_runs_in_reference_code(request, tmp_path, adapters, which, num_shards):
    from transformers import AutoConfig

    from export_state_dict_checkpoint import export

    base = request.getfixturevalue(which)
    out = tmp_path / "meta"
    export(base_model=str(base), lora_weights=str(adapters[base]), output_dir=str(out), num_shards=num_shards,
           dtype="float32")
    assert sorted(p.name for p in out.glob("consolidated.*.pth")) == [f"consolidated.{i:02d}.pth" for i in range(num_shards)]
    params, state = load_consolidated(out)
    check_shapes(params, state)
    config = AutoConfig.from_pretrained(base)
    assert params["dim"] == config.hidden_size and params["n_layers"] == config.num_hidden_layers
    assert params["n_heads"] == config.num_attention_heads and params["vocab_size"] == config.vocab_size
    assert params.get("n_kv_heads", params["n_heads"]) == config.num_key_value_heads
    assert params["norm_eps"] == config.rms_norm_eps
    assert (out / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
    ids = token_ids(base)
    assert max_diff(forward(params, state, ids), peft_logits(base, adapters[base], ids)) < EXACT


def test_meta_layout_of_llama3(tmp_path):
    """A Llama 3.1-shaped base (byte-level BPE, llama3 RoPE scaling with Meta's constants, tied embeddings):
    params.json as Meta's llama-models reads it, and Meta's maths (scaled RoPE) gives transformers' logits."""
    from families import make_family_model
    from utils.export_meta import META_LLAMA3_ROPE

    from export_state_dict_checkpoint import export

    rope = dict(rope_type="llama3", rope_theta=500000.0, **META_LLAMA3_ROPE)
    base = make_family_model(tmp_path / "base", "llama3", rope_parameters=rope, intermediate_size=192)
    adapter = make_adapter(base, tmp_path / "adapter")
    out = tmp_path / "meta"
    export(base_model=str(base), lora_weights=str(adapter), output_dir=str(out), dtype="float32")
    params, state = load_consolidated(out)
    assert params["rope_theta"] == 500000.0 and params["use_scaled_rope"] is True
    config = json.loads((base / "config.json").read_text())
    assert params["vocab_size"] == config["vocab_size"] and params["n_kv_heads"] == 2
    hidden = int(2 * 4 * params["dim"] / 3 * params.get("ffn_dim_multiplier", 1))  # Meta's formula, as the issue states it
    assert params["multiple_of"] * -(-hidden // params["multiple_of"]) == config["intermediate_size"] == 192
    check_shapes(params, state)
    # The tiny tokenizer is trained anew (GPT-2's split, special tokens first): not what Meta's Tokenizer builds.
    assert not (out / "tokenizer.model").exists() and (out / "tokenizer.json").is_file()
    ids = token_ids(base)
    assert max_diff(forward(params, state, ids), peft_logits(base, adapter, ids)) < EXACT
    params["use_scaled_rope"] = False
    # The scaling matters: without it Meta's maths misses transformers' logits by more than the match's tolerance
    # (2.5e-4 here: over a short prompt only the slowest rotations, those it rescales, differ, and a little).
    assert max_diff(forward(params, state, ids), peft_logits(base, adapter, ids)) > EXACT


def test_tiktoken_ranks_of_a_llama3_style_tokenizer():
    """A byte-level BPE split with Llama 3's pattern, special tokens appended where Meta's code puts them: the ranks
    are its ids and each line's base64 is the token's bytes."""
    import base64

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    from utils.export_meta import LLAMA3_PATTERN, LLAMA3_SPECIALS, tiktoken_ranks

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), "isolated"),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([r["output"] for r in json.loads(ALPACA.read_text())[:200]], trainer)
    size = tokenizer.get_vocab_size()
    specials = {offset: name for name, offset in LLAMA3_SPECIALS.items()}
    tokenizer.add_special_tokens([specials.get(i, f"<|reserved_special_token_{i}|>") for i in range(10)])
    ranks, problem = tiktoken_ranks(json.loads(tokenizer.to_str()))
    assert problem == "" and sorted(rank for _, rank in ranks) == list(range(size))
    decoded = {rank: base64.b64decode(token) for token, rank in ranks}
    text = "Give 3 tips,\n\n naïve café 日本!"
    assert b"".join(decoded[i] for i in tokenizer.encode(text).ids) == text.encode()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split: not Meta's
    assert tiktoken_ranks(json.loads(tokenizer.to_str()))[0] is None


# --- ONNX ---------------------------------------------------------------------------------------------------------

def test_onnx_runs_in_onnxruntime_at_new_shapes(tmp_path, tiny_gqa_model, adapters, capfd):
    import warnings

    import onnxruntime
    from transformers import AutoTokenizer

    from export_onnx import export

    out = tmp_path / "onnx"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export(base_model=str(tiny_gqa_model), lora_weights=str(adapters[tiny_gqa_model]), output_dir=str(out))
    printed = capfd.readouterr()
    noise = [str(w.message) for w in caught if "treespec" in str(w.message) or "axis name" in str(w.message)]
    assert not noise and "torchvision" not in printed.err and "[torch.onnx]" not in printed.out  # nothing to act on
    assert (out / "model.onnx").is_file()  # published only after export() checked it against the merged model
    tokenizer = AutoTokenizer.from_pretrained(out)  # the tokenizer travels with the graph
    tokenizer.pad_token, tokenizer.padding_side = tokenizer.unk_token, "left"
    batch = tokenizer([*TEXTS, "Hi"], return_tensors="pt", padding=True)  # batch 3, not the export's 2
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {k: v.numpy() for k, v in batch.items()})
    want = peft_logits(tiny_gqa_model, adapters[tiny_gqa_model], batch.input_ids, batch.attention_mask)
    real = batch.attention_mask.bool()
    assert max_diff(torch.from_numpy(got)[real], want[real]) < EXACT


# --- failures: one line, nothing half-written -------------------------------------------------------------------

def snapshot(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def fails(call, *args, **kwargs) -> str:
    from utils.cli import UserError

    with pytest.raises(UserError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and message
    return message


def exporters():
    import export_gguf
    import export_hf_checkpoint
    import export_onnx
    import export_state_dict_checkpoint

    return {"hf": export_hf_checkpoint.export, "meta": export_state_dict_checkpoint.export,
            "gguf": export_gguf.export, "onnx": export_onnx.export}


def output_args(kind: str, path: Path) -> dict:
    return {"output_file": str(path) + ".gguf"} if kind == "gguf" else {"output_dir": str(path)}


@pytest.mark.parametrize("kind", ["hf", "meta", "gguf", "onnx"])
def test_missing_adapter(tmp_path, tiny_model, kind):
    message = fails(exporters()[kind], base_model=str(tiny_model), lora_weights=str(tmp_path / "nope"),
                    **output_args(kind, tmp_path / "out"))
    assert "not found" in message
    assert snapshot(tmp_path) == []


@pytest.mark.parametrize("kind", ["hf", "meta", "gguf", "onnx"])
def test_adapter_for_another_base(tmp_path, tiny_gqa_model, tiny_model, adapters, kind):
    """The tiny_model adapter's v_proj is 64 rows; tiny_gqa_model's (2 KV heads) is 32."""
    message = fails(exporters()[kind], base_model=str(tiny_gqa_model), lora_weights=str(adapters[tiny_model]),
                    **output_args(kind, tmp_path / "out" / "deeper"))
    assert "another base model" in message
    assert snapshot(tmp_path) == []  # not even the parent directories it created


@pytest.mark.parametrize("kind", ["hf", "meta", "onnx"])
def test_non_empty_output_dir(tmp_path, tiny_model, kind):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    message = fails(exporters()[kind], base_model=str(tiny_model), output_dir=str(tmp_path / "out"))
    assert "not empty" in message and "--overwrite_output_dir" in message
    assert snapshot(tmp_path) == ["out", "out/precious.txt"]


def test_existing_gguf_file(tmp_path, tiny_model):
    (tmp_path / "model.gguf").write_text("keep me")
    message = fails(exporters()["gguf"], base_model=str(tiny_model), output_file=str(tmp_path / "model.gguf"))
    assert "exists" in message and "--overwrite" in message
    assert (tmp_path / "model.gguf").read_text() == "keep me"


@pytest.mark.parametrize("kind", ["hf", "meta", "gguf", "onnx"])
def test_unwritable_output(tmp_path, tiny_model, kind):
    """A path under a regular file can never be created, even by root (which ignores permission bits)."""
    (tmp_path / "file").write_text("")
    message = fails(exporters()[kind], base_model=str(tiny_model), **output_args(kind, tmp_path / "file" / "out"))
    assert "not writable" in message
    assert snapshot(tmp_path) == ["file"]


@pytest.mark.parametrize("kind, flag", [("hf", {"dtype": "int4"}), ("meta", {"dtype": "float8"}),
                                        ("gguf", {"outtype": "q3_k"})])
def test_unknown_dtype(tmp_path, tiny_model, kind, flag):
    message = fails(exporters()[kind], base_model=str(tiny_model), **output_args(kind, tmp_path / "out"), **flag)
    assert re.search(r"unknown --outtype|--dtype must be one of", message) and list(flag.values())[0] in message
    assert snapshot(tmp_path) == []


def test_num_shards_must_divide_the_heads(tmp_path, tiny_gqa_model):
    message = fails(exporters()["meta"], base_model=str(tiny_gqa_model), output_dir=str(tmp_path / "out"), num_shards=4)
    assert "--num_shards 4" in message and "2 KV heads" in message
    fails(exporters()["meta"], base_model=str(tiny_gqa_model), output_dir=str(tmp_path / "out"), num_shards=3)
    assert snapshot(tmp_path) == []


def test_gguf_without_llama_cpp_names_the_install_command(tmp_path, tiny_model, monkeypatch):
    from importlib.metadata import PackageNotFoundError

    import utils.llamacpp

    def missing(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(utils.llamacpp, "version", missing)
    message = fails(exporters()["gguf"], base_model=str(tiny_model), output_file=str(tmp_path / "out" / "m.gguf"))
    assert "pip install llama-cpp-python==0.3.36" in message
    assert snapshot(tmp_path) == []


def test_gguf_adapter_only_mistakes(tmp_path, tiny_model, adapters):
    message = fails(exporters()["gguf"], base_model=str(tiny_model), lora_weights=str(adapters[tiny_model]),
                    output_file=str(tmp_path / "a.gguf"), adapter_only=True, outtype="q4_k_m")
    assert "--adapter_only" in message and "q4_k_m" in message
    message = fails(exporters()["gguf"], base_model=str(tiny_model), output_file=str(tmp_path / "a.gguf"), adapter_only=True)
    assert "--lora_weights" in message
    assert snapshot(tmp_path) == []


def test_cli_prints_one_line_error(tmp_path, tiny_model):
    out = tmp_path / "model.gguf"
    result = subprocess.run([sys.executable, "export_gguf.py", "--base_model", str(tiny_model),
                             "--lora_weights", str(tmp_path / "missing"), "--output_file", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: adapter directory {tmp_path / 'missing'} not found"
    assert "Traceback" not in result.stderr and not out.exists()


def test_help_documents_every_flag():
    """--help comes from the docstring's Args (utils.cli.help_text): every parameter of every export script is described there."""
    import inspect

    for name, export in exporters().items():
        doc = inspect.getdoc(export)
        for flag in inspect.signature(export).parameters:
            assert f"\n    {flag}: " in doc, f"{name}: --{flag} is undocumented"


# --- a base saved pre-quantized -----------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_a_base_saved_quantized_is_dequantized_for_the_merge(tmp_path, tiny_model, adapters, bits):
    """bitsandbytes weights in the checkpoint: the export merged nothing and kept quantization_config (8-bit), or
    refused the adapter as "trained for another base model" (4-bit, whose packed weights have other shapes)."""
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from export_hf_checkpoint import export
    from utils.models import quantization_config

    quantized = tmp_path / f"base-{bits}"
    AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=quantization_config(bits, torch.float32),
                                         device_map={"": "cpu"}).save_pretrained(quantized)
    for file in tiny_model.glob("tokenizer*"):
        shutil.copy(file, quantized)
    out = tmp_path / "hf"
    export(base_model=str(quantized), lora_weights=str(adapters[tiny_model]), output_dir=str(out), dtype="float32")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    ids = token_ids(tiny_model)
    dequantized = AutoModelForCausalLM.from_pretrained(quantized).dequantize().float()
    with torch.no_grad():
        base = dequantized(ids).logits
        expected = PeftModel.from_pretrained(dequantized, adapters[tiny_model]).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out)(ids).logits
    assert max_diff(got, expected) < EXACT and max_diff(got, base) > 100 * EXACT  # the adapter is in it
