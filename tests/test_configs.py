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


def test_fsdp_config_shards_fully_with_peft_wrapping(tiny_model, monkeypatch):
    from accelerate.utils.launch import prepare_multi_gpu_env
    from peft import LoraConfig, get_peft_model
    from peft.utils.other import fsdp_auto_wrap_policy
    from transformers import AutoModelForCausalLM

    args = validated("fsdp.yaml")
    assert args.use_fsdp and args.mixed_precision == "bf16"
    env = prepare_multi_gpu_env(args)
    assert env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD" and env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert env["FSDP_USE_ORIG_PARAMS"] == "false"  # PEFT's guide: its own policy then keeps LoRA weights apart
    # The policy the Trainer installs for PEFT models finds the decoder layers and the LoRA layers.
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(target_modules=["q_proj", "v_proj"]))
    policy = fsdp_auto_wrap_policy(model)
    layer = model.base_model.model.model.layers[0]
    assert policy(layer, recurse=False, nonwrapped_numel=0)
    assert policy(layer.self_attn.q_proj.lora_A["default"], recurse=False, nonwrapped_numel=0)


@pytest.mark.parametrize("name, stage", [("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)])
def test_deepspeed_configs(name, stage):
    args = validated(name)
    assert args.use_deepspeed
    ds_file = REPO / args.deepspeed_config_file  # relative to the repository root, where launches start
    config = json.loads(ds_file.read_text())
    assert config["zero_optimization"]["stage"] == stage
    # "auto" lets the Trainer fill batch sizes and precision from finetune.py's own flags.
    assert config["train_micro_batch_size_per_gpu"] == "auto" and config["gradient_accumulation_steps"] == "auto"
    assert (stage == 3) == args.zero3_init_flag
