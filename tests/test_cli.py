"""Mistakes cost seconds: every script checks its flags, values, data, models and adapters before any work starts,
and answers each mistake with one line, exit status 2, no traceback and nothing written. Plus --help for each."""

import json
import os
import re
import socket
import subprocess
import sys
import tempfile

import pytest

from gen_helpers import make_adapter
from tiny import REPO

SCRIPTS = ["finetune.py", "generate.py", "evaluate.py", "export_hf_checkpoint.py", "export_state_dict_checkpoint.py",
           "export_gguf.py", "export_onnx.py", "benchmarks/bench_train.py", "benchmarks/bench_generate.py",
           "benchmarks/bench_serving.py", "benchmarks/bench_start.py", "benchmarks/bench_methods.py",
           "benchmarks/bench_merge.py", "benchmarks/bench_quickstart.py", "merge_adapters.py"]
# What loading a model (every model class builds on transformers.modeling_utils) or adapting one imports. A mistake
# is answered before any of it: loading is the work that takes seconds to minutes, and these imports alone take seconds.
MODEL_CODE = {"transformers.modeling_utils", "peft"}
# An endpoint where nothing listens: the Hub "cannot be reached", as on a machine without a network.
NO_NETWORK = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": None, "HF_DATASETS_OFFLINE": None}


@pytest.fixture(scope="module")
def files(tiny_model, tiny_gqa_model, tmp_path_factory):
    """What the mistakes are made with: the tiny models, an adapter for one of them, data files good and bad."""
    root = tmp_path_factory.mktemp("mistakes")
    records = json.loads((REPO / "data" / "alpaca_en_demo.json").read_text())[:20]
    (root / "good.json").write_text(json.dumps(records))
    (root / "null.json").write_text(json.dumps(records[:3] + [dict(records[3], input=None)]))
    (root / "latin1.json").write_bytes(json.dumps(records[:2]).encode()[:40] + "é".encode("latin-1") + b'"}]')
    (root / "lines.json").write_text("\n".join(json.dumps(r) for r in records))
    (root / "array.jsonl").write_text(json.dumps(records, indent=1))
    (root / "fake.gguf").write_text("not a model")
    (root / "no-config").mkdir()
    (root / "earlier-run").mkdir()
    (root / "earlier-run" / "adapter_model.safetensors").write_text("an earlier run")
    make_adapter(tiny_model, root / "adapter")
    make_adapter(tiny_model, root / "dora", use_dora=True)
    make_adapter(tiny_model, root / "r8", r=8)
    make_adapter(tiny_model, root / "qk", target_modules=["q_proj", "k_proj"])
    make_adapter(tiny_gqa_model, root / "gqa-adapter")
    return dict(root=root, tiny=tiny_model, gqa=tiny_gqa_model, adapter=root / "adapter", dora=root / "dora",
                r8=root / "r8", qk=root / "qk", gqa_adapter=root / "gqa-adapter")


def case(script, args, message, env=None):
    return pytest.param(script, args, message, env or {}, id=f"{script} {' '.join(args)}"[:80])


