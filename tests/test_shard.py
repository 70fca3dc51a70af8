"""Bases larger than one GPU (docs/scale.md): the sharded launchers' 70B commands at small size, on 2 CPU ranks.

A 24-layer LLaMA of 296 MiB (fp32) stands for the 70B. Each rank writes its resident and peak memory
($ALPACA_LORA_PEAK_MEMORY) at the start of loading, once the model is sharded, and at the end; the figures are in
model copies. Rank 0 reads the checkpoint (at least one whole copy); rank 1 must never hold one: it starts empty
under FSDP (its shard arrives from rank 0) and loads its partition alone under ZeRO-3 (zero.Init). glibc keeps freed
memory unless large blocks are mapped on their own (MALLOC_MMAP_THRESHOLD_), which would overstate every peak.
Each run must also learn what one process learns from the same global batch, and FSDP resumes from its sharded
checkpoint. The 4-bit (QLoRA) launches run on the tiny model: bitsandbytes' CPU kernels make a large one slow."""

import json
import sys

import pytest
import torch

import finetune
from test_scale import (ACCELERATE, FSDP_ON_CPU, ON_CPU, assert_learned_what_one_process_learns, flags, free_port,
                        interrupt_after_step_2, launch)
from tiny import ALPACA, REPO, make_tiny_llama
from utils.cli import UserError

# Deep and narrow, as a 70B is per GPU: one layer is 1/24 of the weights, so what FSDP or ZeRO-3 gathers at a time is
# small against a shard. Micro-batches of 1 record with gradient checkpointing keep activations small beside the
# weights, as they are beside a 70B's.
SHAPE = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=24, num_attention_heads=8, num_key_value_heads=8)
ARGS = dict(batch_size=4, micro_batch_size=1, cutoff_len=256, val_set_size=0, max_steps=3, logging_steps=1, save_steps=2,
            warmup_steps=0, learning_rate=1e-3, lora_dropout=0.0, lora_r=16, quantization="none", bf16=False,
            gradient_checkpointing=True)
QLORA_ARGS = dict(ARGS, batch_size=8, micro_batch_size=4, gradient_checkpointing=False, quantization="4bit")
# Measured on 2026-12-06 (2-core Xeon): rank 1 peaked at 0.63 (FSDP) and 0.71 (ZeRO-3) copies once sharded, and at
# 0.73-0.75 over a whole run beyond what the same run costs on the tiny model (imports, buffers: 0.16-0.18 copies);
# rank 0 peaked at 1.61-1.64 copies.
LOADED_LIMIT = 0.75  # rank 1, by the time the model is sharded
RUN_LIMIT = 0.85  # rank 1, a whole run, beyond the fixed cost the tiny model's run measures


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "alpaca.json"
    path.write_text(json.dumps(json.loads(ALPACA.read_text())[:32]))
    return path


@pytest.fixture(scope="module")
def big_model(tmp_path_factory, tiny_model):
    return make_tiny_llama(tmp_path_factory.mktemp("big-llama"), tokenizer_from=tiny_model, **SHAPE)


def model_bytes(model) -> int:
    return sum(f.stat().st_size for f in model.glob("*.safetensors"))


def measured(folder) -> dict[int, dict[str, int]]:
    """Each rank's peak memory at each stage beyond its resident memory at the start, in bytes."""
    figures = {}
    for path in sorted(folder.glob("rank-*.json")):
        stages = json.loads(path.read_text())
        start = stages["start"]["rss_kib"]
        figures[int(path.stem.split("-")[1])] = {s: (v["peak_kib"] - start) * 1024 for s, v in stages.items()}
    return figures


def run(command, model, args, out, per=None, **extra_env) -> dict:
    """Launch finetune.py; each rank's peak memory at each stage in copies of `per` (default: this model)."""
    memory = out.parent / f"{out.name}-memory"
    launch([*command, "finetune.py", *flags(dict(args, base_model=str(model)), out)], timeout=600,
           ALPACA_LORA_PEAK_MEMORY=str(memory), MALLOC_MMAP_THRESHOLD_="65536", **extra_env)
    size = model_bytes(per or model)
    return {rank: {stage: peak / size for stage, peak in stages.items()} for rank, stages in measured(memory).items()}


@pytest.fixture(scope="module")
def single(big_model, data, tmp_path_factory):
    """One process (what each DDP rank holds): the losses and adapter the sharded runs must reproduce."""
    out = tmp_path_factory.mktemp("single") / "run"
    return out, run([sys.executable], big_model, dict(ARGS, data_path=str(data)), out)


def fsdp(port=None) -> list[str]:
    return [*ACCELERATE, "--config_file", "configs/fsdp.yaml", *ON_CPU, "--main_process_port", port or free_port()]


