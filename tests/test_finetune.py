"""finetune.py end to end on tiny random LLaMA models (seconds each) and once on the embedded SmolLM2."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import finetune
from tiny import REPO
from utils.cli import UserError

QUICK = dict(batch_size=8, micro_batch_size=4, cutoff_len=128, val_set_size=8, logging_steps=1, save_steps=4, warmup_steps=0)
LEARNING = dict(max_steps=12, learning_rate=1e-2, lora_target_modules="q_proj,k_proj,v_proj,o_proj")  # a run that learns


def run_train(tiny_model, data, out, **overrides):
    args = dict(QUICK, base_model=str(tiny_model), data_path=str(data), output_dir=str(out), max_steps=4) | overrides
    finetune.train(**args)
    return Path(out)


def logged(out, key):
    state = json.loads((out / "trainer_state.json").read_text()) if (out / "trainer_state.json").exists() else None
    history = state["log_history"] if state else json.loads((out / "metrics.json").read_text())["log_history"]
    return [(h["step"], h[key]) for h in history if key in h]


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """One 12-step run at a high learning rate shared by the adapter checks."""
    data = tmp_path_factory.mktemp("data") / "alpaca.json"
    data.write_text(json.dumps(json.loads((REPO / "data" / "alpaca_en_demo.json").read_text())[:40]))
    out = tmp_path_factory.mktemp("run") / "lora"
    run_train(tiny_model, data, out, **LEARNING)
    return out


def test_training_lowers_the_loss(trained):
    evals = [loss for _, loss in logged(trained / "checkpoint-12", "eval_loss")]
    losses = [loss for _, loss in logged(trained / "checkpoint-12", "loss")]
    assert len(losses) == 12 and len(evals) == 2 and evals[-1] < evals[0] - 0.1, (evals, losses)  # start and end


def test_adapter_holds_every_target_module(trained):
    weights = trained / "adapter_model.safetensors"
    assert weights.stat().st_size > 10_000  # the original's monkeypatch wrote a 443-byte empty file
    tensors = load_file(weights)
    for layer in range(2):
        for module in ("q_proj", "k_proj", "v_proj", "o_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            assert f"{prefix}.lora_A.weight" in tensors and f"{prefix}.lora_B.weight" in tensors
            assert tensors[f"{prefix}.lora_B.weight"].abs().sum() > 0  # lora_B starts at zero: it trained
    config = json.loads((trained / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_adapter_reloads_and_changes_logits(trained, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 50, 60, 70, 80]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    before = base(ids).logits
    tuned = PeftModel.from_pretrained(base, trained)
    assert not torch.allclose(before, tuned(ids).logits, atol=1e-4)


def test_run_directory_contents(trained):
    for name in ("tokenizer.json", "tokenizer_config.json", "training_args.json", "metrics.json", "adapter_config.json", "loss_curve.png"):
        assert (trained / name).is_file(), name
    args = json.loads((trained / "training_args.json").read_text())
    assert args["learning_rate"] == 1e-2 and args["lora_r"] == 8
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["final_eval_loss"] == pytest.approx(metrics["eval_loss_best"], rel=1e-4)  # the best adapter is kept
    assert metrics["eval_loss_best"] < metrics["eval_loss_first"] and metrics["train_loss"] > 0
    assert len([h for h in metrics["log_history"] if "loss" in h]) == 12
    assert [h["step"] for h in metrics["log_history"] if "eval_loss" in h] == [0, 12]  # before and after, once each
    assert all(h["tokens_per_second"] > 0 for h in metrics["log_history"][1:] if "loss" in h)
    assert (trained / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(trained.glob(".partial-*")) and not list(trained.glob(".saving-*"))  # nothing half-written left


def test_eval_steps_validates_every_n_steps_and_keeps_the_best(tiny_model, alpaca_file, tmp_path):
    """--eval_steps 4 with checkpoints every 4 steps: the original's validation at every checkpoint, and the best
    checkpoint's adapter is the one saved."""
    out = run_train(tiny_model, alpaca_file, tmp_path / "lora", max_steps=8, eval_steps=4, learning_rate=1e-2)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["step"] for h in metrics["log_history"] if "eval_loss" in h] == [0, 4, 8]
    assert metrics["final_eval_loss"] == pytest.approx(metrics["eval_loss_best"], rel=1e-4)