MISTAKES = [
    # 1. flags: unknown (with the closest real one), repeated, a boolean given something else, a wrong type
    case("finetune.py", ["--micro_batchsize", "4"], "unknown flag --micro_batchsize: did you mean --micro_batch_size?"),
    case("finetune.py", ["--output_dir", "{root}/earlier-run", "--micro_batchsize", "4"], "unknown flag --micro_batchsize"),
    case("finetune.py", ["--batch_size", "8", "--batch_size", "16"], r"--batch_size is given twice \(8 and 16\)"),
    case("finetune.py", ["--group_by_length", "maybe"], "--group_by_length takes True or False, not 'maybe'"),
    case("finetune.py", ["--lora_r", "8.5"], "--lora_r takes a whole number, not '8.5'"),
    case("finetune.py", ["--base_model"], "--base_model needs a value"),
    case("finetune.py", ["tloen/alpaca"], "unexpected argument 'tloen/alpaca'"),
    case("generate.py", ["--lora_weight", "./lora-alpaca"], "unknown flag --lora_weight: did you mean --lora_weights?"),
    case("generate.py", ["--stream", "sometimes"], "--stream takes True or False"),
    case("generate.py", ["--compile", "maybe"], "--compile takes True or False, not 'maybe'"),
    case("generate.py", ["--bf16", "half"], "--bf16 takes True or False"),
    case("benchmarks/bench_generate.py", ["--round", "3"], "unknown flag --round: did you mean --rounds?"),
    case("evaluate.py", ["--lora-weight", "x"], "unknown flag --lora-weight: did you mean --lora_weights?"),
    case("export_hf_checkpoint.py", ["--dtype", "fp16", "--dtype", "bf16"], "--dtype is given twice"),
    case("export_gguf.py", ["--out_type", "q8_0"], "did you mean --outtype?"),
    case("export_onnx.py", ["--verify", "perhaps"], "--verify takes True or False"),
    case("export_state_dict_checkpoint.py", ["--num_shard", "2"], "did you mean --num_shards?"),
    case("benchmarks/bench_train.py", ["--step", "3"], "unknown flag --step: did you mean --steps?"),
    case("benchmarks/bench_train.py", ["--gpu", "yes", "--gpu"], "--gpu is given twice"),
    case("benchmarks/bench_quickstart.py", ["--output", "/proc/quickstart.json"], "--output /proc is not writable"),
    case("benchmarks/bench_quickstart.py", ["--folder", "/proc/user"], "--folder /proc/user is not writable"),
    # 2. values out of range, before any model loads (a run that would train nothing is one of them)
    case("finetune.py", ["--learning_rate", "3e4"], "--learning_rate must be above 0 and at most 1"),
    case("finetune.py", ["--num_epochs", "0"], "--num_epochs must be above 0"),
    case("finetune.py", ["--max_steps", "0"], r"--max_steps must be -1 \(train for --num_epochs\) or at least 1"),
    case("finetune.py", ["--lora_dropout", "1.5"], "--lora_dropout must be at least 0 and below 1"),
    case("finetune.py", ["--lora_alpha", "0"], "--lora_alpha must be above 0"),
    case("finetune.py", ["--val_set_size", "1.5"], "--val_set_size must be a record count"),
    case("finetune.py", ["--save_steps", "-1"], "--save_steps must be at least 0"),
    case("finetune.py", ["--eval_steps", "-1"], "--eval_steps must be at least 0"),
    case("generate.py", ["--instruction", "Hi.", "--no_repeat_ngram_size", "-1"], "--no_repeat_ngram_size must be at least 0"),
    case("finetune.py", ["--save_minutes", "-5"], "--save_minutes must be at least 0"),
    case("finetune.py", ["--base_model", "{tiny}", "--data_path", "{root}/good.json", "--cutoff_len", "4096"],
         "--cutoff_len 4096 is longer than the model's 512-token context"),
    case("finetune.py", ["--init_lora_weights", "svd"], "--init_lora_weights must be one of default, gaussian, pissa, olora"),
    case("finetune.py", ["--loraplus_lr_ratio", "0"], "--loraplus_lr_ratio must be above 0, not 0"),
    case("finetune.py", ["--base_model", "{tiny}", "--data_path", "{root}/good.json", "--init_lora_weights", "pissa",
                         "--quantization", "8bit"], "--init_lora_weights pissa decomposes the full-precision weights"),
    case("finetune.py", ["--base_model", "{tiny}", "--data_path", "{root}/good.json", "--init_lora_weights", "olora",
                         "--use_dora"], "--init_lora_weights olora with --use_dora cannot be converted"),
    case("finetune.py", ["--data_path", "{root}/good.json", "--use_rslora", "--resume_from_checkpoint", "{adapter}"],
         "--use_rslora shape a new adapter; .* brings its own method"),
    case("generate.py", ["--temperature", "-1"], "--temperature must be 0 for greedy or at least 0.001, not -1"),
    case("generate.py", ["--top_p", "1.5"], "--top_p must be above 0 and at most 1"),
    case("generate.py", ["--server_port", "70000"], "--server_port must be a port number from 1 to 65535"),
    case("generate.py", ["--device", "gpu"], "--device must be auto, cpu, mps, cuda or cuda:N"),
    case("generate.py", ["--threads", "-2"], "--threads must be at least 0, not -2"),
    case("generate.py", ["--load_8bit", "--bf16"], "--bf16 applies to unquantized weights: drop it or --load_8bit"),
    case("generate.py", ["--load_4bit", "--compile"], "--compile applies to unquantized weights: drop it or --load_4bit"),
    case("generate.py", ["--backend", "vllm"], "unknown --backend 'vllm': choose transformers or llama.cpp"),
    case("generate.py", ["--gguf_type", "q8_0"], "--gguf_type applies to --backend llama.cpp"),
    case("generate.py", ["--backend", "llama.cpp", "--load_8bit"], "--load_8bit is bitsandbytes'.*--gguf_type q8_0"),
    case("generate.py", ["--backend", "llama.cpp", "--compile"], "--compile compiles transformers' decoding step"),
    case("generate.py", ["--backend", "llama.cpp", "--bf16"], "with --backend llama.cpp pass --gguf_type bf16"),
    case("generate.py", ["--backend", "llama.cpp", "--device", "cuda"], "--backend llama.cpp runs on the CPU here"),
    case("generate.py", ["--backend", "llama.cpp", "--gguf_type", "q3"], "unknown --gguf_type 'q3': choose f32, f16"),
    case("generate.py", ["--backend", "llama.cpp", "--lora_weights", "tloen/alpaca-lora-7b"],
         "GGUF LoRA from a local directory: download tloen/alpaca-lora-7b first"),
    case("generate.py", ["--lora_weights", "en={adapter},en={adapter}"], "--lora_weights names en twice"),
    case("generate.py", ["--lora_weights", "en={adapter},fr={dora}"], r"adapter fr \(.*dora\) is DoRA"),
    case("benchmarks/bench_generate.py", ["--rounds", "0"], "--rounds must be at least 1"),
    case("benchmarks/bench_generate.py", ["--configs", "fp16"], "unknown configuration.*choose from before, fp32, fp32-compiled"),
    case("benchmarks/bench_generate.py", ["--llama_threads", "two"], "--llama_threads must be whole numbers above 0"),
    case("benchmarks/bench_generate.py", ["--max_new_tokens", "0"], "--max_new_tokens must be at least 1"),
    case("benchmarks/bench_serving.py", ["--clients", "1,0"], "--clients must be comma-separated whole numbers above 0"),
    case("evaluate.py", ["--lora_weights", "{adapter}", "--num_beams", "0"], "--num_beams must be at least 1"),
    case("export_hf_checkpoint.py", ["--dtype", "float8"], "--dtype must be one of auto, float32"),
    case("export_hf_checkpoint.py", ["--max_shard_size", "5 gigs"], "--max_shard_size must be a size such as 5GB"),
    case("export_state_dict_checkpoint.py", ["--num_shards", "0"], "--num_shards must be at least 1"),
    case("export_gguf.py", ["--outtype", "q3"], "unknown --outtype 'q3'"),
    # 3. data, record by record and byte by byte
    case("finetune.py", ["--data_path", "{root}/null.json"], r"null.json: record 3 field 'input' should be text, found null"),
    case("finetune.py", ["--data_path", "{root}/latin1.json"], r"latin1.json is not UTF-8 text \(byte 40 is b'\\xe9'\)"),
    case("finetune.py", ["--data_path", "{root}/lines.json"], r"lines.json holds JSON Lines .* rename it to lines.jsonl"),
    case("finetune.py", ["--data_path", "{root}/array.jsonl"], r"array.jsonl holds one JSON array, not JSON Lines"),
    case("finetune.py", ["--base_model", "{root}/fake.gguf"], "fake.gguf is not a GGUF file"),
    case("generate.py", ["--input_file", "{root}/null.json"], r"null.json: record 3 field 'input' should be text, found null"),
    # 4. models and adapters that cannot be reached or do not fit
    case("finetune.py", ["--base_model", "huggyllama/llama-7bb"],
         "base model 'huggyllama/llama-7bb' is not in the local Hugging Face cache and the Hub cannot be reached", NO_NETWORK),
    case("finetune.py", ["--data_path", "yahma/alpaca-cleanedd"], "data set 'yahma/alpaca-cleanedd' is not in the local", NO_NETWORK),
    case("finetune.py", ["--base_model", "{root}/no-config"], "no-config has no config.json: not a Hugging Face model directory"),
    case("generate.py", ["--lora_weights", "tloen/alpaca-lora-7bb"], "adapter 'tloen/alpaca-lora-7bb' is not in the local", NO_NETWORK),
    case("generate.py", ["--base_model", "{gqa}", "--lora_weights", "{adapter}"],
         r"adapter .* was trained for another base model: its model.layers.0.self_attn.v_proj has output size 64, the base model has output size 32"),
    case("evaluate.py", ["--lora_weights", "{root}/no-config"], "has no adapter_config.json"),
    case("generate.py", ["--base_model", "{adapter}"], "adapter is a LoRA adapter, not a base model: pass it as --lora_weights"),
    case("export_hf_checkpoint.py", ["--base_model", "{gqa}", "--lora_weights", "{adapter}"], "was trained for another base model"),
    case("export_gguf.py", ["--base_model", "meta-llama/Llama-2-7b-hf"], "is not in the local Hugging Face cache", NO_NETWORK),
    case("export_gguf.py", ["--base_model", "{tiny}", "--lora_weights", "{dora}", "--adapter_only"],
         "is a DoRA adapter: llama.cpp cannot apply"),
    case("generate.py", ["--backend", "llama.cpp", "--lora_weights", "{dora}"], "is a DoRA adapter: llama.cpp cannot apply"),
    case("benchmarks/bench_methods.py", ["--methods", "lora,qlora"], "unknown method.*qlora: choose from lora, dora"),
    case("benchmarks/bench_merge.py", ["--fr_data", "nothere.jsonl"], "--fr_data 'nothere.jsonl' not found"),
    case("merge_adapters.py", ["--lora_weights", "{adapter}"], "needs at least two adapter directories"),
    case("merge_adapters.py", ["--lora_weights", "{adapter},{r8}", "--combination_type", "mean"],
         "unknown --combination_type 'mean': choose cat, svd, linear"),
    case("merge_adapters.py", ["--lora_weights", "{adapter},{gqa_adapter}"], "were trained on different base models"),
    case("merge_adapters.py", ["--lora_weights", "{adapter},{qk}"], "adapt different layers"),
    case("merge_adapters.py", ["--lora_weights", "{adapter},{r8}", "--combination_type", "ties"],
         "has rank 4 and .* rank 8: --combination_type ties needs equal ranks; use cat or svd"),
    case("merge_adapters.py", ["--lora_weights", "{adapter},{dora}"], "is a DoRA adapter: only LoRA adapters"),
    case("merge_adapters.py", ["--lora_weights", "{adapter},{r8}", "--weights", "1,2,3"], "--weights has 3 value"),
    case("merge_adapters.py", ["--lora_weights", "{adapter},{r8}", "--density", "0"], "--density must be above 0"),
]


