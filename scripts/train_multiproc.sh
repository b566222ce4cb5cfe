#!/usr/bin/env bash
# Train on W CPU processes, one per rank (gloo, one compute thread each), with the experts of
# every MoE layer sharded over the ranks (--moe-expert-parallel auto, the default when W > 1).
#
#   scripts/train_multiproc.sh W DATA [fairseq-train flags...]
#
# Adds fairseq's multi-process flags (--cpu --distributed-world-size W --distributed-backend
# gloo --ddp-backend legacy_ddp --distributed-no-spawn --distributed-init-method
# tcp://127.0.0.1:$PORT --distributed-rank R) before yours. Rank 0 logs as usual; other ranks'
# lines (warnings, errors) are prefixed with [rank R]. If one rank fails the others are stopped
# (they would wait for it forever) and the script exits with its status.
# Environment: PORT (default: a free one), FAIRSEQ_TRAIN (default: fairseq-train on PATH),
# OMP_NUM_THREADS (default 1). On GPUs use fairseq-train directly: see docs/distributed.md.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 WORLD_SIZE DATA [fairseq-train flags...]" >&2
  exit 2
fi
W=$1
shift
PORT=${PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
FAIRSEQ_TRAIN=${FAIRSEQ_TRAIN:-fairseq-train}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

pids=()
stop_all() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap 'stop_all; exit 130' INT TERM

for ((R = 0; R < W; R++)); do
  cmd=("$FAIRSEQ_TRAIN" "$1" --cpu --distributed-world-size "$W" --distributed-backend gloo
       --ddp-backend legacy_ddp --distributed-no-spawn
       --distributed-init-method "tcp://127.0.0.1:$PORT" --distributed-rank "$R" "${@:2}")
  if [ "$R" -eq 0 ]; then
    "${cmd[@]}" &
  else
    (set -o pipefail; "${cmd[@]}" 2>&1 | sed -u "s/^/[rank $R] /") &
  fi
  pids+=($!)
done

status=0
for ((i = 0; i < W; i++)); do
  wait -n || { code=$?; [ "$status" -ne 0 ] || status=$code; stop_all; }
done
exit "$status"
