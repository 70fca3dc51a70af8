"""The benchmarks measure what they claim: bench_train.py real tokens, padding and the --gpu (MFU) path on a tiny
model; bench_generate.py first-token latency and decoding speed, and its verdict against llama.cpp; bench_quickstart.py
the README's own command and a looping answer."""

import json
import subprocess
import sys

import pytest

from tiny import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_generate  # noqa: E402
import bench_quickstart  # noqa: E402
import bench_serving  # noqa: E402
import common  # noqa: E402
import bench_train  # noqa: E402


@pytest.mark.parametrize("packing", [False, True])
def test_recipe_counts_real_tokens_and_padding(tiny_model, packing):
    spec = dict(steps=1, warmup=1, batch_size=8, micro_batch=4, cutoff_len=400, seed=42, threads=0,
                tokenizer=str(tiny_model), base_model=str(tiny_model), packing=packing, peak_flops=1e12)
    r = bench_train.run_recipe(spec)
    assert r["real_tokens"] > 0 and len(r["losses"]) == 2 and r["tokens_per_s"] > 0
    assert (r["padding_fraction"] > 0) != packing  # padded batches waste compute, packed rows none
    assert 0 < r["mfu"] < 1


def test_profile_accounts_for_the_whole_step_by_op_class(tiny_model):
    spec = dict(steps=1, warmup=1, batch_size=8, micro_batch=4, cutoff_len=400, seed=42, threads=0,
                tokenizer=str(tiny_model), base_model=str(tiny_model), packing=True, bf16=False, profile=True)
    profile = bench_train.run_recipe(spec)["profile"]
    seconds = {name: value["s"] for name, value in profile["classes"].items()}
    for busy in ("matmuls", "attention", "output head + loss", "norms, activations, elementwise"):
        assert seconds[busy] > 0, busy
    assert {"optimizer", "data collation", "Python and host"} <= set(seconds)  # a tiny model's take well under 10 ms
    assert sum(seconds.values()) == pytest.approx(profile["wall_s"], abs=0.05)


def test_ceiling_adds_up_each_matmul_at_its_own_rate():
    config = dict(hidden_size=4, intermediate_size=8, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, vocab_size=16)
    matmuls = bench_train.step_matmuls(config)
    rates = {f"float32 {name}": dict(forward=1.0, backward=0.5) for name in matmuls}  # GFLOP/s
    flops = 4 * (2 * 2 * 4 * 4 + 2 * 2 * 4 * 2 + 2 * 2 * 4 * 8 + 2 * 8 * 4 + 4 * 16)  # k/v: 1 KV head of 2 = 2 wide
    ceiling = bench_train.ceiling(config, rates, "float32")
    assert ceiling["matmul_flops_per_token"] == flops
    assert ceiling["tokens_per_s"] == pytest.approx(1e9 / (flops / 2 * (1 + 2)), rel=1e-3)


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


# --- benchmarks/bench_generate.py -------------------------------------------------------------------------------

def test_generate_timer_measures_first_token_and_decoding(monkeypatch):
    clock = iter([10.0, 10.2, 10.3, 10.4, 10.5])
    monkeypatch.setattr(common.time, "perf_counter", lambda: next(clock))
    timer = common.Timer()  # the request is sent at 10.0
    for piece in ["Alpacas", "", " are", " gentle", "."]:
        if piece:
            timer.piece(piece)
    timer.tokens = 5
    assert timer.result() == dict(first_token_s=0.2, tokens=5, decode_tokens_per_s=13.3, total_s=0.5)


def test_generate_verdict_compares_the_same_precision():
    table = {"bf16-compiled": {"tab greedy": dict(first_token_s=0.1, decode_tokens_per_s=50)},
             "fp32": {"tab greedy": dict(first_token_s=0.6, decode_tokens_per_s=40)},
             "llama.cpp bf16": {"tab greedy": dict(first_token_s=0.1, decode_tokens_per_s=90)},
             "llama.cpp f32": {"tab greedy": dict(first_token_s=0.1, decode_tokens_per_s=60)}}
    assert bench_generate.verdict(table, "2") == [
        "bf16-compiled, tab greedy: 0.56x llama.cpp bf16's tokens/s (2 threads), first token 0.100 s: within the bar",
        "fp32, tab greedy: 0.67x llama.cpp f32's tokens/s (2 threads), first token 0.600 s: NOT within the bar"]