# Runs a script as `python SCRIPT ARGS` would, and at exit (sys.exit included) writes the names of every module it
# imported to $IMPORTS_REPORT: what a run imported shows how far it got, on a fast CPU or a slow one.
IMPORTS_PROBE = """
import atexit, json, os, runpy, sys
report = os.environ.pop("IMPORTS_REPORT")
atexit.register(lambda: open(report, "w").write(json.dumps(sorted(sys.modules))))
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(sys.argv[0])
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_script(script, args, env=None, cwd=REPO):
    """The finished process and the set of modules the script imported."""
    environ = dict(os.environ, **{k: v for k, v in (env or {}).items() if v is not None})
    for key in [k for k, v in (env or {}).items() if v is None]:
        environ.pop(key, None)
    with tempfile.TemporaryDirectory() as folder:  # not in cwd: the tests check that nothing is written there
        environ["IMPORTS_REPORT"] = report = os.path.join(folder, "imports.json")
        proc = subprocess.run([sys.executable, "-c", IMPORTS_PROBE, str(REPO / script), *args], cwd=cwd, env=environ,
                              capture_output=True, text=True, timeout=120)
        with open(report) as imported:
            return proc, set(json.load(imported))


OUTPUT_FLAG = {"finetune.py": "--output_dir", "evaluate.py": "--output_dir", "export_hf_checkpoint.py": "--output_dir",
               "export_state_dict_checkpoint.py": "--output_dir", "export_onnx.py": "--output_dir",
               "export_gguf.py": "--output_file", "generate.py": "--output_file", "benchmarks/bench_train.py": "--output",
               "benchmarks/bench_generate.py": "--output", "benchmarks/bench_serving.py": "--output",
               "merge_adapters.py": "--output_dir", "benchmarks/bench_methods.py": "--output",
               "benchmarks/bench_merge.py": "--output", "benchmarks/bench_quickstart.py": "--output"}


@pytest.mark.parametrize("script, args, message, env", MISTAKES)
def test_a_mistake_is_one_line_before_any_work(files, tmp_path, script, args, message, env):
    args = [a.format(**files) for a in args]
    out = tmp_path / "out"
    if OUTPUT_FLAG[script] not in args and not any(a.startswith("--micro_batchsize") for a in args):
        args += [OUTPUT_FLAG[script], str(out)]
    proc, imported = run_script(script, args, env, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(message, lines[0]), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert list(tmp_path.iterdir()) == []  # no output, and nothing else in the working directory either
    assert (files["root"] / "earlier-run" / "adapter_model.safetensors").read_text() == "an earlier run"
    assert not imported & MODEL_CODE, f"{sorted(imported & MODEL_CODE)} imported before the mistake was found"


def test_a_missing_data_file_is_reported_before_an_earlier_runs_output_dir(tmp_path):
    """After the quick start (./lora-alpaca holds a run), `finetune.py --data_path nothere.json` names the input's
    problem first: fixing the output directory alone would only lead to the next error."""
    (tmp_path / "lora-alpaca").mkdir()
    (tmp_path / "lora-alpaca" / "adapter_model.safetensors").write_text("the quick start's run")
    proc, _ = run_script("finetune.py", ["--data_path", "nothere.json"], cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: data file nothere.json not found", proc.stderr


def test_a_busy_port_is_found_before_the_model_loads(files, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc, imported = run_script("generate.py", ["--base_model", str(files["tiny"]), "--server_port", str(port)], cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: cannot serve on 127.0.0.1:{port} (Address already in use); pass another --server_port (or --server_name)")
    assert "Loading" not in proc.stdout + proc.stderr and not imported & MODEL_CODE, sorted(imported & MODEL_CODE)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_is_quick_plain_and_complete(script):
    proc, imported = run_script(script, ["--help"])
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: python {script} "), proc.stderr
    heavy = imported & {"torch", "transformers", *MODEL_CODE}
    assert not heavy, f"--help imported {sorted(heavy)}"
    assert "INFO:" not in proc.stdout and "Optional[" not in proc.stdout and str(REPO) not in proc.stdout
    flags = re.findall(r"^  --(\w+) ", proc.stdout, re.M)
    assert len(flags) >= 4 and all(re.search(rf"^  --{f} .*\n      \S", proc.stdout, re.M) for f in flags)


def test_finetune_help_shows_defaults_as_typed():
    text = run_script("finetune.py", ["--help"])[0].stdout
    assert "--data_path TEXT (default: data/alpaca_en_demo.json)" in text
    assert "--lora_target_modules TEXT|LIST (default: [q_proj,v_proj])" in text
    assert "--bf16 BOOL\n" in text and "--val_set_size FLOAT\n" in text


@pytest.mark.parametrize("error, message", [
    ("GatedRepoError", "base model 'meta-llama/Llama-3.1-8B' is gated: accept its license at https://huggingface.co/meta-llama/Llama-3.1-8B"),
    ("RepositoryNotFoundError", "no model 'meta-llama/Llama-3.1-8B' on the Hugging Face Hub: check the spelling"),
])
def test_hub_refusals_are_one_line_with_the_fix(monkeypatch, error, message):
    """Online, a gated or unknown Hub id is named with its fix (the Hub's answer is simulated: tests stay offline)."""
    import httpx2
    import huggingface_hub
    from huggingface_hub import errors

    from utils import hub
    from utils.cli import UserError

    response = httpx2.Response(403, request=httpx2.Request("GET", "https://huggingface.co/api/models/x"))
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    monkeypatch.setattr(hub, "cached", lambda *a: False)
    monkeypatch.setattr(huggingface_hub, "auth_check", lambda *a, **k: (_ for _ in ()).throw(getattr(errors, error)("no", response=response)))
    with pytest.raises(UserError, match=re.escape(message)):
        hub.check_hub_repo("meta-llama/Llama-3.1-8B", "model", "base model")


@pytest.mark.parametrize("name, good, bad", [
    ("learning_rate", 3e-4, 3e4), ("learning_rate", 1.0, 0), ("num_epochs", 0.5, 0), ("max_steps", -1, -2),
    ("max_steps", 1, 0), ("cutoff_len", 1, 0), ("val_set_size", 0.05, 1.5), ("val_set_size", 2000, -1),
    ("lora_r", 1, 0), ("lora_alpha", 0.5, 0), ("lora_dropout", 0.0, 1.0), ("warmup_steps", 0, -1), ("save_steps", 0, -1),
    ("eval_steps", 0, -1), ("save_minutes", 0.5, -1),
    ("logging_steps", 1, 0), ("seed", 0, -1), ("quantization", "4bit", "3bit"), ("device_map", "auto", "gpu"),
    ("wandb_watch", "gradients", "grads"), ("temperature", 0, float("nan")), ("top_p", 1, 0), ("top_k", 0, -1),
    ("num_beams", 1, 0), ("max_new_tokens", 1, 0), ("no_repeat_ngram_size", 0, -1), ("server_port", 7860, 0), ("device", "cuda:1", "gpu"), ("threads", 0, -1),
    ("num_shards", 8, 0), ("max_shard_size", "500MB", "5 gigs"), ("dtype", "bf16", "float8"), ("batch_size", 1, 0),
])
def test_every_rule_takes_a_good_value_and_refuses_a_bad_one(name, good, bad):
    from utils.checks import check_value
    from utils.cli import UserError

    check_value(name, good)
    with pytest.raises(UserError, match=f"^--{name} must be .*, not {re.escape(repr(bad))}$"):
        check_value(name, bad)


def test_demo_and_api_settings_share_the_flag_rules():
    from utils.cli import UserError
    from utils.generation import Settings

    with pytest.raises(UserError, match=r"^top_p must be above 0 and at most 1, not 0$"):
        Settings(top_p=0).checked()
    with pytest.raises(UserError, match=r"^num_beams must be a whole number, not 1.5$"):
        Settings(num_beams=1.5).checked()
    assert Settings(top_k=40.0).checked().top_k == 40  # sliders send floats
