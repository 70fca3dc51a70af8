#!/usr/bin/env bash
# The documented real run: LoRA on the embedded SmolLM2-135M-Instruct with the shipped Alpaca sample, on CPU.
# 50 records are held out (finetune.py's seeded split); 20 steps × 16 records = 320 of the other 949, each seen once.
set -euo pipefail
cd "$(dirname "$0")/../.."
# The 2-core machine was shared with several other jobs: one thread per process wastes less time in
# OpenMP barriers waiting for a descheduled second thread. On a machine of your own, leave it unset.
export OMP_NUM_THREADS=1
python finetune.py \
  --output_dir ./lora-real-run \
  --val_set_size 50 \
  --batch_size 16 --micro_batch_size 4 \
  --max_steps 20 --save_steps 10 --logging_steps 2 \
  --learning_rate 1e-3 \
  --cutoff_len 256 \
  --train_on_inputs False
