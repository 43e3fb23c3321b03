#!/usr/bin/env bash
# One process drives all local GPUs: the mesh spans jax.devices() and the batch is sharded over it.
# launch/multi_gpu.sh CONFIG WORKDIR [--config.field=value ...]
set -euo pipefail
config="${1:?config file}"; workdir="${2:?workdir}"; shift 2
# Let XLA take most of the GPU memory up front; TF (input pipeline only) is kept off the GPUs.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
exec python -m codi_jax.train --config="$config" --workdir="$workdir" "$@"
