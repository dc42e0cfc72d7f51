#!/usr/bin/env bash
# The prepared GPU check of issues 13 and 15 (one GPU, under 5 minutes): bench/gpu.py says what it
# measures, QLoRA (4-bit / 8-bit bitsandbytes base) against bf16 LoRA included (--skip-qlora leaves it out).
#
#   bash bench/gpu.sh              # on a CUDA machine; with OUT set, writes $OUT/gpu.json and $OUT/gpu.log
#   bash bench/gpu.sh --smoke      # the same script at toy sizes on the CPU, in seconds
#
# Python: $PYTHON, else the repository's .venv, else python3 (needs torch, torchvision,
# transformers, datasets, peft, scikit-learn, bitsandbytes and this repository on the path).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then py=$PYTHON; elif [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  "$py" -m bench.gpu --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu.log"
else
  "$py" -m bench.gpu "$@"
fi