def test_resume_continues_from_the_saved_step(tiny_model, alpaca_file, tmp_path, capsys):
    """A run interrupted after its step-4 checkpoint and resumed to step 8 logs the same losses as one
    uninterrupted 8-step run (same learning-rate schedule, data order, dropout RNG)."""
    import shutil

    straight = run_train(tiny_model, alpaca_file, tmp_path / "straight", max_steps=8, val_set_size=0)
    out = tmp_path / "resumed"  # what an interruption between step 4 and step 8 leaves behind
    shutil.copytree(straight / "checkpoint-4", out / "checkpoint-4")
    capsys.readouterr()
    run_train(tiny_model, alpaca_file, out, max_steps=8, val_set_size=0, resume_from_checkpoint=True)
    printed = capsys.readouterr().out
    assert "Resuming the full training state" in printed and printed.count("'loss': ") == 4  # only steps 5-8 ran
    resumed = logged(out / "checkpoint-8", "loss")
    assert [s for s, _ in resumed] == list(range(1, 9))  # steps 1-4 from the first run, 5-8 resumed, none repeated
    expected = logged(straight / "checkpoint-8", "loss")
    assert [loss for _, loss in resumed] == pytest.approx([loss for _, loss in expected], rel=1e-4)


def test_adapter_dir_warm_starts_a_new_run(trained, tiny_model, alpaca_file, tmp_path, capsys):
    out = run_train(tiny_model, alpaca_file, tmp_path / "warm", max_steps=1, val_set_size=0, resume_from_checkpoint=str(trained),
                    lora_target_modules=LEARNING["lora_target_modules"])  # the adapter's own: other ones are refused
    assert "starting a NEW run" in capsys.readouterr().out
    assert logged(out / "checkpoint-1", "loss")[0][0] == 1


def test_base_model_comes_from_the_environment_then_the_adapter_resumed_from(trained, tiny_model, tiny_gqa_model,
                                                                            alpaca_file, tmp_path, monkeypatch):
    """No --base_model: $BASE_MODEL (the original's), else the base of the adapter warm-started from; the run records
    the base it used, so that generate.py and the exports find it again."""
    monkeypatch.setenv("BASE_MODEL", str(tiny_gqa_model))
    out = run_train("", alpaca_file, tmp_path / "env", max_steps=1, val_set_size=0)
    assert json.loads((out / "training_args.json").read_text())["base_model"] == str(tiny_gqa_model)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_gqa_model)
    monkeypatch.delenv("BASE_MODEL")
    out = run_train("", alpaca_file, tmp_path / "warm", max_steps=1, val_set_size=0, resume_from_checkpoint=str(trained),
                    lora_target_modules=LEARNING["lora_target_modules"])
    assert json.loads((out / "training_args.json").read_text())["base_model"] == str(tiny_model)


def train_watching_lora(tiny_model, data, out, monkeypatch, **flags) -> tuple[dict, dict]:
    """run_train with LEARNING and `flags`; returns every LoRA tensor's value before and after training."""
    import finetune as ft

    before, trainers = {}, []

    def build(model, *args, **kwargs):
        before.update({n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n})
        trainers.append(ft_build(model, *args, **kwargs))
        return trainers[-1]

    ft_build = ft.build_trainer
    monkeypatch.setattr(ft, "build_trainer", build)
    run_train(tiny_model, data, out, **LEARNING, **flags)
    after = {n: p.detach() for n, p in trainers[0].model.named_parameters() if "lora_" in n}
    return before, after


