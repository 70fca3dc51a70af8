"""The adapter methods beyond plain LoRA (finetune.py --use_dora, --use_rslora, --init_lora_weights pissa|olora,
--loraplus_lr_ratio) on a tiny LLaMA: each trains, saves an adapter that PEFT loads onto the unchanged base with
the trained model's logits, resumes as an uninterrupted run, and merges in the HF, Meta and ONNX exports with the
unmerged adapter's logits. llama.cpp's side (GGUF): tests/test_methods_gguf.py.

The runs compute in float32 (--bf16 False): the comparisons are exact up to the order of float32 sums (1e-4), which
a bf16 base (the default on CPUs with AMX) would blur into its own rounding.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

import finetune
from test_export import EXACT, max_diff, peft_logits, token_ids
from tiny import ALPACA
from utils.cli import UserError

METHODS = {
    "dora": dict(use_dora=True),
    "rslora": dict(use_rslora=True, lora_r=16),
    "pissa": dict(init_lora_weights="pissa"),
    "olora": dict(init_lora_weights="olora"),
    "loraplus": dict(loraplus_lr_ratio=16),
}
RUN = dict(batch_size=8, micro_batch_size=4, cutoff_len=128, val_set_size=0, logging_steps=1, save_steps=2,
           warmup_steps=0, max_steps=4, learning_rate=1e-2, lora_target_modules="q_proj,k_proj,v_proj,o_proj",
           bf16=False)


def train(base: Path, data: Path, out: Path, method: str, **overrides):
    """finetune.train with the method's flags; the Trainer it built (its model is the trained one)."""
    built, build = [], finetune.build_trainer
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(finetune, "build_trainer", lambda *a, **k: built.append(build(*a, **k)) or built[-1])
        finetune.train(**RUN | METHODS[method] | overrides, base_model=str(base), data_path=str(data),
                       output_dir=str(out))
    return built[-1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "alpaca.json"
    path.write_text(json.dumps(json.loads(ALPACA.read_text())[:24]))
    return path


@pytest.fixture(scope="module")
def runs(tiny_model, data, tmp_path_factory):
    """Each method trained once (on demand): (its run directory, the trained model's logits on token_ids)."""
    done = {}

    def run(method: str) -> tuple[Path, torch.Tensor]:
        if method not in done:
            out = tmp_path_factory.mktemp(method) / "lora"
            trainer = train(tiny_model, data, out, method)
            with torch.no_grad():
                done[method] = out, trainer.model.eval()(token_ids(tiny_model)).logits
        return done[method]

    return run


@pytest.mark.parametrize("method", METHODS)
def test_saved_adapter_on_the_unchanged_base_is_the_trained_model(runs, tiny_model, method):
    from peft import AutoPeftModelForCausalLM

    out, trained = runs(method)
    ids = token_ids(tiny_model)
    assert max_diff(peft_logits(tiny_model, out, ids), trained) < EXACT  # a fresh base: PiSSA/OLoRA converted
    with torch.no_grad():
        auto = AutoPeftModelForCausalLM.from_pretrained(out).eval()(ids).logits  # the base its config names
    assert max_diff(auto, trained) < EXACT
    config, args = (json.loads((out / name).read_text()) for name in ("adapter_config.json", "training_args.json"))
    assert {k: args[k] for k in METHODS[method]} == METHODS[method]  # the method is recorded for later scripts
    assert config["use_dora"] == (method == "dora") and config["use_rslora"] == (method == "rslora")
    if method in ("pissa", "olora"):  # the trained pair and the initial one, subtracted: plain LoRA of rank 2r
        assert config["init_lora_weights"] is True and config["r"] == 16 and config["lora_alpha"] == 32


@pytest.mark.parametrize("method", METHODS)
def test_resume_equals_an_uninterrupted_run(runs, tiny_model, data, tmp_path, method):
    straight, trained = runs(method)
    out = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoint-2", out / "checkpoint-2")
    train(tiny_model, data, out, method, resume_from_checkpoint=True)
    losses = [[h["loss"] for h in json.loads((run / "metrics.json").read_text())["log_history"] if "loss" in h]
              for run in (out, straight)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4) and len(losses[0]) == 4
    assert max_diff(peft_logits(tiny_model, out, token_ids(tiny_model)), trained) < EXACT


def test_loraplus_gives_lora_b_its_ratio_of_the_learning_rate(tiny_model, data, tmp_path):
    trainer = train(tiny_model, data, tmp_path / "lora", "loraplus", max_steps=1, save_steps=1)
    named = dict(trainer.model.named_parameters())
    rates = {"lora_A" if "lora_A" in n else "lora_B": group["initial_lr"] for group in trainer.optimizer.param_groups
             for p in group["params"] for n in [next(k for k, v in named.items() if v is p)]}
    assert rates == {"lora_A": RUN["learning_rate"], "lora_B": 16 * RUN["learning_rate"]}


@pytest.mark.parametrize("method", METHODS)
def test_every_export_merges_it(runs, tiny_model, tmp_path, method):
    from transformers import AutoModelForCausalLM

    from export_hf_checkpoint import export as export_hf
    from export_onnx import export as export_onnx
    from export_state_dict_checkpoint import export as export_meta
    from reference_llama import forward, load_consolidated

    out, _ = runs(method)
    ids = token_ids(tiny_model)
    want = peft_logits(tiny_model, out, ids)
    export_hf(base_model=str(tiny_model), lora_weights=str(out), output_dir=str(tmp_path / "hf"), dtype="float32")
    with torch.no_grad():
        assert max_diff(AutoModelForCausalLM.from_pretrained(tmp_path / "hf")(ids).logits, want) < EXACT
    export_meta(base_model=str(tiny_model), lora_weights=str(out), output_dir=str(tmp_path / "meta"), dtype="float32")
    assert max_diff(forward(*load_consolidated(tmp_path / "meta"), ids), want) < EXACT
    export_onnx(base_model=str(tiny_model), lora_weights=str(out), output_dir=str(tmp_path / "onnx"))  # verified


def test_unconverted_checkpoint_and_another_method_are_refused(runs, tiny_model, data, tmp_path):
    """A PiSSA run's Trainer checkpoint applies only to the base PiSSA changed; resuming needs the same method."""
    from utils.models import check_adapter_dir

    out, _ = runs("pissa")
    with pytest.raises(UserError, match="applies to the base as pissa changed it .* use the run's final adapter"):
        check_adapter_dir(str(out / "checkpoint-2"))
    copy = tmp_path / "run"
    shutil.copytree(out / "checkpoint-2", copy / "checkpoint-2")
    with pytest.raises(UserError, match="was trained with --init_lora_weights pissa: pass the same to resume it"):
        train(tiny_model, data, copy, "loraplus", resume_from_checkpoint=True)


# --- merge_adapters.py ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("combination_type", ["cat", "svd"])
def test_an_adapter_merged_with_itself_at_half_weight_each_is_itself(tiny_model, tmp_path, combination_type):
    """cat is the exact weighted sum of the changes; svd cuts that sum back to the parents' rank, here losslessly."""
    from gen_helpers import make_adapter
    from merge_adapters import merge

    adapter = make_adapter(tiny_model, tmp_path / "a")
    twin = shutil.copytree(adapter, tmp_path / "b")
    merge(lora_weights=f"{adapter},{twin}", combination_type=combination_type, output_dir=str(tmp_path / "merged"))
    ids = token_ids(tiny_model)
    assert max_diff(peft_logits(tiny_model, tmp_path / "merged", ids), peft_logits(tiny_model, adapter, ids)) < EXACT


def test_merged_adapter_is_taken_by_every_script(runs, tiny_model, tmp_path):
    """Two trained adapters (rsLoRA's scale and a converted PiSSA's rank 16 among them), TIES-merged: the new folder
    names its base and run (training_args.json) for generate.py and evaluate.py, and exports merged."""
    from export_hf_checkpoint import export
    from transformers import AutoModelForCausalLM

    from merge_adapters import merge
    from utils.models import choose_base_model
    from utils.run_record import RunRecord

    parents = [runs("rslora")[0], runs("pissa")[0]]
    out = tmp_path / "merged"
    merge(lora_weights=[str(p) for p in parents], weights="0.7,0.3", combination_type="ties", output_dir=str(out))
    assert choose_base_model("", str(out)) == str(tiny_model)
    assert RunRecord.read(str(out)).get("merged_from") == [str(p) for p in parents]
    ids = token_ids(tiny_model)
    want = peft_logits(tiny_model, out, ids)
    assert all(max_diff(want, peft_logits(tiny_model, p, ids)) > 1e-3 for p in parents)  # a new adapter
    export(lora_weights=str(out), output_dir=str(tmp_path / "hf"), dtype="float32")
    with torch.no_grad():
        assert max_diff(AutoModelForCausalLM.from_pretrained(tmp_path / "hf")(ids).logits, want) < EXACT


def test_bench_methods_smoke(tmp_path):
    """benchmarks/bench_methods.py on a tiny model: each method's held-out loss before and after, its step time and
    peak memory, with the load it ran under."""
    import subprocess
    import sys

    from tiny import REPO

    out = tmp_path / "methods.json"
    subprocess.run([sys.executable, "benchmarks/bench_methods.py", "--smoke", "--methods", "lora,pissa", "--output",
                    str(out)], cwd=REPO, check=True, capture_output=True, timeout=900)
    results = json.loads(out.read_text())["results"]
    assert list(results) == ["lora", "pissa"]
    for r in results.values():
        assert r["eval_loss_end"] != r["eval_loss_start"] and len(r["train_losses"]) == 2
        assert r["seconds_per_step"] > 0 and r["peak_memory_gb"] > 0 and len(r["load_average"]) == 2
