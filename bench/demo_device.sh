#!/usr/bin/env bash
# The demo on a lent machine (not CI): two runs of `chatfactory run --config demo` side by side —
#   gpu:  on CUDA in fp32 (same numerics as the CPU demo), for the learning outcome (report.md/json);
#   cpu2: on two pinned CPU cores with two threads, for the time a 2-core laptop would take
#         (stopped after CPU2_LIMIT seconds; the per-stage seconds it reached are printed).
#   OUT=/tmp/o bash bench/demo_device.sh
set -uo pipefail
export PYTHONPATH=src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/demo_device}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null; nproc
NOBAR="pretrain.progress=false sft.progress=false reward.progress=false dpo.progress=false ppo.progress=false"
FP32="pretrain.dtype=float32 sft.dtype=float32 reward.dtype=float32 dpo.dtype=float32 ppo.dtype=float32"
(OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 RAYON_NUM_THREADS=2 CUDA_VISIBLE_DEVICES= taskset -c 2,3 \
  timeout "${CPU2_LIMIT:-400}" python3 -m chatfactory.cli run --config demo --out /tmp/cpu2 $NOBAR > "$OUT/cpu2.log" 2>&1) &
CPU=$!
taskset -c 4-15 python3 -m chatfactory.cli run --config demo --out /tmp/gpu $NOBAR $FP32 > "$OUT/gpu.log" 2>&1
echo "gpu run exit $?"
cp /tmp/gpu/report.md /tmp/gpu/report.json "$OUT/" 2>/dev/null
cp /tmp/gpu/ppo.png "$OUT/" 2>/dev/null
wait $CPU
python3 - <<'PY'
import json, os
from pathlib import Path
r = Path("/tmp/cpu2")
led = json.loads((r / "pipeline.json").read_text()) if (r / "pipeline.json").exists() else {"stages": {}}
for s, v in led["stages"].items():
    print(f"cpu2 {s}: {v.get('status')} {v.get('seconds', 0):.1f} s")
for s in ("pretrain", "sft", "reward", "ppo", "dpo"):
    m = r / s / "metrics.jsonl"
    if m.exists():
        rows = [json.loads(l) for l in m.read_text().splitlines() if '"elapsed"' in l]
        if rows:
            print(f"cpu2 {s} metrics: step {rows[-1]['step']} at {rows[-1]['elapsed']:.1f} s of training, "
                  f"{rows[-1].get('tok_s', 0):.0f} tok/s last step")
PY
cp /tmp/cpu2/pipeline.json "$OUT/cpu2_pipeline.json" 2>/dev/null
tail -c 3000 "$OUT/gpu.log"
