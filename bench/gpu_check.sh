#!/usr/bin/env bash
# CUDA check of the foundation on a lent GPU (not part of CI): the tiny preset with bf16 autocast,
# then a GPT-2-124M-shaped model with torch.compile for tokens/s and MFU, then a sample.
#   bash bench/gpu_check.sh   (run from the repo root on a CUDA machine with torch installed)
#   bash bench/gpu_check.sh --quick   # smoke test (tests/test_benches.py): tiny sizes, the 124M shape cut to one
#                                     # layer, in a temp dir; on the CPU where there is no CUDA (skipped=cuda)
# Last line: RESULT gpu_tok_s=… gpu_mfu=… steps=… device=… skipped=…
set -uo pipefail
export PYTHONPATH=src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
WORK=/tmp TINY=() SHAPE=() SKIPPED=none DEVICE=cuda
if [ "${1:-}" = "--quick" ]; then
  # --quick: 4 steps of each on the repo's own docs (a text that needs no building); the 124M shape at one
  # layer, 64 tokens, a 512-token vocabulary
  WORK=$(mktemp -d) STEPS=${STEPS:-4}
  trap 'rm -rf "$WORK"' EXIT
  cat README.md docs/*.md > "$WORK/docs.txt"
  TINY=(pretrain.steps=4 pretrain.eval_every=2 "data.source=$WORK/docs.txt")
  SHAPE=(model.depth=1 model.block_size=64 pretrain.seq_len=64 pretrain.batch_size=2 tokenizer.vocab_size=512
         "data.source=$WORK/docs.txt" pretrain.warmup_steps=1)
  if ! python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "CUDA: no device here: the CUDA run (bf16 autocast, torch.compile) is skipped; the same commands run" \
         "on the CPU, eager (compiling there would only add time)"
    SKIPPED=cuda DEVICE=cpu SHAPE+=(pretrain.compile=false)
  fi
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
[ "$DEVICE" = cpu ] || python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
cf() { python3 -m chatfactory.cli "$@"; }
cf pretrain --config tiny --out "$WORK/gc_tiny" pretrain.steps=60 pretrain.progress=false pretrain.eval_every=30 \
  "${TINY[@]}" && cf sample --run "$WORK/gc_tiny" --prompt "The " --max-tokens 30 --seed 0
# GPT-2 small shape (12 x 768, 50k vocab, 1024 context), bf16 + compile, on the embedded text
cf pretrain --config gpt2-124m --out "$WORK/gc_124m" data.source=embedded tokenizer.train_chars=3000000 \
  data.val_fraction=0.02 pretrain.steps=${STEPS:-40} pretrain.grad_accum=1 pretrain.batch_size=16 \
  pretrain.warmup_steps=10 pretrain.eval_every=0 pretrain.ckpt_every=0 pretrain.eval_batches=2 \
  pretrain.log_every=1 pretrain.progress=false "${SHAPE[@]}"
GC_124M="$WORK/gc_124m" DEVICE=$DEVICE SKIPPED=$SKIPPED python3 - <<'PY'
import json, os
rows = [json.loads(l) for l in open(os.environ["GC_124M"] + "/pretrain/metrics.jsonl") if '"tok_s"' in l]
late = rows[len(rows)//2:]
tok = sorted(r["tok_s"] for r in late)[len(late)//2]; mfu = sorted(r["mfu"] for r in late)[len(late)//2]
print(f"gpt2-124m shape, bf16+compile: median tok/s {tok:,.0f}, MFU {mfu:.1%} (second half of {len(rows)} steps); "
      f"loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}")
print(f"RESULT gpu_tok_s={tok:.0f} gpu_mfu={mfu:.3f} steps={len(rows)} device={os.environ['DEVICE']} "
      f"skipped={os.environ['SKIPPED']}")
PY
