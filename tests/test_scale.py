"""The README's sharded and multi-node launch commands, executed on CPU with 2 gloo ranks and a tiny LLaMA:
accelerate with configs/fsdp.yaml (FSDP2) and the DeepSpeed ZeRO-2/3 configs, and torchrun / accelerate over two
local "nodes". Each must save a normal PEFT adapter, written by rank 0 only, that equals what one process learns
from the same global batch; FSDP and two-node runs also resume from their checkpoints."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import finetune
from tiny import ALPACA, REPO

# Global batch 8: one process accumulates 2 micro-batches of 4, two ranks run one each. No LoRA dropout, whose
# random masks would differ between the layouts. r=16 puts each LoRA weight (16 × 64 values) above ZeRO-3's
# persistence threshold (10 × hidden = 640), so ZeRO-3 really shards them. Checkpoints at steps 2 and 3. cutoff_len
# 256 keeps all 32 records (a record cut off before its response is dropped): 3 steps of full global batches.
ARGS = dict(batch_size=8, micro_batch_size=4, cutoff_len=256, val_set_size=0, max_steps=3, logging_steps=1,
            save_steps=2, warmup_steps=0, learning_rate=1e-3, lora_dropout=0.0, lora_r=16, quantization="none", bf16=False)
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
# What a CPU needs on top of the shipped configs: 2 processes, and fp32 (the configs' bf16 autocast is for GPUs;
# bf16=False above keeps the frozen base fp32 as these runs always were on CPU: they test sharding, not precision).
ON_CPU = ["--num_processes", "2", "--mixed_precision", "no"]


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


# accelerate never applies FSDP on CPU (it silently runs DDP); this test-only start-up hook lets it (see the file).
FSDP_ON_CPU = dict(PYTHONPATH=f"{REPO / 'tests' / 'fsdp_on_cpu'}{os.pathsep}{REPO}")


@pytest.fixture(scope="module")
def run_args(tiny_model, tmp_path_factory):
    data = tmp_path_factory.mktemp("data") / "alpaca.json"
    data.write_text(json.dumps(json.loads(ALPACA.read_text())[:32]))
    return dict(ARGS, base_model=str(tiny_model), data_path=str(data))


@pytest.fixture(scope="module")
def single(run_args, tmp_path_factory):
    """One process, same global batch: the reference every launcher must reproduce."""
    out = tmp_path_factory.mktemp("single")
    finetune.train(**run_args, output_dir=str(out))
    return out


def flags(run_args, out) -> list[str]:
    return [f"--{k}={v}" for k, v in run_args.items()] + [f"--output_dir={out}"]


def launch(command, timeout=240, **extra_env):
    proc = subprocess.run(command, cwd=REPO, env=env(**extra_env), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def two_nodes(node_command, logs, timeout=240, **extra_env):
    """node_command(rank) for node_rank 0 and 1, run at once as two machines would; both must finish. Output goes
    to files: a full pipe would block one node, and the other would wait for it forever."""
    logs.mkdir(exist_ok=True)
    paths = [logs / f"node{rank}.log" for rank in (0, 1)]
    nodes = [subprocess.Popen(node_command(rank), cwd=REPO, env=env(**extra_env), stdout=path.open("w"),
                              stderr=subprocess.STDOUT) for rank, path in zip((0, 1), paths)]
    try:
        for node in nodes:
            node.wait(timeout=timeout)
    finally:
        for node in nodes:
            node.kill()
    for node, path in zip(nodes, paths):
        assert node.returncode == 0, path.read_text()[-4000:]


def losses(out):
    return [h["loss"] for h in json.loads((out / "metrics.json").read_text())["log_history"] if "loss" in h]


def assert_learned_what_one_process_learns(out, single, base_model):
    """A normal PEFT adapter (one safetensors file, every weight whole) that PeftModel loads, equal to `single`."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    assert losses(out) == pytest.approx(losses(single), rel=1e-4)
    reference = load_file(single / "adapter_model.safetensors")
    saved = load_file(out / "adapter_model.safetensors")
    assert saved.keys() == reference.keys() and all(saved[k].shape == reference[k].shape for k in saved)
    loaded = get_peft_model_state_dict(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model), out))
    for name in reference:
        torch.testing.assert_close(loaded[name], reference[name], atol=1e-5, rtol=1e-3)
    assert any(t.abs().sum() > 0 for n, t in reference.items() if "lora_B" in n)  # it trained


def files(disk) -> set[str]:
    return {str(p.relative_to(disk)) for p in disk.rglob("*") if p.is_file()}


def interrupt_after_step_2(out):
    """What a run stopped after its step-2 checkpoint leaves behind."""
    shutil.rmtree(out / "checkpoint-3")
    (out / "adapter_model.safetensors").unlink()


