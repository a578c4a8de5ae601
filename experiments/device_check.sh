#!/usr/bin/env bash
# Engine check on an accelerator machine (H200, jax 0.11.2 preinstalled, no package registry).
#
# What to bring (in ./wheels, made on a machine with a registry, for that machine's Python):
#   pip download --only-binary=:all: --python-version 3.12 -d wheels \
#       flax optax orbax-checkpoint chex safetensors tqdm pytest pytest-timeout hypothesis
#   (pure-Python wheels plus their deps: msgpack, tensorstore, treescope, etils, absl-py,
#    toolz, typing_extensions, ...; pip resolves them from the same folder. Never jax/jaxlib:
#    the machine's own build is the one under test.)
# Usage: bash experiments/device_check.sh [wheels_dir]     (prints a summary at the end)
set -u
cd "$(dirname "$0")/.."
WHEELS="${1:-wheels}"
PY="${PYTHON:-python3}"
LOG="${OUT:-/tmp}/device_check"
mkdir -p "$LOG"

"$PY" -c "import jax, sys; print('python', sys.version.split()[0], 'jax', jax.__version__, jax.devices())"
if ! "$PY" -c "import flax, optax, orbax.checkpoint, chex, safetensors, pytest" 2>/dev/null; then
  if [ -d "$WHEELS" ]; then
    "$PY" -m pip install --no-index --find-links "$WHEELS" \
      flax optax orbax-checkpoint chex safetensors tqdm pytest pytest-timeout hypothesis
  else
    echo "missing packages and no $WHEELS folder: see the header of this script"; exit 2
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

status=0
# 1. The jax version boundary: engine and conformance suites on the 8 fake CPU devices.
JAX_PLATFORMS=cpu timeout 1200 "$PY" -m pytest -q -p no:cacheprovider \
  tests/engine tests/conformance > "$LOG/cpu.txt" 2>&1 || status=1
# 2. The same patterns on the GPU (mesh tests need 8 devices: left to step 1).
JAX_PLATFORMS=cuda,cpu timeout 900 "$PY" -m pytest -q -p no:cacheprovider \
  tests/engine/test_real_model_code.py -k "not shard_map and not lowered and not mesh" \
  > "$LOG/gpu.txt" 2>&1 || status=1

echo "== summary =="
for f in cpu gpu; do echo "$f: $(tail -n 1 "$LOG/$f.txt")"; done
grep -h -E "^(FAILED|ERROR)" "$LOG"/*.txt | head -40
exit $status
