"""Test-only: lets accelerate run FSDP on CPU, so tests/test_scale.py can execute configs/fsdp.yaml without GPUs.

On PYTHONPATH, Python imports this file at start-up in every process. accelerate 1.15 applies FSDP only on
accelerators: on CPU its state says MULTI_CPU and the FSDP config is silently ignored (plain DDP runs instead).
This changes that one decision in the ranks that `accelerate launch` starts (ACCELERATE_USE_FSDP=true) and
nothing else: the FSDP plugin, its wrapping, the Trainer's FSDP training and checkpoints, and finetune.py run as
they do on GPUs, with gloo instead of NCCL. It says so in $ALPACA_LORA_FSDP_ON_CPU (utils.distributed.FSDP_ON_CPU):
finetune.py then loads the base on rank 0 alone, as it does on GPUs, where without the hook every CPU rank must
load it (accelerate would run DDP)."""

import os

if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
    import accelerate.state as state

    os.environ["ALPACA_LORA_FSDP_ON_CPU"] = "1"

    _init = state.AcceleratorState.__init__

    def _init_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
        _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == state.DistributedType.MULTI_CPU:
            self.distributed_type = state.PartialState._shared_state["distributed_type"] = state.DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    state.AcceleratorState.__init__ = _init_fsdp_on_cpu
