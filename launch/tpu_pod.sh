#!/usr/bin/env bash
# Run the same command on every host of a TPU pod slice (multi-controller JAX), e.g.
#   gcloud compute tpus tpu-vm ssh NAME --worker=all --command="cd codi-jax && launch/tpu_pod.sh CONFIG gs://BUCKET/run"
# jax.distributed.initialize() finds the pod by itself. Each host reads its own shard of the data
# (jax.process_index()); the global batch is assembled with jax.make_array_from_process_local_data;
# Orbax writes one checkpoint from all hosts; only process 0 writes logs, images and summaries.
# WORKDIR must be shared storage (e.g. a GCS bucket) visible to every host; so must
# --config.data.data_dir when process 0 prepares the bundled dataset for the others.
# FSDP: --config.sharding.fsdp=N (N devices per weight shard group; data axis = devices / N).
set -euo pipefail
config="${1:?config file}"; workdir="${2:?shared workdir}"; shift 2
exec python -m codi_jax.train --config="$config" --workdir="$workdir" --jax_distributed "$@"
