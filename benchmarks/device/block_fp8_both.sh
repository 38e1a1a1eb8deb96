#!/usr/bin/env bash
# How the eighteenth session timed one 14B block compiled with FP8 linears + FP8 attention (issue #22) on a
# lent H100: that variant, then ours bf16 and diffusers compiled in a second process of the same call
# (the inductor cache in /tmp is shared; all in one process outlasts a 600 s call on a cold machine).
#   OUT=out bash benchmarks/device/block_fp8_both.sh
set -uo pipefail
WHEELS=${WHEELS:-.gpu/speed/whl}; OUT=${OUT:-outputs/device}; mkdir -p "$OUT"
[ -d "$WHEELS" ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 benchmarks/speed.py --only one_block --block-variants fp8_both --out "$OUT/block-fp8-both.json" 2>&1 | tee "$OUT/block-fp8-both.log" | grep -v Warning | tail -20
python3 benchmarks/speed.py --only one_block --block-variants ours diffusers --out "$OUT/block-bf16.json" 2>&1 | tee "$OUT/block-bf16.log" | grep -v Warning | tail -20
