#!/usr/bin/env bash
# Issue 10's GPU check: train_step_s (plaintext, stock CrypTen, veiltrain) on one CUDA device,
# small CNN then ResNet-style, each in its own bench run, then the figures. Budget: under 8
# minutes on an H200-class card.
#
#   bash bench/device_check.sh     # writes $OUT/gpu/<model>/ (or bench/results/gpu/<model>/)
#   BENCH_MODELS=small-cnn,resnet-style,resnet18 bash bench/device_check.sh   # ResNet18: 90 s more
#
# Needs a Python with a CUDA build of torch and veiltrain's other dependencies (the device
# machine has no network: they travel as wheels, see NOTES "GPU check"); PYTHON picks it
# (default: .venv/bin/python, else python3). veiltrain itself is imported from this checkout.
# Nothing here runs without a GPU: on a CPU-only machine it says so and exits 2.
#
# Each model's party logs come back as logs-<model>.tgz. A model that fails stops the check:
# the next one would fail the same way, and device time is scarce.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
DEST=${OUT:-bench/results}/gpu
# DEVICE_CHECK_DEVICE=cpu rehearses the same steps on a CPU-only machine before device time.
DEVICE=${DEVICE_CHECK_DEVICE:-cuda}
MODEL_S=${DEVICE_CHECK_MODEL_S:-210}  # per model; two models and start-up stay under 8 minutes
# Parties are started as `python bench/timed_party.py` and inherit PYTHONPATH: absolute paths.
export PYTHONPATH="$PWD/src:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ "$DEVICE" = cuda ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "device_check: $PY has no CUDA device (torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo missing)); run it on a GPU machine" >&2
    exit 2
fi
"$PY" -c 'import veiltrain.party, crypten, torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' \
    || { echo "device_check: veiltrain's dependencies are missing from $PY (see NOTES, GPU check)" >&2; exit 2; }
mkdir -p "$DEST"
status=0
if [ "$DEVICE" = cuda ]; then
    # veiltrain's CUDA paths against the CPU's words and plaintext first (about a minute or two).
    echo "device_check: tests/test_cuda.py $(date +%T)"
    timeout 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py || status=1
fi
models=${BENCH_MODELS:-small-cnn,resnet-style}  # commas (as for make bench) or spaces
for model in ${models//,/ }; do
    scratch=$(mktemp -d "${TMPDIR:-/tmp}/device-check-XXXXXX")
    echo "device_check: $model (at most $MODEL_S s) $(date +%T)"
    timeout "$MODEL_S" "$PY" bench/bench_summary.py --only-train --device "$DEVICE" --models "$model" \
        --out "$DEST/$model" --work "$scratch" --keep-work
    rc=$?
    (cd "$scratch" && find . -name '*.log' -print0 | tar -czf "$DEST/logs-$model.tgz" --null -T -)
    rm -f "$DEST/$model/summary.md"  # printed above; the device tool returns 8 files at most
    if [ "$rc" -ne 0 ] || ! grep -q '"veiltrain": [0-9]' "$DEST/$model/summary.json" 2>/dev/null; then
        echo "device_check: $model failed (exit $rc); party logs in $DEST/logs-$model.tgz" >&2
        status=1
        break
    fi
done
echo "device_check: figures in $DEST/<model>/summary.json $(date +%T)"
exit $status