def zero3(tmp_path) -> list[str]:
    """configs/deepspeed_zero3.yaml with its live-parameter limits scaled to this model: 1e9 parameters stay gathered
    at once (1/70 of a 70B), which would be this whole model; 1e6 is about 1/80 of it."""
    config = json.loads((REPO / "configs" / "ds_zero3.json").read_text())
    config["zero_optimization"].update(stage3_max_live_parameters=1e6, stage3_max_reuse_distance=1e6)
    path = tmp_path / "ds_zero3_small.json"
    path.write_text(json.dumps(config))
    return [*ACCELERATE, "--config_file", "configs/deepspeed_zero3.yaml", "--num_processes", "2",
            "--deepspeed_config_file", str(path), "--main_process_port", free_port()]


def assert_rank1_never_holds_a_copy(big, tiny):
    print("model copies, rank 1 sharded / whole run beyond the tiny run:", round(big[1]["sharded"], 2),
          round(big[1]["sharded"] - tiny[1]["sharded"], 2), round(big[1]["end"] - tiny[1]["end"], 2))
    assert big[0]["sharded"] > 1.0, big  # rank 0 read the whole checkpoint: the measure sees a copy
    assert big[1]["sharded"] < LOADED_LIMIT, big
    assert big[1]["end"] - tiny[1]["end"] < RUN_LIMIT, (big, tiny)


@pytest.mark.slow
def test_fsdp_rank1_never_holds_the_base_and_resumes(big_model, tiny_model, data, single, tmp_path):
    args = dict(ARGS, data_path=str(data))
    out = tmp_path / "fsdp"
    big = run(fsdp(), big_model, args, out, **FSDP_ON_CPU)
    tiny = run(fsdp(), tiny_model, args, tmp_path / "tiny", per=big_model, **FSDP_ON_CPU)  # the fixed cost
    assert_rank1_never_holds_a_copy(big, tiny)
    assert_learned_what_one_process_learns(out, single[0], str(big_model))
    assert single[1][0]["end"] > 1.0  # one process (a DDP rank) holds the whole base

    interrupt_after_step_2(out)  # resuming reads the sharded checkpoint, rank 1 its own shard
    resumed = run(fsdp(), big_model, dict(args, resume_from_checkpoint=True), out, **FSDP_ON_CPU)
    assert resumed[1]["sharded"] < LOADED_LIMIT, resumed
    assert_learned_what_one_process_learns(out, single[0], str(big_model))


@pytest.mark.slow
def test_zero3_rank1_never_holds_the_base(big_model, tiny_model, data, single, tmp_path):
    args = dict(ARGS, data_path=str(data))
    out = tmp_path / "zero3"
    big = run(zero3(tmp_path), big_model, args, out, DS_ACCELERATOR="cpu")
    tiny = run(zero3(tmp_path), tiny_model, args, tmp_path / "tiny", per=big_model, DS_ACCELERATOR="cpu")
    assert_rank1_never_holds_a_copy(big, tiny)
    assert (out / "checkpoint-3" / "global_step3").is_dir()
    assert_learned_what_one_process_learns(out, single[0], str(big_model))