def assert_every_lora_tensor_moved(before, after):
    """q/k/v/o in both layers, A and B: a layer the gradient never reaches keeps its initial A and its zero B."""
    assert len(before) == 2 * 4 * 2 and before.keys() == after.keys(), sorted(before)
    unmoved = [n for n in before if torch.equal(before[n], after[n])]
    assert not unmoved, f"never trained: {unmoved}"


def test_gradient_checkpointing_on_an_unquantized_base_trains_every_layer(trained, tiny_model, alpaca_file, tmp_path, monkeypatch):
    """The CPU default (no quantization, so no prepare_model_for_kbit_training) with --gradient_checkpointing True.
    Reentrant checkpointing would pass no gradient into a checkpointed layer whose input does not require one (the
    embeddings are frozen): its LoRA weights would stay put. Recomputing is the same arithmetic (dropout's RNG state
    is replayed), so each step's loss equals the plain run's up to float rounding: 1e-4 relative."""
    import transformers.modeling_utils

    checkpointed = []
    real = transformers.modeling_utils.checkpoint
    monkeypatch.setattr(transformers.modeling_utils, "checkpoint",
                        lambda *a, **k: checkpointed.append(k.get("use_reentrant")) or real(*a, **k))
    out = tmp_path / "checkpointed"
    before, after = train_watching_lora(tiny_model, alpaca_file, out, monkeypatch, gradient_checkpointing=True)
    assert checkpointed and set(checkpointed) == {False}  # both layers recomputed, the non-reentrant way
    assert_every_lora_tensor_moved(before, after)
    expected = [loss for _, loss in logged(trained / "checkpoint-12", "loss")]
    assert [loss for _, loss in logged(out / "checkpoint-12", "loss")] == pytest.approx(expected, rel=1e-4)


def test_group_by_length_trains_every_layer_as_well_as_random_batches(trained, tiny_model, alpaca_file, tmp_path, monkeypatch):
    """Batches of similar length are other batches: the step losses differ, so the held-out loss at the end is what
    is compared. Over 12 steps at this learning rate it falls by more than 0.1 (test_training_lowers_the_loss); the
    order of the same records moves it by far less: within 3% of the random order's."""
    out = tmp_path / "grouped"
    before, after = train_watching_lora(tiny_model, alpaca_file, out, monkeypatch, group_by_length=True)
    assert_every_lora_tensor_moved(before, after)
    expected = [loss for _, loss in logged(trained / "checkpoint-12", "eval_loss")]
    evals = [loss for _, loss in logged(out / "checkpoint-12", "eval_loss")]
    assert evals[0] == pytest.approx(expected[0], rel=1e-6)  # the same base and held-out records
    assert evals[-1] == pytest.approx(expected[-1], rel=0.03), (evals, expected)


@pytest.mark.slow
def test_torch_compile_trains_every_layer_to_the_same_losses(trained, tiny_model, alpaca_file, tmp_path, monkeypatch):
    """--torch_compile True (≈ 45 s compiling on a CPU). The compiled graph fuses and reorders float operations
    but computes the same model on the same batches: each step's loss within 1e-3 relative of the eager run's."""
    out = tmp_path / "compiled"
    before, after = train_watching_lora(tiny_model, alpaca_file, out, monkeypatch, torch_compile=True)
    assert_every_lora_tensor_moved(before, after)
    expected = [loss for _, loss in logged(trained / "checkpoint-12", "loss")]
    assert [loss for _, loss in logged(out / "checkpoint-12", "loss")] == pytest.approx(expected, rel=1e-3)


