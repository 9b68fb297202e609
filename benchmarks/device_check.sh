#!/usr/bin/env bash
# The prepared GPU check (logic in benchmarks/device_check.py; README, "GPU check").
# Usage, from anywhere:  bash benchmarks/device_check.sh OUTDIR [--quick] [--budget SECONDS]
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export PYTHONUNBUFFERED=1
exec python3 benchmarks/device_check.py "$@"
