#!/usr/bin/env bash
# Multi-node DDP with torchrun and c10d rendezvous: run the same command on every node.
set -euo pipefail
usage() {
    cat <<'USAGE'
usage: launch/multinode.sh --nnodes N --head ADDR [--port P] [--nproc N] [--id ID]
                           [--timeout S] [--join-timeout S] --config FILE [key=value ...]

Run the same command on every node. torchrun joins a c10d rendezvous hosted at ADDR:P by the
node whose address is ADDR (the head), then starts NPROC DDP processes per node. Everything
after the options goes to train.py (`python train.py --help` lists the config keys).
  node0$ launch/multinode.sh --nnodes 2 --head node0 --config configs/image/mnist_demo.yaml
  node1$ launch/multinode.sh --nnodes 2 --head node0 --config configs/image/mnist_demo.yaml

options (or environment variables):
  --nnodes N          NNODES        number of nodes (required)
  --head ADDR         HEAD_ADDR     head node's hostname or IP, reachable from every node (required)
  --port P            HEAD_PORT     rendezvous TCP port on the head (default 29500)
  --nproc N           NPROC         processes per node (default: visible GPUs, or 2 without GPUs)
  --id ID             RDZV_ID       rendezvous id, the same on every node of one job (default dtrain)
  --timeout S         RDZV_TIMEOUT  seconds a node waits for the head's endpoint to answer (default 60)
  --join-timeout S    JOIN_TIMEOUT  seconds the rendezvous waits for all nodes to join (default 600)
environment: PYTHON  interpreter (default: .venv/bin/python of this checkout, else python3)
A bad endpoint (unresolvable head, port in use on the head, head unreachable) exits 1 with one
"error:" line. SIGTERM and SIGUSR1 (the default stop_signals) reach every rank: all save last.pt and
exit with code 3. SIGINT (Ctrl-C) reaches them too but is not a stop signal: exit 130, nothing saved.
Every rank writes <output_dir>/heartbeat/ and hang/, and every rank reads the checkpoint to resume:
so give output_dir= a folder every node sees (NFS, Lustre, ...) or a resume stops with an error.
USAGE
}
NNODES=${NNODES:-} HEAD_ADDR=${HEAD_ADDR:-} HEAD_PORT=${HEAD_PORT:-29500} NPROC=${NPROC:-}
RDZV_ID=${RDZV_ID:-dtrain} RDZV_TIMEOUT=${RDZV_TIMEOUT:-60} JOIN_TIMEOUT=${JOIN_TIMEOUT:-600}
while [[ $# -gt 0 ]]; do
    case $1 in
        -h|--help) usage; exit 0 ;;
        --nnodes) NNODES=${2:?--nnodes needs a value}; shift 2 ;;
        --head) HEAD_ADDR=${2:?--head needs a value}; shift 2 ;;
        --port) HEAD_PORT=${2:?--port needs a value}; shift 2 ;;
        --nproc) NPROC=${2:?--nproc needs a value}; shift 2 ;;
        --id) RDZV_ID=${2:?--id needs a value}; shift 2 ;;
        --timeout) RDZV_TIMEOUT=${2:?--timeout needs a value}; shift 2 ;;
        --join-timeout) JOIN_TIMEOUT=${2:?--join-timeout needs a value}; shift 2 ;;
        --) shift; break ;;
        *) break ;;
    esac
done
if [[ -z $NNODES || -z $HEAD_ADDR ]]; then
    echo "error: launch/multinode.sh needs --nnodes and --head (or NNODES and HEAD_ADDR); see --help" >&2
    exit 2
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$([[ -x $ROOT/.venv/bin/python ]] && echo "$ROOT/.venv/bin/python" || echo python3)}
# Fails fast, in one line, on a bad endpoint; prints whether this node hosts the rendezvous store.
IS_HOST=$("$PYTHON" "$ROOT/launch/rendezvous_check.py" "$HEAD_ADDR" "$HEAD_PORT" "$RDZV_TIMEOUT")
NPROC=${NPROC:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 2)')}
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --nproc-per-node="$NPROC" \
    --rdzv-backend=c10d --rdzv-endpoint="$HEAD_ADDR:$HEAD_PORT" --rdzv-id="$RDZV_ID" \
    --rdzv-conf="is_host=$IS_HOST,read_timeout=$RDZV_TIMEOUT,join_timeout=$JOIN_TIMEOUT" \
    --signals-to-handle=SIGTERM,SIGINT,SIGUSR1 "$ROOT/train.py" "$@"