def test_bf16_on_cpu_keeps_lora_optimizer_and_loss_in_fp32(tiny_model, alpaca_file, tmp_path, monkeypatch):
    """--bf16 True on CPU: the frozen base computes in bf16 with no autocast; --bf16 False: everything fp32."""
    import finetune as ft

    seen = []
    build = ft.build_trainer
    monkeypatch.setattr(ft, "build_trainer", lambda *a, **k: seen.append(build(*a, **k)) or seen[-1])
    run_train(tiny_model, alpaca_file, tmp_path / "fp32", max_steps=1, val_set_size=0, bf16=False)
    out = run_train(tiny_model, alpaca_file, tmp_path / "bf16", max_steps=2, val_set_size=0, bf16=True)
    assert [t.args.bf16 for t in seen] == [False, False]  # no autocast on CPU: the base's own dtype computes
    for trainer, base_dtype in zip(seen, (torch.float32, torch.bfloat16)):
        dtypes = {("lora" if "lora_" in n else "base", p.dtype) for n, p in trainer.model.named_parameters()}
        assert dtypes == {("base", base_dtype), ("lora", torch.float32)}
    optimizer_state = [v for s in seen[1].optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim]
    assert optimizer_state and all(v.dtype == torch.float32 for v in optimizer_state)
    tensors = load_file(out / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for t in tensors.values())  # master weights stay fp32
    assert all(loss > 0 for _, loss in logged(out / "checkpoint-2", "loss"))


def test_bf16_learns_what_fp32_learns(tiny_model, tmp_path):
    """The same short run in bf16 and fp32 ends at the same held-out loss (within 1%), and it is a run that learns."""
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(json.loads((REPO / "data" / "alpaca_en_demo.json").read_text())[:40]))
    evals = {}
    for bf16 in (False, True):
        out = run_train(tiny_model, data, tmp_path / str(bf16), max_steps=12, learning_rate=1e-2, bf16=bf16,
                        lora_target_modules="q_proj,k_proj,v_proj,o_proj")
        evals[bf16] = [loss for _, loss in logged(out / "checkpoint-12", "eval_loss")]
    assert evals[False][-1] < evals[False][0] - 0.1, evals  # fp32 learned something for bf16 to match
    assert evals[True][-1] == pytest.approx(evals[False][-1], rel=0.01), evals


def test_bf16_on_a_gpu_without_it_is_one_line(monkeypatch):
    from utils import models

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with pytest.raises(UserError, match="this GPU has no bf16"):
        models.pick_dtype("cuda", bf16=True)
    assert models.pick_dtype("cuda") == torch.float16  # unset: fp16 with loss scaling, no error
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert (models.pick_dtype("cuda"), models.pick_dtype("cuda", bf16=False)) == (torch.bfloat16, torch.float16)
    assert models.pick_dtype("cpu", bf16=True) == torch.bfloat16  # on CPU: the frozen base computes in bf16


def test_training_on_apple_mps_computes_in_fp32(tiny_model, alpaca_file, tmp_path, monkeypatch):
    """On a Mac the default device is MPS. The Trainer is given neither fp16 nor bf16 there (no autocast, no loss
    scaling), so the base itself must be fp32: in fp16 the gradients through it underflow to zero."""
    import finetune as ft
    from utils import models

    monkeypatch.setattr(models, "pick_device", lambda device="auto": "mps")  # device detection finds MPS
    loaded, built, load, build = [], [], models.load_model, ft.build_trainer
    monkeypatch.setattr(models, "load_model", lambda base, quantization, device, **k: loaded.append((device, k["dtype"]))
                        or load(base, quantization, "cpu", **k))  # there is no MPS here: the weights go to the CPU
    monkeypatch.setattr(ft, "build_trainer", lambda *a, **k: built.append(build(*a, **k)) or built[-1])
    run_train(tiny_model, alpaca_file, tmp_path / "mps", max_steps=1, val_set_size=0)
    assert loaded == [("mps", torch.float32)]
    assert (built[0].args.fp16, built[0].args.bf16) == (False, False)
    assert models.pick_dtype("mps") == torch.float16  # answering needs no gradients: fp16 stays the demo's choice