@pytest.fixture(scope="module")
def single_4bit(tiny_model, data, tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    out = tmp_path_factory.mktemp("single-4bit")
    finetune.train(**QLORA_ARGS, base_model=str(tiny_model), data_path=str(data), output_dir=str(out))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("config", ["fsdp_qlora.yaml", "deepspeed_zero3_qlora.yaml"])
def test_qlora_sharded_learns_what_one_process_learns(tiny_model, data, single_4bit, tmp_path, config):
    """4-bit NF4 weights stored in the compute dtype (fp32 here: no mixed precision on CPU) and sharded."""
    out = tmp_path / "qlora"
    command = [*ACCELERATE, "--config_file", f"configs/{config}", *ON_CPU, "--main_process_port", free_port()]
    extra = FSDP_ON_CPU if config.startswith("fsdp") else dict(DS_ACCELERATOR="cpu")
    run(command, tiny_model, dict(QLORA_ARGS, data_path=str(data)), out, **extra)
    assert_learned_what_one_process_learns(out, single_4bit, str(tiny_model))


# Refused before loading: each combination sharding cannot run, as the launcher's environment sets it up.
FSDP_ENV = dict(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2", ALPACA_LORA_FSDP_ON_CPU="1")


@pytest.mark.parametrize("environment, flags_, error", [
    (FSDP_ENV, dict(quantization="8bit"), "an 8-bit base cannot be sharded by FSDP"),
    (dict(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE="3"), dict(quantization="8bit"),
     "an 8-bit base cannot be sharded by ZeRO-3"),
    (dict(FSDP_ENV, ACCELERATE_MIXED_PRECISION="fp16"), dict(quantization="4bit", bf16=False),
     "4-bit weights are stored as float32 (the compute dtype) but the launcher's mixed precision is fp16"),
    (dict(FSDP_ENV, FSDP_VERSION="1"), dict(quantization="none"), "FSDP1 (fsdp_version 1) cannot save"),
])
def test_impossible_sharding_is_one_line_before_loading(tiny_model, alpaca_file, tmp_path, monkeypatch,
                                                        environment, flags_, error):
    pytest.importorskip("bitsandbytes")
    from utils import models

    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(UserError, match=error.replace("(", r"\(").replace(")", r"\)")):
        finetune.train(base_model=str(tiny_model), data_path=str(alpaca_file), output_dir=str(tmp_path / "out"),
                       **flags_)


def test_prequantized_base_is_refused_under_sharding(tiny_model, alpaca_file, tmp_path, monkeypatch):
    import shutil

    base = tmp_path / "gptq"
    shutil.copytree(tiny_model, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq", "bits": 4}}))
    for key, value in FSDP_ENV.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UserError, match="the base is pre-quantized \\(gptq\\): FSDP cannot shard"):
        finetune.train(base_model=str(base), data_path=str(alpaca_file), output_dir=str(tmp_path / "out"),
                       quantization="none")


def test_memory_table_is_what_the_calculator_computes_and_agrees_with_the_cpu_runs():
    """docs/scale.md's table comes from benchmarks/results/memory.json (report.py); the file must be what
    benchmarks/memory.py computes, and its arithmetic must agree with what the slow tests above measured."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import memory

    assert json.loads(memory.RESULT.read_text()) == json.loads(json.dumps(memory.results())), (
        "benchmarks/results/memory.json is stale: run python benchmarks/memory.py && python benchmarks/report.py")
    for launcher, check in memory.cpu_check().items():
        assert check["measured_run"] == pytest.approx(check["predicted_run"], abs=0.1), (launcher, check)
        assert check["measured_sharded"] == pytest.approx(check["predicted_sharded"], abs=0.1), (launcher, check)
    rows = {(r["model"], r["launcher"], r["precision"]): r for r in memory.results()["per_gpu"]}
    assert rows["70B", "fsdp", "bf16"]["train_checkpointing_gib"] < 80 < rows["70B", "ddp", "bf16"]["loading_gib"]


def test_auto_quantization_is_16_bit_under_sharded_launchers():
    from utils.models import pick_quantization

    assert pick_quantization("auto", "cuda", sharded=True) == "none"
    assert pick_quantization("auto", "cpu", sharded=True) == "none"


# The merge for a base no process can hold: export_hf_checkpoint.py merges file by file (utils/merge_shards.py).
PEAK_AFTER = """
import json, sys
import peft, safetensors.torch, torch, transformers  # imported before the start: their memory is not the merge's
import export_hf_checkpoint, utils.export, utils.merge_shards
from utils.distributed import memory_kib
start = memory_kib("VmRSS")
{call}
print(json.dumps((memory_kib("VmHWM") - start) * 1024))
"""
BY_SHARDS = ("from export_hf_checkpoint import export; export(base_model=sys.argv[1], lora_weights=sys.argv[2], "
             "output_dir=sys.argv[3], max_shard_size='100MB')")
WHOLE = ("from utils import export as ex; import torch; ex.load_merged(sys.argv[1], sys.argv[2], torch.float32)"
         ".save_pretrained(sys.argv[3], max_shard_size='100MB')")


def peak_bytes(call: str, *argv) -> int:
    import subprocess

    from test_scale import env

    proc = subprocess.run([sys.executable, "-c", PEAK_AFTER.format(call=call), *map(str, argv)], cwd=REPO,
                          env=env(MALLOC_MMAP_THRESHOLD_="65536"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_export_merges_a_large_base_file_by_file(big_model, tmp_path):
    """The export equals PEFT's merge on the whole model, at a fraction of its memory: a 296 MiB model split into
    100 MB shards peaked at 0.36 model copies (2026-12-06) against 1.13 for loading and merging it whole."""
    from gen_helpers import make_adapter
    from safetensors.torch import load_file

    adapter = make_adapter(big_model, tmp_path / "adapter")
    size = model_bytes(big_model)
    shards = peak_bytes(BY_SHARDS, big_model, adapter, tmp_path / "shards") / size
    whole = peak_bytes(WHOLE, big_model, adapter, tmp_path / "whole") / size
    print(f"peak: {shards:.2f} model copies file by file, {whole:.2f} whole")
    assert shards < 0.6 and whole > 1.0, (shards, whole)
    files = sorted((tmp_path / "shards").glob("model-*.safetensors"))
    assert len(files) > 1 and all(f.stat().st_size < 100e6 for f in files)
    ours = {k: v for f in files for k, v in load_file(f).items()}
    reference = {k: v for f in (tmp_path / "whole").glob("*.safetensors") for k, v in load_file(f).items()}
    assert ours.keys() == reference.keys()
    assert max((ours[k] - reference[k]).abs().max().item() for k in ours) < 1e-5
    assert any("q_proj" in k and not torch.equal(ours[k], base) for k, base in load_file(
        big_model / "model.safetensors").items())  # the adapter changed the weights it adapts
