#!/usr/bin/env bash
# Writes the old-format checkpoints in this folder, with the code of commit 0ca16d3 (before the Checkpointer):
#   git worktree add /tmp/old 0ca16d3 && cd /tmp/old && PYTHONPATH=src bash tests/data/checkpoints_0ca16d3/make_fixtures.sh
# step_00000002.pt: one process (mode=single); sharded/step_00000002/: mode=fsdp, torchrun with 2 ranks (gloo on CPUs).
# tests/test_old_checkpoints.py resumes both with the current code and repeats these settings (ARGS).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
tmp=$(mktemp -d)
ARGS=(workload=image model.arch=shufflenet_v2_x0_5 model.dropout=-1 data.synthetic=true data.image_size=32
      data.val_crop_ratio=1.0 data.synthetic_train_size=16 data.synthetic_val_size=4 data.num_classes=2
      batch_size=4 eval_batch_size=4 num_workers=0 max_steps=2 epochs=1 ema.enabled=true ema.steps=1
      optim.lr=0.01 optim.warmup_steps=0 log_every=1 progress=false keep_last=1 timeout_s=60)
python train.py "${ARGS[@]}" output_dir="$tmp/single"
torchrun --standalone --nproc_per_node=2 train.py "${ARGS[@]}" mode=fsdp output_dir="$tmp/fsdp"
rm -rf "$here/step_00000002.pt" "$here/sharded"
cp "$tmp/single/checkpoints/step_00000002.pt" "$here/"
mkdir -p "$here/sharded" && cp -r "$tmp/fsdp/checkpoints/step_00000002" "$here/sharded/"
rm -rf "$tmp"