def test_8bit_and_4bit_train_on_cpu(tiny_model, alpaca_file, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    for quantization in ("8bit", "4bit"):
        out = run_train(tiny_model, alpaca_file, tmp_path / quantization, max_steps=2, val_set_size=0, quantization=quantization)
        from utils.models import pick_dtype

        assert f"on cpu ({quantization}, {str(pick_dtype('cpu')).removeprefix('torch.')})" in capsys.readouterr().out  # bf16 compute where native
        tensors = load_file(out / "adapter_model.safetensors")
        assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in tensors.items()), quantization


def test_nan_loss_stops_the_run(tiny_model, alpaca_file, tmp_path):
    """An overflowing model (here: a NaN planted in the weights, as fp16 overflow produces) stops at once."""
    import shutil

    from transformers import AutoModelForCausalLM

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model, broken)
    model = AutoModelForCausalLM.from_pretrained(broken)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    model.save_pretrained(broken)
    with pytest.raises(UserError, match="training loss is nan at step 1: the run diverged"):
        run_train(broken, alpaca_file, tmp_path / "nan", max_steps=3, val_set_size=0)


def test_loss_guard_stops_on_exact_zero():
    from transformers import TrainerControl, TrainerState

    from utils.metrics import LossGuard

    state = TrainerState()
    state.global_step = 30
    LossGuard().on_log(None, state, TrainerControl(), logs={"loss": 0.25})
    with pytest.raises(UserError, match="training loss is 0.0 at step 30"):
        LossGuard().on_log(None, state, TrainerControl(), logs={"loss": 0.0})


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(batch_size=10, micro_batch_size=4), "--batch_size 10 is not a multiple of --micro_batch_size 4; try --batch_size 8"),
        (dict(prompt_template_name="nope"), "unknown prompt template 'nope'"),
        (dict(data_path="missing.json"), "data file missing.json not found"),
        (dict(val_set_size=40), "--val_set_size 40 leaves no training records"),
        (dict(lora_target_modules="q_proj,query_key_value"), "query_key_value not in the model; its linear layers are: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
        (dict(quantization="3bit"), "--quantization must be one of auto, 8bit, 4bit, none, not '3bit'"),
        (dict(resume_from_checkpoint="nowhere"), "--resume_from_checkpoint nowhere not found"),
        (dict(base_model="./no-such-model"), "base model directory ./no-such-model not found"),
        (dict(base_model="missing.gguf"), "GGUF file missing.gguf not found"),
    ],
)
def test_bad_input_fails_before_loading_the_model(tiny_model, alpaca_file, tmp_path, monkeypatch, overrides, message):
    import utils.models

    monkeypatch.setattr(utils.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run_train(tiny_model, alpaca_file, tmp_path / "out", **overrides)


def test_non_empty_output_dir_is_not_overwritten(tiny_model, alpaca_file, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "adapter_model.safetensors").write_text("earlier run")
    with pytest.raises(UserError, match="already holds files from an earlier run: pass --resume_from_checkpoint"):
        run_train(tiny_model, alpaca_file, tmp_path / "out")
    assert (tmp_path / "out" / "adapter_model.safetensors").read_text() == "earlier run"


def test_unwritable_output_dir(tiny_model, alpaca_file, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a directory"):
        run_train(tiny_model, alpaca_file, tmp_path / "file")
    with pytest.raises(UserError, match="is not writable"):
        run_train(tiny_model, alpaca_file, "/proc/lora-out")


def test_incomplete_checkpoint_is_refused(tiny_model, alpaca_file, tmp_path):
    broken = tmp_path / "out" / "checkpoint-4"
    broken.mkdir(parents=True)
    (broken / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="no complete checkpoint-N directory"):
        run_train(tiny_model, alpaca_file, tmp_path / "out", resume_from_checkpoint=True)
    with pytest.raises(UserError, match="is incomplete \\(interrupted while saving\\)"):
        run_train(tiny_model, alpaca_file, tmp_path / "out", resume_from_checkpoint=str(broken))


def test_resuming_a_finished_run_is_refused(trained, tiny_model, alpaca_file, tmp_path):
    """Resuming a checkpoint that already reached the run's last step would train nothing and save it again."""
    with pytest.raises(UserError, match="checkpoint-12 is already at step 12 of this run's 12: nothing left to train"):
        run_train(tiny_model, alpaca_file, tmp_path / "again", max_steps=12, lora_target_modules="q_proj,k_proj,v_proj,o_proj",
                  resume_from_checkpoint=str(trained / "checkpoint-12"))
    assert not (tmp_path / "again").exists()


def test_a_cutoff_that_leaves_no_response_is_refused(tiny_model, alpaca_file, tmp_path, monkeypatch):
    import utils.models

    monkeypatch.setattr(utils.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(UserError, match="no training record keeps any response token within --cutoff_len 8: raise --cutoff_len"):
        run_train(tiny_model, alpaca_file, tmp_path / "out", cutoff_len=8, train_on_inputs=False)


def test_a_cutoff_that_leaves_no_response_is_refused_on_the_default(tiny_model, alpaca_file, tmp_path, monkeypatch):
    """With no --train_on_inputs (on for instruction records), records cut off before their response are dropped too."""
    import utils.models

    monkeypatch.setattr(utils.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(UserError, match="no training record keeps any response token within --cutoff_len 8: raise --cutoff_len"):
        run_train(tiny_model, alpaca_file, tmp_path / "out", cutoff_len=8)


def test_all_linear_adapts_every_linear_layer(tiny_model, alpaca_file, tmp_path):
    out = run_train(tiny_model, alpaca_file, tmp_path / "all", max_steps=1, val_set_size=0, lora_target_modules="all-linear")
    config = json.loads((out / "adapter_config.json").read_text())
    adapted = {name.rsplit(".", 1)[-1] for name in config["target_modules"]}  # PEFT records each layer's full name
    assert sorted(adapted) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_a_short_run_still_draws_its_train_loss(tmp_path, monkeypatch):
    """One logged training step is a point: a line alone would draw nothing."""
    import matplotlib.axes

    from utils.metrics import plot_loss_curve

    drawn = []
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, *a, **k: drawn.append((a, k)))
    plot_loss_curve([{"step": 1, "loss": 2.0}, {"step": 1, "eval_loss": 1.9}], tmp_path / "curve.png")
    assert [(k["label"], k["marker"]) for _, k in drawn] == [("train loss", "o"), ("validation loss", "o")]


def test_resume_with_other_lora_shape_is_refused(trained, tiny_model, alpaca_file, tmp_path):
    with pytest.raises(UserError, match="trained with --lora_r 8, not 16"):
        run_train(tiny_model, alpaca_file, tmp_path / "x", lora_r=16, resume_from_checkpoint=str(trained / "checkpoint-12"))


def test_cli_help_lists_every_flag():
    proc = subprocess.run([sys.executable, "finetune.py", "--help"], cwd=REPO, capture_output=True, text=True)
    out = proc.stdout
    original = ("base_model data_path output_dir batch_size micro_batch_size num_epochs learning_rate cutoff_len val_set_size "
                "lora_r lora_alpha lora_dropout lora_target_modules train_on_inputs add_eos_token group_by_length "
                "wandb_project wandb_run_name wandb_watch wandb_log_model resume_from_checkpoint prompt_template_name").split()
    for flag in original:
        assert f"--{flag}" in out, flag
    assert out.count("(default: ") >= 15  # all but the 7 flags whose default is "unset"


def test_help_lists_every_flag_with_its_default_and_docstring_line():
    """`python finetune.py --help` is the flag reference (the README keeps no table): every parameter of
    finetune.train appears with its real default and its docstring line, and nothing else does."""
    import inspect
    import re

    out = subprocess.run([sys.executable, "finetune.py", "--help"], cwd=REPO, capture_output=True, text=True).stdout
    rows = {m[0]: (m[1], m[2]) for m in re.findall(r"^  --(\w+) \S+(?: \(default: (.*)\))?\n      (.*)$", out, re.M)}
    from utils.cli import SHARED_HELP

    doc = inspect.getdoc(finetune.train)
    for key, text in SHARED_HELP.items():  # help several scripts share, written once
        doc = doc.replace(f"{{{key}}}", text)
    for name, param in inspect.signature(finetune.train).parameters.items():
        assert name in rows, f"--{name} is missing from finetune.py --help"
        default, meaning = rows[name]
        expected = str(param.default).replace(f"{REPO}/", "")  # the shipped data's path, relative to the repository
        expected = "[q_proj,v_proj]" if name == "lora_target_modules" else expected
        unset = param.default is None or param.default == ""
        assert default == ("" if unset else expected), (name, default, expected)
        documented = re.search(rf"^\s+{name}: (.*)$", doc, re.M)
        assert documented, f"finetune.train's docstring does not explain {name}"
        assert meaning == documented[1], name
    assert set(rows) == set(inspect.signature(finetune.train).parameters), "--help lists flags the code lacks"


def test_cli_bad_input_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "finetune.py", "--data_path", str(tmp_path / "none.json"), "--output_dir", str(tmp_path / "o")],
        cwd=REPO, capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: data file {tmp_path / 'none.json'} not found"
    assert "Traceback" not in proc.stdout + proc.stderr


def test_embedded_model_real_run(embedded_model, tmp_path):
    """A real (short) run on SmolLM2-135M with the shipped data: the adapter trains and reloads."""
    out = tmp_path / "lora-smollm2"
    finetune.train(output_dir=str(out), batch_size=4, micro_batch_size=2, max_steps=3, val_set_size=4,
                   save_steps=3, logging_steps=1, cutoff_len=96, learning_rate=1e-3)
    tensors = load_file(out / "adapter_model.safetensors")
    assert len([k for k in tensors if "lora_B" in k]) == 30 * 2  # q_proj and v_proj in all 30 layers
    assert any(v.abs().sum() > 0 for k, v in tensors.items() if "lora_B" in k)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final_eval_loss"] < metrics["eval_loss_first"] < 5


@pytest.mark.parametrize("flags, package", [(dict(wandb_project="p"), "wandb"), (dict(tensorboard=True), "tensorboard")])
def test_missing_logger_package_is_one_line(monkeypatch, flags, package):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith(package) else real(name, *a))
    args = dict(wandb_project="", wandb_watch="", wandb_log_model="", tensorboard=False) | flags
    with pytest.raises(UserError, match=f"needs the {package} package: pip install {package}"):
        finetune.reporting(**args)


def no_model_load(monkeypatch):
    import utils.models

    monkeypatch.setattr(utils.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))


