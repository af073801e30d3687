#!/bin/bash
# Run 2 on one H200 (bench/records/2026-11-27-h200-gpu): the fix of fe75d47 less its last part (rows not hashed);
# wheels as in gpu.sh.
export PYTHONUNBUFFERED=1
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
nvidia-smi -L; mkdir -p $OUT
el "bench"
timeout 120 python3 -m shared.cli bench --config bench/records/2026-11-27-h200-gpu/gpu-check.toml --device cuda --only overhead,sharing --out /tmp/chk > /tmp/chk.log 2>&1; echo rc=$?
cp /tmp/chk/RESULTS.md /tmp/chk/results.json $OUT/; grep -E "^\| (1|3)\. " /tmp/chk/RESULTS.md; grep -E "^\| small_cnn \| (8|16|1) x|^\| preact" /tmp/chk/RESULTS.md
el "process clients"
python3 -c "from bench.config import load_bench_config; from bench.servers import write_teachers; from pathlib import Path; write_teachers(Path('/tmp/w'), load_bench_config('gpu'), 2.0)"
timeout 50 python3 bench/measurement-scripts/h200-gpu/process_clients.py --config /tmp/w/teachers.toml --teacher small_cnn --device cuda --seconds 5 --out /tmp/pc --loads 1x128,8x16 2>&1
cp /tmp/pc/process-clients-small_cnn.json $OUT/
el done
