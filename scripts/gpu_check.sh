#!/usr/bin/env bash
# The torch backend on an NVIDIA GPU, in one command (see scripts/gpu_check.py for the steps).
#   bash scripts/gpu_check.sh            # on the GPU machine; figures under $OUT
#   bash scripts/gpu_check.sh --cpu      # the same steps, small shapes, on the CPU
# Safe to run twice: installs only what is missing, from carried wheels (./wheels, no network).
set -euo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-$PWD/gpu-check-out} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
echo "[gpu_check] $(date -u +%FT%TZ) $(hostname) $*"
# Carried wheels (pip download on a machine with network into ./wheels): each installed
# only when its module is missing, never from the network, never another torch.
if [ -d wheels ]; then
    for pair in tensorboardX:tensorboardX bitsandbytes:bitsandbytes; do
        module=${pair%%:*} dist=${pair##*:}
        python -c "import $module" 2>/dev/null ||
            pip install -q --no-index --find-links wheels --no-deps "$dist" || true
    done
fi
# The project itself runs from this checkout (PYTHONPATH in gpu_check.py): no install
# step that could reach for mlx, which the torch path does not need.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
python scripts/gpu_check.py --out "$OUT" "$@"
