#!/usr/bin/env bash
# Issue 10's GPU check: train_step_s (plaintext, stock CrypTen, veiltrain) on one CUDA device,
# small CNN and ResNet-style, then the figures. Budget: under 8 minutes on an H200-class card.
#
#   bash bench/device_check.sh            # writes $OUT/gpu (or bench/results/gpu) and prints it
#
# Needs a Python with a CUDA build of torch 2.13 and veiltrain's other dependencies already
# installed (the device machine has no network); PYTHON picks it (default: .venv/bin/python,
# else python3). Nothing here runs without a GPU: on a CPU-only machine it says so and exits 2.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
DEST=${OUT:-bench/results}/gpu
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "device_check: $PY has no CUDA device (torch $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo missing)); run it on a GPU machine" >&2
    exit 2
fi
"$PY" -c 'import veiltrain, crypten' || { echo "device_check: install veiltrain and crypten into $PY first (make venv TORCH_SPEC=...)" >&2; exit 2; }
mkdir -p "$DEST"
# 450 s for the run itself leaves the rest of the 8 minutes for start-up and printing.
PYTHONPATH=src timeout 450 "$PY" bench/bench_summary.py --only-train --device cuda \
    --models "${BENCH_MODELS:-small-cnn,resnet-style}" --out "$DEST"
echo "device_check: figures in $DEST/summary.json"
