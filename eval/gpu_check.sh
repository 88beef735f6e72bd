#!/usr/bin/env bash
# Every GPU check of kangpt, one summary table at the end: see eval/gpu_check.py.
#   eval/gpu_check.sh             # on a CUDA machine (under 8 minutes on one H200)
#   eval/gpu_check.sh --dry-run   # the same steps at tiny sizes on CPU
set -euo pipefail
cd "$(dirname "$0")/.."
exec python eval/gpu_check.py "$@"
