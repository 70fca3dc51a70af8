#!/usr/bin/env bash
# Held-out loss and answers of the base model vs base + the adapter trained by train.sh, into docs/real-run/.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1  # shared machine, see train.sh
python evaluate.py --lora_weights ./lora-real-run --output_dir docs/real-run --batch_size 12 --max_new_tokens 128
# The training run's own reports, copied next to the evaluation (the adapter weights stay out of git).
cp lora-real-run/loss_curve.png lora-real-run/metrics.json lora-real-run/training_args.json docs/real-run/
