#!/bin/bash
# The GPU path's prepared measurement (docs/design/benchmarks.md, "The GPU path: the prepared command"), on one GPU,
# in about 3 minutes and always under 10 (each step has its own timeout). Run from the repository's root on the GPU
# host, with $OUT naming a folder for its output; writes $OUT/gpu-path/:
#   staging-check.json  staging_check.py: compute through the staging bit for bit `forward`, and its time beside it
#   results.json, RESULTS.md  akd bench --config gpu --device cuda --only overhead,cache,end_to_end
#   gpu-targets.md  the three ratios against their targets on a GPU
#   bench.log  the benchmark's progress and errors
# The packages the GPU host's Python lacks travel as cp312 manylinux wheels in .whl/ (as for the H200 run of
# 2026-11-27, bench/records/2026-11-27-h200-gpu: fastapi, starlette, uvicorn, httptools, zarr, numcodecs, donfig,
# google-crc32c, pydantic, pydantic-core, annotated-types, annotated-doc, typing-inspection, typing-extensions, anyio,
# litserve, pyzmq, opentelemetry-api, tomli-w, mlxtend, at requirements.lock's versions); without .whl/ the host's own
# packages are used.
export PYTHONUNBUFFERED=1
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
else
    export PYTHONPATH=$PWD
fi
nvidia-smi -L
python3 -c "import torch, fastapi, zarr, uvicorn; print(torch.__version__, torch.cuda.get_device_name())" || exit 1
DEST=$OUT/gpu-path; mkdir -p "$DEST"
el "staging check"
timeout 120 python3 bench/measurement-scripts/gpu-path/staging_check.py --device cuda --out "$DEST/staging-check.json"
echo "rc=$?"
el "akd bench"
timeout 400 python3 -m akd bench --config gpu --device cuda --only overhead,cache,end_to_end --out /tmp/gpu-path \
    > "$DEST/bench.log" 2>&1
echo "rc=$?"
cp /tmp/gpu-path/RESULTS.md /tmp/gpu-path/results.json "$DEST/"
grep "^\[bench" "$DEST/bench.log" | tail -3
python3 - "$DEST" <<'EOF'
import json, sys
from pathlib import Path

dest = Path(sys.argv[1])
sections = {s["key"]: s for s in json.loads((dest / "results.json").read_text())["sections"]}
# (benchmark, what its target starts with, op, the target on a GPU)
gpu_targets = [
    ("overhead", "service / in-process time, preact_resnet18, batch 128", "<=", 1.2),
    ("cache", "hit / recompute rows/s, preact_resnet18, batch 128", ">=", 5.0),
    ("end_to_end", "AKD step time, service with overlap on / in-process", "<=", 1.05),
    ("end_to_end", "AKD step time, service with overlap off / in-process", "<=", 1.05),
]
lines = ["| target on a GPU | measured | met |", "| --- | ---: | --- |"]
for key, what, op, threshold in gpu_targets:
    for t in sections.get(key, {}).get("targets", []):
        if t["what"].startswith(what):
            met = t["measured"] <= threshold if op == "<=" else t["measured"] >= threshold
            lines.append(f"| {t['what']} {op} {threshold} | {t['measured']:.3f} | {'yes' if met else '**no**'} |")
(dest / "gpu-targets.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
el done
