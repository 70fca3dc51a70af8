"""Durable writes and checkpoints through real faults: SIGKILL in the middle of a save, a disk that fills up."""

import json
import os
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
