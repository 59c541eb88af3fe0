#!/usr/bin/env bash
# Start one Dask worker process per GPU of this host for the evomerge Dask runner.
#
#   bash deployments/worker.sh tcp://SCHEDULER:8786 [GPU_IDS]
#
# GPU_IDS is a comma-separated list such as 0,1,2,3 (default: every GPU that
# nvidia-smi lists). Each worker's CUDA_VISIBLE_DEVICES names only its own
# GPU. Each worker runs one task at a time and declares the resource GPU=1,
# which the flow requests for each task when runner.gpus_per_task > 0.
# Run it from a clone of this repository with evomerge installed, and export
# the AWS_* variables here when the store configuration does not carry them.
# The script waits for its workers and stops them all on Ctrl-C or SIGTERM.
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: bash deployments/worker.sh tcp://SCHEDULER:8786 [GPU_IDS]" >&2
  exit 2
fi
scheduler=$1
gpus=${2:-}
if [[ -z $gpus ]]; then
  if ! command -v nvidia-smi >/dev/null; then
    echo "nvidia-smi not found: give the GPU ids as the second argument, e.g. 0,1" >&2
    exit 2
  fi
  gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, -)
fi

export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 PREFECT_LOGGING_EXTRA_LOGGERS=evomerge

pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM EXIT
IFS=, read -ra ids <<<"$gpus"
for id in "${ids[@]}"; do
  CUDA_VISIBLE_DEVICES=$id dask worker "$scheduler" \
    --name "$(hostname)-gpu$id" \
    --nworkers 1 --nthreads 1 \
    --resources "GPU=1" \
    --no-dashboard &
  pids+=($!)
  echo "started Dask worker for GPU $id (pid $!)"
done
wait
