#!/bin/bash
# Run 1 on one H200 (bench/records/2026-11-27-h200-gpu): process clients + py-spy, the gpu preset in float32, then
# bf16. The service's code was ca1801b's. Run from the repository's root on the GPU host, $OUT naming a folder for
# what it writes, with the packages the host's Python lacks carried as cp312 manylinux wheels in .whl/: fastapi,
# starlette, uvicorn, httptools, zarr, numcodecs, donfig, google-crc32c, pydantic, pydantic-core, annotated-types,
# annotated-doc, typing-inspection, typing-extensions, anyio, litserve, pyzmq, opentelemetry-api, tomli-w, mlxtend,
# py-spy (the versions of requirements.lock; py-spy 0.4.1).
export PYTHONUNBUFFERED=1
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
nvidia-smi -L; nproc; python3 -c "import torch, fastapi, zarr, litserve, uvicorn; print(torch.__version__, torch.cuda.get_device_name(), fastapi.__version__, uvicorn.__version__)" || exit 1
mkdir -p $OUT/fp32 $OUT/bf16 $OUT/procs
el "process clients"
python3 -c "from bench.config import load_bench_config; from bench.servers import write_teachers; from pathlib import Path; write_teachers(Path('/tmp/w'), load_bench_config('gpu'), 2.0)"
timeout 170 python3 bench/measurement-scripts/h200-gpu/process_clients.py --config /tmp/w/teachers.toml --teacher small_cnn --device cuda --seconds 6 --out /tmp/pc --pyspy /tmp/site/bin/py-spy 2>&1 | grep -v "^py-spy>"
cp /tmp/pc/process-clients-small_cnn.json /tmp/pc/pyspy-small_cnn-8x16.txt $OUT/procs/
el "bench fp32"
timeout 280 python3 -m shared.cli bench --config gpu --device cuda --only overhead,cache,sharing,transport,peer --out /tmp/fp32 > /tmp/fp32.log 2>&1; echo rc=$?
cp /tmp/fp32/RESULTS.md /tmp/fp32/results.json /tmp/fp32/sharing.png $OUT/fp32/; grep "^\[bench" /tmp/fp32.log | tail -3; tail -3 /tmp/fp32.log
el "bench bf16"
sed 's/^autocast = "none"/autocast = "bf16"/' bench/presets/gpu.toml > /tmp/gpu-bf16.toml
timeout 120 python3 -m shared.cli bench --config /tmp/gpu-bf16.toml --device cuda --only overhead,sharing --out /tmp/bf16 > /tmp/bf16.log 2>&1; echo rc=$?
cp /tmp/bf16/RESULTS.md /tmp/bf16/results.json $OUT/bf16/; tail -3 /tmp/bf16.log
el done
