"""configs/: the accelerate FSDP and DeepSpeed files load with accelerate's own parser and mean what they say."""

import json
from pathlib import Path

import pytest

from tiny import REPO

CONFIGS = REPO / "configs"


def validated(name):
    """The config as `accelerate launch --config_file` resolves it (defaults filled, flags derived)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "finetune.py"])
    return _validate_launch_command(args)[0]


@pytest.mark.parametrize("name", ["fsdp.yaml", "fsdp_qlora.yaml"])
def test_fsdp_config_is_fsdp2_full_shard(name):
    """What configs/fsdp.yaml asks accelerate for; tests/test_scale.py runs it (training, saving, resuming), and
    tests/test_shard.py runs both with a base that only rank 0 loads (fsdp_qlora.yaml in 4-bit)."""
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = validated(name)
    assert args.use_fsdp and args.mixed_precision == "bf16"
    env = prepare_multi_gpu_env(args)
    # FSDP2: FSDP1 renames the layers it wraps and peft then saves an empty adapter (finetune.py refuses it).
    assert env["FSDP_VERSION"] == "2" and env["FSDP_RESHARD_AFTER_FORWARD"] == "true"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP" and env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT"
    # Rank 0 alone reads a 16-bit base; the others receive their shards (finetune.py starts them empty).
    assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"


@pytest.mark.parametrize("name, stage", [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3),
                                         ("deepspeed_zero3_qlora.yaml", 3)])
def test_deepspeed_configs(name, stage):
    args = validated(name)
    assert args.use_deepspeed
    ds_file = REPO / args.deepspeed_config_file  # relative to the repository root, where launches start
    config = json.loads(ds_file.read_text())
    assert config["zero_optimization"]["stage"] == stage
    # "auto" lets the Trainer fill batch sizes and precision from finetune.py's own flags.
    assert config["train_micro_batch_size_per_gpu"] == "auto" and config["gradient_accumulation_steps"] == "auto"
    assert (stage == 3) == args.zero3_init_flag  # ZeRO-3: from_pretrained partitions the weights as they load