def test_an_adapter_cut_short_is_one_line_without_a_base(tiny_model, alpaca_file, tmp_path, monkeypatch):
    """What a save cut by kill -9 or a full disk used to leave: weights that are no tensor file, no adapter_config.json.
    With no --base_model and no $BASE_MODEL the base was looked up in that missing config (a FileNotFoundError)."""
    monkeypatch.delenv("BASE_MODEL", raising=False)
    no_model_load(monkeypatch)
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "adapter_model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match="cut has no adapter_config.json: not a PEFT adapter directory"):
        run_train("", alpaca_file, tmp_path / "out", resume_from_checkpoint=str(cut))


@pytest.mark.parametrize("flags, message", [
    (dict(lora_alpha=32), "was trained with --lora_alpha 16, not 32: pass --lora_alpha 16 to continue it"),
    (dict(lora_dropout=0.1), "was trained with --lora_dropout 0.05, not 0.1"),
    (dict(lora_target_modules="q_proj,v_proj"), "targets ['k_proj', 'o_proj', 'q_proj', 'v_proj'], not ['q_proj', 'v_proj']"),
])
@pytest.mark.parametrize("what", ["checkpoint-12", "adapter"])
def test_resume_and_warm_start_refuse_other_lora_settings(trained, tiny_model, alpaca_file, tmp_path, monkeypatch, flags,
                                                          message, what):
    """Alpha would rescale the trained weights mid-run; the run would record settings that did not apply."""
    no_model_load(monkeypatch)
    source = trained / what if what != "adapter" else trained
    args = dict(LEARNING, max_steps=16, resume_from_checkpoint=str(source)) | flags
    with pytest.raises(UserError, match=re.escape(message)):
        run_train(tiny_model, alpaca_file, tmp_path / "x", **args)


