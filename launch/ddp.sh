#!/usr/bin/env bash
# Single-node DDP with torchrun: one process per GPU, or 2 CPU processes when there is no GPU.
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    cat <<'USAGE'
usage: [NPROC=N] launch/ddp.sh --config FILE [key=value ...]

DDP on this machine: torchrun --standalone (rendezvous on a free local port) starts NPROC
processes, one DDP rank each. Arguments go to train.py unchanged (`python train.py --help`).
  launch/ddp.sh --config configs/image/mnist_demo.yaml
  NPROC=4 launch/ddp.sh --config configs/image/mnist_demo.yaml batch_size=32

environment:
  NPROC   processes (default: the number of visible GPUs, or 2 on a machine without GPUs)
  PYTHON  interpreter (default: .venv/bin/python of this checkout, else python3)
On one GPU: NPROC=1 (one process per GPU; a second one would find no GPU of its own).
SIGTERM and SIGUSR1 to torchrun (the default stop_signals) reach every rank: they stop at the same
step, save <output_dir>/checkpoints/last.pt and exit with code 3; rerun with resume=auto to continue.
SIGINT (Ctrl-C) reaches them too but is not a stop signal: they exit 130 without saving.
USAGE
    exit 0
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$([[ -x $ROOT/.venv/bin/python ]] && echo "$ROOT/.venv/bin/python" || echo python3)}
NPROC=${NPROC:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')}
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node="$NPROC" \
    --signals-to-handle=SIGTERM,SIGINT,SIGUSR1 "$ROOT/train.py" "$@"
