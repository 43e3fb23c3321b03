#!/usr/bin/env bash
# Train on this machine (CPU or its accelerators): launch/local.sh CONFIG WORKDIR [--config.field=value ...]
# Rerunning with the same WORKDIR resumes from its latest checkpoint.
set -euo pipefail
config="${1:?config file, e.g. codi_jax/configs/cpu/teacher_patches32.py}"; workdir="${2:?workdir}"; shift 2
exec python -m codi_jax.train --config="$config" --workdir="$workdir" "$@"
