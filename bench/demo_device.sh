#!/usr/bin/env bash
# The demo on a lent machine (not CI): two runs of `chatfactory run --config demo` side by side —
#   gpu:  on CUDA in fp32 (same numerics as the CPU demo), for the learning outcome (report.md/json);
#   cpu2: on two pinned CPU cores with two threads, for the time a 2-core laptop would take
#         (stopped after CPU2_LIMIT seconds; the per-stage seconds it reached are printed).
#   OUT=/tmp/o bash bench/demo_device.sh
#   bash bench/demo_device.sh --quick   # smoke test (tests/test_benches.py): pipeline-tiny's pretrain and sft, a few
#                                       # steps, in a temp dir, unpinned; "gpu" on the CPU where there is no CUDA
# Last line: RESULT gpu_exit=… gpu_stages_done=… cpu2_stages_done=… cpu2_seconds=… stages=… skipped=…
set -uo pipefail
export PYTHONPATH=src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
WORK=/tmp CONFIG=demo QUICK=() PIN_CPU2="taskset -c 2,3" PIN_GPU="taskset -c 4-15" CPU2_THREADS=2 SKIPPED=none
STAGES="pretrain,sft,reward,ppo,dpo"  # the demo's trained stages, for the summary below
if [ "${1:-}" = "--quick" ]; then
  # --quick: two stages of pipeline-tiny, a few steps each, pretraining on the repo's own docs (a text that
  # needs no building); no pinning (a small machine has no cores 2-15), one thread for "cpu2" (it shares the
  # cores with the other run)
  WORK=$(mktemp -d) CONFIG=pipeline-tiny PIN_CPU2="" PIN_GPU="" CPU2_THREADS=1 STAGES="pretrain,sft"
  cat README.md docs/*.md > "$WORK/docs.txt"
  QUICK=(pipeline.stages=pretrain,sft pretrain.steps=4 sft.steps=2 pipeline.heldout=4 pipeline.fewshot=4
         pipeline.samples=1 "data.source=$WORK/docs.txt")
  OUT=${OUT:-$WORK/out}
  trap 'rm -rf "$WORK"' EXIT
  if ! python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "CUDA: no device here: the gpu run is skipped as such; it runs on the CPU"
    SKIPPED=cuda
  fi
fi
OUT=${OUT:-/tmp/demo_device}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null; nproc
NOBAR="pretrain.progress=false sft.progress=false reward.progress=false dpo.progress=false ppo.progress=false"
FP32="pretrain.dtype=float32 sft.dtype=float32 reward.dtype=float32 dpo.dtype=float32 ppo.dtype=float32"
(OMP_NUM_THREADS=$CPU2_THREADS MKL_NUM_THREADS=$CPU2_THREADS RAYON_NUM_THREADS=$CPU2_THREADS CUDA_VISIBLE_DEVICES= \
  $PIN_CPU2 \
  timeout "${CPU2_LIMIT:-400}" python3 -m chatfactory.cli run --config $CONFIG --out "$WORK/cpu2" $NOBAR "${QUICK[@]}" \
  > "$OUT/cpu2.log" 2>&1) &
CPU=$!
$PIN_GPU python3 -m chatfactory.cli run --config $CONFIG --out "$WORK/gpu" $NOBAR $FP32 "${QUICK[@]}" > "$OUT/gpu.log" 2>&1
GPU_EXIT=$?
echo "gpu run exit $GPU_EXIT"
cp "$WORK/gpu/report.md" "$WORK/gpu/report.json" "$OUT/" 2>/dev/null
cp "$WORK/gpu/ppo.png" "$OUT/" 2>/dev/null
wait $CPU
cp "$WORK/cpu2/pipeline.json" "$OUT/cpu2_pipeline.json" 2>/dev/null
tail -c 3000 "$OUT/gpu.log"
WORK=$WORK GPU_EXIT=$GPU_EXIT STAGES=$STAGES SKIPPED=$SKIPPED python3 - <<'PY'
import json, os
from pathlib import Path
work, stages = Path(os.environ["WORK"]), os.environ["STAGES"].split(",")
def ledger(r):
    return json.loads((r / "pipeline.json").read_text()) if (r / "pipeline.json").exists() else {"stages": {}}
r = work / "cpu2"
led = ledger(r)
for s, v in led["stages"].items():
    print(f"cpu2 {s}: {v.get('status')} {v.get('seconds', 0):.1f} s")
for s in stages:
    m = r / s / "metrics.jsonl"
    if m.exists():
        rows = [json.loads(l) for l in m.read_text().splitlines() if '"elapsed"' in l]
        if rows:
            print(f"cpu2 {s} metrics: step {rows[-1]['step']} at {rows[-1]['elapsed']:.1f} s of training, "
                  f"{rows[-1].get('tok_s', 0):.0f} tok/s last step")
done = lambda led: sum(v.get("status") == "done" for s, v in led["stages"].items() if s in stages)  # noqa: E731
print(f"RESULT gpu_exit={os.environ['GPU_EXIT']} gpu_stages_done={done(ledger(work / 'gpu'))} "
      f"cpu2_stages_done={done(led)} cpu2_seconds={sum(v.get('seconds', 0) for v in led['stages'].values()):.1f} "
      f"stages={len(stages)} skipped={os.environ['SKIPPED']}")
PY