def test_fsdp_config_trains_saves_and_resumes(run_args, single, tmp_path):
    out = tmp_path / "fsdp"
    command = [*ACCELERATE, "--config_file", "configs/fsdp.yaml", *ON_CPU, "--main_process_port", free_port(),
               "finetune.py", *flags(run_args, out)]
    launch(command, **FSDP_ON_CPU)
    assert (out / "checkpoint-2" / "pytorch_model_fsdp_0").is_dir()  # the Trainer's sharded FSDP checkpoint
    assert_learned_what_one_process_learns(out, single, run_args["base_model"])

    interrupt_after_step_2(out)
    command[command.index("--main_process_port") + 1] = free_port()
    launch([*command, "--resume_from_checkpoint=True"], **FSDP_ON_CPU)
    assert_learned_what_one_process_learns(out, single, run_args["base_model"])


def test_fsdp1_is_refused_before_loading(run_args, tmp_path):
    """FSDP1 would train and then save an empty adapter (peft cannot find LoRA layers it has renamed)."""
    command = [*ACCELERATE, "--config_file", "configs/fsdp.yaml", "--fsdp_version", "1", *ON_CPU,
               "--main_process_port", free_port(), "finetune.py", *flags(run_args, tmp_path / "fsdp1")]
    proc = subprocess.run(command, cwd=REPO, env=env(**FSDP_ON_CPU), capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0 and "error: FSDP1 (fsdp_version 1) cannot save" in proc.stderr
    assert "Loading" not in proc.stdout


@pytest.mark.parametrize("config, stage", [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)])
def test_deepspeed_config_trains_and_saves(run_args, single, tmp_path, config, stage):
    out = tmp_path / "zero"
    launch([*ACCELERATE, "--config_file", f"configs/{config}", "--num_processes", "2", "--main_process_port",
            free_port(), "finetune.py", *flags(run_args, out)], DS_ACCELERATOR="cpu")
    assert (out / "checkpoint-3" / "global_step3").is_dir()  # DeepSpeed's own checkpoint: the engine ran it
    assert json.loads((REPO / "configs" / f"ds_zero{stage}.json").read_text())["zero_optimization"]["stage"] == stage
    assert_learned_what_one_process_learns(out, single, run_args["base_model"])


def test_two_node_torchrun_writes_once_and_resumes(run_args, single, tmp_path):
    """The README's two-node torchrun command with 1 process per node; each node has its own disk."""
    disks = [tmp_path / "node0", tmp_path / "node1"]

    def node(rank, port, disk):
        return [*TORCHRUN, "--nnodes", "2", "--node_rank", str(rank), "--master_addr", "127.0.0.1",
                "--master_port", port, "--nproc_per_node", "1", "finetune.py", *flags(run_args, disk)]

    port = free_port()
    two_nodes(lambda rank: node(rank, port, disks[rank]), tmp_path / "logs")
    assert_learned_what_one_process_learns(disks[0], single, run_args["base_model"])
    # Rank 0 alone writes the adapter, the reports and the checkpoints; each rank adds its own RNG state.
    assert files(disks[1]) == {"checkpoint-2/rng_state_1.pth", "checkpoint-3/rng_state_1.pth"}

    # Resuming needs the whole checkpoint on every node: on storage they share, as here from now on.
    shutil.copy(disks[1] / "checkpoint-2" / "rng_state_1.pth", disks[0] / "checkpoint-2")
    interrupt_after_step_2(disks[0])
    port = free_port()
    two_nodes(lambda rank: [*node(rank, port, disks[0]), "--resume_from_checkpoint=True"], tmp_path / "logs")
    assert_learned_what_one_process_learns(disks[0], single, run_args["base_model"])


def test_two_node_accelerate_fsdp(run_args, single, tmp_path):
    """The README's two-node accelerate command (FSDP), 1 process per node, each node with its own disk."""
    port = free_port()
    disks = [tmp_path / "node0", tmp_path / "node1"]
    two_nodes(lambda rank: [
        *ACCELERATE, "--config_file", "configs/fsdp.yaml", "--num_machines", "2", "--machine_rank", str(rank),
        "--main_process_ip", "127.0.0.1", "--main_process_port", port, *ON_CPU, "finetune.py",
        *flags(run_args, disks[rank])], tmp_path / "logs", **FSDP_ON_CPU)
    assert_learned_what_one_process_learns(disks[0], single, run_args["base_model"])
    # Rank 0 alone writes the adapter and the reports; an FSDP checkpoint is sharded, each rank writes its part.
    assert all(f.startswith("checkpoint-") for f in files(disks[1])) and any("distcp" in f for f in files(disks[1]))
