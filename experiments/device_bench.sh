#!/usr/bin/env bash
# Accelerator benchmark (experiments/device_bench.py): LoRA step / floor / full fine-tuning of a
# Llama-shaped ~1B bf16 model, the QLoRA step, NF4 dequantisation against the memory roofline,
# and PyTorch + PEFT on the same GPU. Needs jax with CUDA, torch, peft, transformers (no
# package registry). The report goes to stdout and to $OUT/device_bench.md when OUT is set.
#
#   bash experiments/device_bench.sh              # GPU machine (H200: --bandwidth-gbs 4800)
#   bash experiments/device_bench.sh --dry-run    # CPU, tiny shapes: checks it runs end to end
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}  # torch shares the GPU
args=("$@")
if [[ -n "${OUT:-}" ]]; then
  args+=(--out "$OUT/device_bench.md")
fi
if [[ " $* " != *" --dry-run "* ]]; then
  "$PY" -c "import jax; print(jax.__version__, jax.devices())"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv
fi
exec "$PY" experiments/device_bench.py "${args[@]}"
