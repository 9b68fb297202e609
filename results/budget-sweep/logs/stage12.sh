#!/usr/bin/env bash
set -euo pipefail
cd .
. venv/bin/activate
export PYTHONPATH=$PWD TORCH_EXTENSIONS_DIR=.torch_ext
while read -r line; do echo "=== $(date -u +%FT%TZ) load $(cut -d' ' -f1-3 /proc/loadavg): $line"; eval "$line"; done < stage12.txt
echo "=== done $(date -u +%FT%TZ)"
