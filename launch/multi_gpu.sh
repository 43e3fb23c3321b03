#!/usr/bin/env bash
# GPUs. One node: one process drives all its GPUs (the mesh spans jax.devices()).
#   launch/multi_gpu.sh CONFIG WORKDIR [--config.field=value ...]
# Several nodes: one process per node, WORKDIR on storage every node sees.
#   Under SLURM (srun --ntasks-per-node=1 ...): JAX reads the cluster from SLURM's variables.
#     srun --nodes=4 --ntasks-per-node=1 launch/multi_gpu.sh CONFIG /shared/run
#   Anywhere else: give the coordinator (process 0's host:port), the process count and this id
#     COORDINATOR=node0:12345 NUM_PROCESSES=4 PROCESS_ID=$i launch/multi_gpu.sh CONFIG /shared/run
# FSDP over the devices: --config.sharding.fsdp=8 (data axis = devices / 8).
set -euo pipefail
config="${1:?config file}"; workdir="${2:?workdir (shared storage for several nodes)}"; shift 2
# Let XLA take most of the GPU memory up front; TF (input pipeline only) is kept off the GPUs.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
distributed=()
if [[ -n "${COORDINATOR:-}" ]]; then
  distributed=(--coordinator_address="$COORDINATOR" --num_processes="${NUM_PROCESSES:?}" --process_id="${PROCESS_ID:?}")
elif [[ -n "${SLURM_JOB_ID:-}" && "${SLURM_NTASKS:-1}" -gt 1 ]]; then
  distributed=(--jax_distributed)
fi
exec python -m codi_jax.train --config="$config" --workdir="$workdir" "${distributed[@]}" "$@"
