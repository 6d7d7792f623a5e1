#!/usr/bin/env bash
# Show that a Linux machine without a system OpenBLAS or libgfortran gets OpenBLAS speed from
# `pip install -e .` alone, without removing anything from this (shared) machine: inside a
# private mount namespace (root: `unshare -m`), Debian's OpenBLAS folder is covered by an
# empty tmpfs, /dev/null is bound over libgfortran.so.5.0.0, and the loader cache is rebuilt
# without them. Nothing outside the namespace sees any of it.
#
#   bash scripts/check_pip_blas_isolated.sh [VENV] [OUTDIR]
# VENV: a fresh virtualenv with `pip install -e .` done (default /tmp/blasvenv).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-/tmp/blasvenv}
OUT=${2:-/tmp/pip-blas-check}
mkdir -p "$OUT"
exec unshare -m bash -s "$VENV" "$OUT" "$PWD" <<'INNER'
set -euo pipefail
VENV=$1 OUT=$2 REPO=$3
LIBDIR=/usr/lib/$(uname -m)-linux-gnu
mount --make-rprivate /
[ -d "$LIBDIR/openblas-pthread" ] && mount -t tmpfs none "$LIBDIR/openblas-pthread"
for f in "$LIBDIR"/libgfortran.so.5.*; do [ -f "$f" ] && mount --bind /dev/null "$f"; done
ldconfig -C "$OUT/ld.so.cache" 2>/dev/null || true
mount --bind "$OUT/ld.so.cache" /etc/ld.so.cache
unset PYTHONPATH LD_PRELOAD LD_LIBRARY_PATH MLX_TUNE_BLAS MLX_TUNE_OPENBLAS MLX_TUNE_NO_BLAS_FIX
export HF_HUB_OFFLINE=1 MLX_TUNE_BLAS_LIBDIR="$OUT/cache"
rm -rf "$OUT/cache" "$OUT/quickstart"
echo "== the system has no OpenBLAS / libgfortran in here"
ldconfig -p -C /etc/ld.so.cache | grep -E "openblas|gfortran" || echo "(loader cache: none)"
ls "$LIBDIR/openblas-pthread" | wc -l
"$VENV/bin/python" -c "import ctypes.util as u; print('find_library:', u.find_library('openblas'), u.find_library('gfortran'))"
LIB=$("$VENV/bin/python" -c "from mlx_tune.system import pip_openblas as p; print(p.wheel_openblas()[0])")
echo "== ldd of the pip OpenBLAS without its private directory"
ldd "$LIB" | grep -E "gfortran|quadmath" || true
echo "== mlx-tune doctor"
"$VENV/bin/mlx-tune" doctor 2>&1 | grep -E "cpu blas|using" || true
PRIV=$(ls -d "$OUT"/cache/blas-*)
echo "== ldd with the private directory ($PRIV) on LD_LIBRARY_PATH"
LD_LIBRARY_PATH=$PRIV ldd "$LIB" | grep -E "gfortran|quadmath"
echo "== quickstart, 20 steps, LD_DEBUG=libs trace of libgfortran"
cd "$REPO"
LD_DEBUG=libs LD_DEBUG_OUTPUT="$OUT/ld-debug" "$VENV/bin/mlx-tune" train \
  --config configs/quickstart.yaml --output-dir "$OUT/quickstart" --max-steps 20 \
  --report-every 2 --eval-steps 100000 --num-samples 0 --dashboard plain > "$OUT/train.log" 2>&1
grep -E "mlx-tune: using|step +20|tok" "$OUT/train.log" | head -5
grep -h -E "libgfortran|libopenblas" "$OUT"/ld-debug.* | grep -E "trying file|calling init" | sort -u | head
"$VENV/bin/python" - "$OUT/quickstart" <<'PY'
import json, statistics, sys
rs = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
t = [r for r in rs if r["type"] == "train"]
rates = [(b["trained_tokens"] - a["trained_tokens"]) / (b["wall_time"] - a["wall_time"]) for a, b in zip(t, t[1:])]
print(f"tokens/s (median after the first report): {statistics.median(rates[1:]):.0f}; final loss {t[-1]['loss']:.4f}")
PY
INNER