def test_generate_verdict_holds_the_llama_cpp_backend_to_llama_cpp_on_the_same_file():
    """--backend llama.cpp within 10% of llama.cpp's faster thread count on its own file type, not another type's."""
    table = {"llama.cpp-backend": {"tab greedy": dict(first_token_s=0.1, decode_tokens_per_s=110),
                                   "api greedy": dict(first_token_s=0.1, decode_tokens_per_s=100)},
             "llama.cpp q4_1": {"tab greedy": dict(first_token_s=0.1, decode_tokens_per_s=117)},
             "llama.cpp q4_1 1t": {"tab greedy": dict(first_token_s=0.1, decode_tokens_per_s=120)},
             "llama.cpp f16": {"tab greedy": dict(first_token_s=0.1, decode_tokens_per_s=90)}}
    assert bench_generate.verdict(table, "2") == [
        "llama.cpp-backend, tab greedy: 0.92x llama.cpp q4_1 1t's tokens/s: within 10% of llama.cpp",
        "llama.cpp-backend, api greedy: 0.83x llama.cpp q4_1 1t's tokens/s: NOT within 10% of llama.cpp"]


@pytest.mark.slow
def test_generate_smoke_serves_every_configuration_and_scenario(tmp_path):
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench_generate.py", "--smoke", "--output", str(out),
                           "--work_dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert set(report["summary"]) == {c for c in bench_generate.CONFIGS if not bench_generate.backend(c)}
    for config, scenarios in report["summary"].items():
        assert set(scenarios) == set(bench_generate.SCENARIOS), config
        assert scenarios["api greedy"]["tokens"] > 1 and scenarios["api greedy"]["first_token_s"] > 0
    assert report["fp32_greedy_identical"] is True


# --- benchmarks/bench_start.py ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_start_smoke_answers_before_the_compiled_step_is_in_use(tmp_path):
    """generate.py as started by default serves before its compiled step is in use, cold and warm."""
    out = tmp_path / "start.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench_start.py", "--smoke", "--output", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    report = json.loads(out.read_text())
    assert "cpu" in report and "avx512_bf16" in report
    for cache in ("cold", "warm"):
        [run] = report["runs"]["after"][cache]
        assert not run["compiled_before_serving"] and run["answer_tokens"] > 0
        assert run["page_s"] <= run["first_token_s"] <= run["answer_s"] and run["compiled_s"] > 0


# --- benchmarks/bench_serving.py --------------------------------------------------------------------------------

def test_serving_at_start_sends_the_crowd_as_the_server_answers(tmp_path):
    """--at_start: a fresh server per variant, the crowd sent once /v1/models answers; CPU flags and precision kept."""
    out = tmp_path / "at-start.json"
    proc = subprocess.run([sys.executable, "benchmarks/bench_serving.py", "--smoke", "--at_start", "--clients", "6",
                           "--flags", "bf16=False compile=False", "--output", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    report = json.loads(out.read_text())
    assert report["isa_flags"] == common.isa_flags() and report["clients"] == 6
    [run] = report["runs"]
    assert run["flags"]["bf16"] == "False" and run["precision"] == "float32" and not run["compiling"]
    assert run["answered"] == 6 and run["all_answered_s"] > 0 and run["total_s"]["p95"] > 0


@pytest.mark.parametrize("args, message", [
    (dict(flags="bf16"), "space-separated name=value pairs"),
    (dict(flags="bf16=False;compile=False"), "only with --at_start"),
    (dict(at_start=True, rounds=0), "--rounds must be a whole number"),
])
def test_serving_flag_mistakes_are_one_line(args, message):
    from utils.cli import UserError

    with pytest.raises(UserError, match=message):
        bench_serving.main(**args)


# --- benchmarks/bench_quickstart.py -----------------------------------------------------------------------------
def test_quickstart_times_the_readmes_own_commands():
    train, answer = bench_quickstart.quick_start()
    readme = (REPO / "README.md").read_text()
    assert train.startswith("python finetune.py ") and answer.startswith("python generate.py --lora_weights ./lora-alpaca")
    assert f" && {train} && {answer}" in readme  # the very line a newcomer copies, after its pip installs


def test_quickstart_tells_a_looping_answer_from_one_that_ends():
    looping = "Alpacas are " + "native to the Andean region of South America, " * 4
    assert bench_quickstart.repeats_a_phrase(looping)
    assert not bench_quickstart.repeats_a_phrase("Alpacas are domesticated camelids from South America. They are "
                                                 "kept for their soft fleece, and they live in herds.")
