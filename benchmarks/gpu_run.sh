#!/usr/bin/env bash
# The GPU check, as one prepared command (see benchmarks/gpu_check.py and ../shared/GPU.md).
#
#   bash benchmarks/gpu_run.sh prepare   # here (registries reachable): the wheels the GPU image lacks
#                                        # (ml-collections; PyYAML as a fallback) into gpu_wheels/
#                                        # (git-ignored: the device call carries it, carry=["gpu_wheels"])
#   bash benchmarks/gpu_run.sh dry       # here: the check at tiny shapes (CPU), about a minute
#   bash benchmarks/gpu_run.sh run       # on the GPU machine: install the carried wheels, then the
#                                        # check with its ~8 minute budget; gpu.json goes to $OUT
#
# After the device run: docs/gpu.json is $OUT/gpu.json, docs/gpu.md its table with the command,
# the date and the machine; commit both.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

case "${1:-}" in
  prepare)
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
      --platform manylinux2014_x86_64 -d gpu_wheels ml-collections==1.1.0 pyyaml
    ls -l gpu_wheels
    ;;
  dry)
    python3 benchmarks/gpu_check.py --dry_run --out="${OUT:-gpu_check_out}"
    ;;
  run)
    if compgen -G "gpu_wheels/*.whl" > /dev/null; then
      python3 -m pip install --quiet --no-deps --no-index --find-links gpu_wheels ml-collections pyyaml
    fi
    python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out="${OUT:?set OUT}" "${@:2}"
    ;;
  *)
    echo "usage: bash benchmarks/gpu_run.sh prepare|dry|run [gpu_check flags]" >&2
    exit 2
    ;;
esac