def test_resume_skips_incomplete_checkpoints_and_says_which(trained, tiny_model, alpaca_file, tmp_path, monkeypatch, capsys):
    """A full disk cut trainer_state.json short: the checkpoint is not whole, and the one before it is taken."""
    import shutil

    no_model_load(monkeypatch)
    out = tmp_path / "out"
    for step in (8, 12):
        shutil.copytree(trained / f"checkpoint-{step}", out / f"checkpoint-{step}")
    state = out / "checkpoint-12" / "trainer_state.json"
    state.write_text(state.read_text()[:100])
    with pytest.raises(BaseException, match="the model was loaded"):
        run_train(tiny_model, alpaca_file, out, **dict(LEARNING, max_steps=16), resume_from_checkpoint=True)
    printed = capsys.readouterr().out
    assert "Skipping checkpoint-12, incomplete (interrupted while saving): trainer_state.json is not valid JSON" in printed
    assert f"Resuming the full training state from {out / 'checkpoint-8'}" in printed
    with pytest.raises(UserError, match=re.escape(f"is incomplete (interrupted while saving): trainer_state.json is not "
                                                  f"valid JSON (cut short); resume from {out / 'checkpoint-8'}")):
        run_train(tiny_model, alpaca_file, out, **dict(LEARNING, max_steps=16), resume_from_checkpoint=str(out / "checkpoint-12"))


