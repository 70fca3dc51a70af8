"""benchmarks/bench_train.py measures what it claims: real tokens, padding, and the --gpu (MFU) path on a tiny model."""

import subprocess
import sys

import pytest

from tiny import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_train  # noqa: E402


@pytest.mark.parametrize("packing", [False, True])
def test_recipe_counts_real_tokens_and_padding(tiny_model, packing):
    spec = dict(steps=1, warmup=1, batch_size=8, micro_batch=4, cutoff_len=400, seed=42, threads=0,
                tokenizer=str(tiny_model), base_model=str(tiny_model), packing=packing, peak_flops=1e12)
    r = bench_train.run_recipe(spec)
    assert r["real_tokens"] > 0 and len(r["losses"]) == 2 and r["tokens_per_s"] > 0
    assert (r["padding_fraction"] > 0) != packing  # padded batches waste compute, packed rows none
    assert 0 < r["mfu"] < 1


def test_ddp_recipe_counts_the_tokens_of_every_rank(tiny_model):
    """--scaling's 2-process run: two torchrun ranks (gloo) train the same global batches as one process."""
    spec = dict(steps=1, warmup=1, batch_size=8, micro_batch=4, cutoff_len=400, seed=42, threads=1,
                tokenizer=str(tiny_model), base_model=str(tiny_model), packing=True)
    one = bench_train.run_recipe(spec)
    two = bench_train.run_in_subprocess(dict(spec, name="ddp"), processes=2)
    assert (two["processes"], two["threads"], len(two["losses"])) == (2, 1, 2)
    assert (two["real_tokens"], two["all_tokens"]) == (one["real_tokens"], one["all_tokens"]) and two["tokens_per_s"] > 0


def test_flops_per_token_is_four_times_the_weights_for_llama_7b():
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=32000, **bench_train.LLAMA_SHAPES["7b"])
    weights = 6.74e9 - 32000 * 4096  # LLaMA-7B without its input embedding
    assert bench_train.flops_per_token(config, 0) == pytest.approx(4 * weights, rel=0.01)


@pytest.mark.slow
def test_smoke_runs_every_gpu_recipe(tmp_path):
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench_train.py", "--smoke", "--output", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.is_file() and "packed-bf16" in out.read_text()
