#!/usr/bin/env bash
# Create what the evomerge deployment needs on a Prefect server: a process work
# pool, its `gpu` work queue, and the `gpu` tag concurrency limit.
#
#   PREFECT_API_URL=http://SERVER:4200/api bash deployments/setup.sh [GPU_LIMIT]
#
# The limit bounds how many merge and evaluation tasks (tagged `gpu`) run at
# once across all workers. Set it to the number of GPUs per host times hosts.
set -euo pipefail

gpus=${1:-${EVOMERGE_GPU_LIMIT:-1}}
pool=${EVOMERGE_WORK_POOL:-evomerge}

export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1

prefect work-pool create "$pool" --type process --overwrite
prefect work-queue create gpu --pool "$pool" || echo "work queue gpu already exists in pool $pool"
prefect concurrency-limit delete gpu >/dev/null 2>&1 || true
prefect concurrency-limit create gpu "$gpus"
echo "work pool $pool, queue gpu and concurrency limit gpu=$gpus are ready"
