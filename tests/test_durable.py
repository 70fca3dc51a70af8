"""Durable writes and checkpoints through real faults: SIGKILL in the middle of a save, a disk that fills up."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import REPO
from utils import durable
from utils.training import checkpoint_problem


def test_a_file_is_replaced_whole_and_nothing_is_left(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with durable.durable_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["metrics.json"]
    durable.write_text(target, "new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["metrics.json"]


def test_a_directory_is_swapped_whole(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "old.safetensors").write_text("old")
    with durable.durable_dir(target) as tmp:
        (tmp / "new.safetensors").write_text("new")
        assert os.listdir(target) == ["old.safetensors"]  # untouched until the block ends
    assert os.listdir(target) == ["new.safetensors"] and os.listdir(tmp_path) == ["export"]


def test_files_are_published_with_the_one_that_makes_them_usable_last(tmp_path, monkeypatch):
    """A kill between two moves leaves no adapter_config.json: no adapter, rather than the old config with new weights."""
    (tmp_path / "adapter_config.json").write_text("old config")
    (tmp_path / "adapter_model.safetensors").write_text("old weights")
    moved, real = [], os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: moved.append((Path(b).name, sorted(os.listdir(tmp_path)))) or real(a, b))
    with durable.durable_files(tmp_path, last="adapter_config.json") as staging:
        (staging / "adapter_config.json").write_text("new config")
        (staging / "adapter_model.safetensors").write_text("new weights")
    assert moved[0][0] == "adapter_model.safetensors" and "adapter_config.json" not in moved[0][1]
    assert moved[-1][0] == "adapter_config.json"
    assert (tmp_path / "adapter_config.json").read_text() == "new config"
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_sweep_removes_what_a_killed_process_left_and_says_so(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f"{durable.TEMP_PREFIX}{dead.stdout.strip()}-model.safetensors"
    leftover.write_text("half")
    running = tmp_path / f"{durable.TEMP_PREFIX}{os.getppid()}-other.safetensors"  # a live writer's: kept
    running.write_text("being written")
    assert durable.sweep(tmp_path) == [leftover]
    assert capsys.readouterr().out.startswith(f"Removed 1 unfinished file(s) a killed save left in {tmp_path}: ")
    assert running.exists()


@pytest.mark.parametrize("damage, problem", [
    (lambda c: (c / "trainer_state.json").write_text('{"global_step": 4, "log'), "trainer_state.json is not valid JSON"),
    (lambda c: (c / "trainer_state.json").unlink(), "no trainer_state.json"),
    (lambda c: truncate(c / "adapter_model.safetensors", 0.5), "adapter_model.safetensors is truncated"),
    (lambda c: truncate(c / "adapter_model.safetensors", 0.001), "adapter_model.safetensors is not a safetensors file"),
    (lambda c: truncate(c / "optimizer.pt", 0.5), "optimizer.pt is truncated"),
    (lambda c: (c / "adapter_config.json").write_text(""), "adapter_config.json is not valid JSON"),
])
def test_a_checkpoint_is_complete_only_when_every_file_parses(tmp_path, damage, problem):
    checkpoint = fake_checkpoint(tmp_path / "checkpoint-4")
    assert checkpoint_problem(checkpoint) is None
    damage(checkpoint)
    assert problem in checkpoint_problem(checkpoint)


def fake_checkpoint(path: Path) -> Path:
    """The files a Trainer checkpoint of a LoRA run holds, small."""
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    save_file({"base_model.model.q_proj.lora_A.weight": torch.ones(8, 64)}, path / "adapter_model.safetensors")
    (path / "adapter_config.json").write_text(json.dumps({"r": 8}))
    torch.save({"state": {0: torch.ones(512)}}, path / "optimizer.pt")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": 4, "log_history": []}))
    return path


def truncate(path: Path, share: float) -> None:
    os.truncate(path, int(path.stat().st_size * share))


# --- real faults: a training run and an export killed (SIGKILL) mid-save, a disk that fills up -------------------

RUN = dict(batch_size=8, micro_batch_size=4, cutoff_len=128, val_set_size=0, logging_steps=1, save_steps=1, warmup_steps=0)


@pytest.fixture(scope="module")
def good_run(tiny_model, tmp_path_factory) -> tuple[dict, Path]:
    """The previous good state: a finished 2-step run (checkpoint-1, checkpoint-2, the adapter); and its flags."""
    import finetune

    data = tmp_path_factory.mktemp("data") / "alpaca.json"
    data.write_text(json.dumps(json.loads((REPO / "data" / "alpaca_en_demo.json").read_text())[:40]))
    out = tmp_path_factory.mktemp("good") / "lora"
    flags = dict(RUN, base_model=str(tiny_model), data_path=str(data))
    finetune.train(**flags, output_dir=str(out), max_steps=2)
    return flags, out


def faulty(where: str, folder: Path, entry: str, flags: dict, limit_bytes: int = 0) -> subprocess.CompletedProcess:
    """The entry point run by tests/faults.py: killed at the write `where` names, or with files capped at limit_bytes."""
    import resource

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, str(REPO / "tests" / "faults.py"), where, str(folder), entry, json.dumps(flags)],
                          capture_output=True, text=True, timeout=600, preexec_fn=cap if limit_bytes else None)


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def loads_whole(checkpoint: Path) -> None:
    """Every file of a checkpoint judged complete really loads."""
    import torch
    from safetensors.torch import load_file

    for file in checkpoint.iterdir():
        if file.suffix in (".pt", ".pth", ".bin"):
            torch.load(file, weights_only=False)
        elif file.suffix == ".safetensors":
            load_file(file)
        elif file.suffix == ".json":
            json.loads(file.read_text())


def check_after_fault(before: dict[str, bytes], out: Path, flags: dict, capsys) -> None:
    """What was saved before is intact, every checkpoint is whole or named incomplete, the adapter loads, and a resume
    either finishes the run or says in one line why it cannot."""
    import finetune
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from utils.cli import UserError

    now = files(out)
    for name, content in before.items():
        if name.startswith("checkpoint-") and name in now:  # a checkpoint the run rotated out is gone on purpose
            assert now[name] == content, f"{name} changed"
    complete = [c for c in out.glob("checkpoint-*") if checkpoint_problem(c) is None]
    assert max(int(c.name.split("-")[1]) for c in complete) >= 2
    for checkpoint in complete:
        loads_whole(checkpoint)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(flags["base_model"]), out)  # old or new, whole
    capsys.readouterr()
    try:
        finetune.train(**flags, output_dir=str(out), max_steps=4, resume_from_checkpoint=True)
    except UserError as err:
        assert "nothing left to train" in str(err) and "\n" not in str(err)
    assert not list(out.glob(f"{durable.TEMP_PREFIX}*"))
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(flags["base_model"]), out)


@pytest.mark.parametrize("where", [
    "save_file checkpoint-3/adapter_model.safetensors",  # the weights of a checkpoint, cut mid-write
    "save checkpoint-3/optimizer.pt",
    "open checkpoint-3/trainer_state.json",  # everything but the trainer state written
    "save_file .partial-",  # the final adapter, staged
    "replace training_args.json",  # the final adapter half published
    "replace adapter_config.json",
])
def test_training_killed_mid_save_keeps_what_was_saved(good_run, tmp_path, where, capsys):
    flags, good = good_run
    out = tmp_path / "lora"
    shutil.copytree(good, out)
    before = files(out)
    killed = faulty(where, out, "finetune:train", dict(flags, output_dir=str(out), max_steps=4, resume_from_checkpoint=True))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    check_after_fault(before, out, flags, capsys)


def test_training_on_a_full_disk_keeps_what_was_saved(good_run, tmp_path, capsys):
    """Files capped below the optimizer state's size (RLIMIT_FSIZE): the first checkpoint save fails."""
    flags, good = good_run
    out = tmp_path / "lora"
    shutil.copytree(good, out)
    before = files(out)
    full = faulty("", out, "finetune:train", dict(flags, output_dir=str(out), max_steps=4, resume_from_checkpoint=True),
                  limit_bytes=30_000)
    errors = [line for line in full.stderr.splitlines() if line.startswith("error: ")]
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith("error: the disk is full or refused a write")
    check_after_fault(before, out, flags, capsys)


@pytest.mark.parametrize("where", ["save_file .partial-", "open .partial-"])
def test_an_export_killed_mid_save_keeps_the_earlier_one_and_its_leftovers_are_removed(good_run, tmp_path, where, capsys):
    import export_hf_checkpoint

    flags, adapter = good_run
    export = dict(base_model=flags["base_model"], lora_weights=str(adapter), output_dir=str(tmp_path / "export"))
    export_hf_checkpoint.export(**export)
    before = files(tmp_path)
    killed = faulty(where, tmp_path, "export_hf_checkpoint:export", dict(export, overwrite_output_dir=True))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert {k: v for k, v in files(tmp_path).items() if not k.startswith(durable.TEMP_PREFIX)} == before
    assert list(tmp_path.glob(f"{durable.TEMP_PREFIX}*"))  # the model-sized copy a killed export leaves...
    capsys.readouterr()
    export_hf_checkpoint.export(**export, overwrite_output_dir=True)
    assert "Removed 1 unfinished file(s) a killed save left in" in capsys.readouterr().out  # ...is removed, with a line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