def test_overwrite_deletes_the_earlier_runs_checkpoints(trained, tiny_model, alpaca_file, tmp_path, capsys):
    """--overwrite_output_dir (the README's quick start passes it on every run): a later --resume_from_checkpoint True
    must not find the earlier run's higher-numbered checkpoint."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(trained / "checkpoint-12", out / "checkpoint-12")
    run_train(tiny_model, alpaca_file, out, max_steps=2, val_set_size=0, save_steps=1, overwrite_output_dir=True)
    assert "--overwrite_output_dir: deleted the earlier run's checkpoint-12 from" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    run_id = json.loads((out / "training_args.json").read_text())["run_id"]
    assert json.loads((out / "checkpoint-2" / "training_args.json").read_text())["run_id"] == run_id  # whose it is


def test_the_default_run_checkpoints_every_tenth_of_its_steps(tiny_model, alpaca_file, tmp_path):
    """No --save_steps: a checkpoint every tenth of the run (here 2 of 20 steps), the last three kept."""
    args = {k: v for k, v in QUICK.items() if k != "save_steps"} | dict(max_steps=20, val_set_size=0)
    finetune.train(**args, base_model=str(tiny_model), data_path=str(alpaca_file), output_dir=str(tmp_path / "o"))
    assert sorted(p.name for p in (tmp_path / "o").glob("checkpoint-*")) == ["checkpoint-16", "checkpoint-18", "checkpoint-20"]
    assert json.loads((tmp_path / "o" / "training_args.json").read_text())["save_steps"] == 2  # the value it used


def test_save_minutes_saves_between_save_steps(tiny_model, alpaca_file, tmp_path):
    out = run_train(tiny_model, alpaca_file, tmp_path / "o", max_steps=3, val_set_size=0, save_steps=100, save_minutes=1e-9)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
