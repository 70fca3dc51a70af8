"""Data parallel training: two torchrun ranks (gloo on CPU) learn what one process learns from the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import finetune
from tiny import ALPACA, REPO

# Global batch 8: one process runs 2 micro-batches of 4 and accumulates; two ranks run one each and all-reduce.
# No LoRA dropout, whose random masks would differ between the two layouts; fp32, as a layout test, not a precision one.
# cutoff_len 256 keeps all 32 records (the tiny tokenizer's prompts take up to 202 tokens; a record cut off before its
# response is dropped), so that 3 steps stay within full global batches of one epoch.
ARGS = dict(batch_size=8, micro_batch_size=4, cutoff_len=256, val_set_size=0, max_steps=3, logging_steps=1,
            save_steps=100, warmup_steps=0, learning_rate=1e-3, lora_dropout=0.0, bf16=False)


def losses(out):
    return [h["loss"] for h in json.loads((out / "metrics.json").read_text())["log_history"] if "loss" in h]


def test_two_ranks_match_one_process(tiny_model, tmp_path):
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(json.loads(ALPACA.read_text())[:32]))
    common = dict(ARGS, base_model=str(tiny_model), data_path=str(data))

    flags = [f"--{k}={v}" for k, v in common.items()]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "finetune.py",
         *flags, f"--output_dir={tmp_path / 'ddp'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "gloo" in ddp.stdout + ddp.stderr or torch.distributed.is_gloo_available()

    finetune.train(**common, output_dir=str(tmp_path / "single"))

    single_losses, ddp_losses = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert len(ddp_losses) == 3 and ddp_losses == pytest.approx(single_losses, rel=1e-4), (ddp_losses, single_losses)
    single = load_file(tmp_path / "single" / "adapter_model.safetensors")
    parallel = load_file(tmp_path / "ddp" / "adapter_model.safetensors")
    assert single.keys() == parallel.keys()
    for name in single:
        torch.testing.assert_close(parallel[name], single[name], atol=1e-5, rtol=1e-3)
    assert any(t.abs().sum() > 0 for n, t in single.items() if "lora_B" in n)  # it trained
