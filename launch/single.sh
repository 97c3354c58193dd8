#!/usr/bin/env bash
# Single-box debugging: one process on the CPU, or on one GPU when there is one.
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    cat <<'USAGE'
usage: launch/single.sh --config FILE [key=value ...]

One training process (no launcher, no process group): on the first visible GPU, else the CPU.
Arguments go to train.py unchanged; `python train.py --help` lists every config key.
  launch/single.sh --config configs/image/mnist_demo.yaml max_steps=20
  launch/single.sh --config configs/image/mnist_demo.yaml mode=cpu     # CPU even with a GPU

environment:
  CUDA_VISIBLE_DEVICES  GPUs to pick from; only the first one is used (default: GPU 0)
  PYTHON                interpreter (default: .venv/bin/python of this checkout, else python3)
USAGE
    exit 0
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$([[ -x $ROOT/.venv/bin/python ]] && echo "$ROOT/.venv/bin/python" || echo python3)}
# One GPU at most: with several visible, mode=auto would pick DataParallel.
CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-0}
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES%%,*}
exec "$PYTHON" "$ROOT/train.py" "$@"
