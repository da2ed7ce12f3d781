#!/usr/bin/env bash
# CUDA check of the foundation on a lent GPU (not part of CI): the tiny preset with bf16 autocast,
# then a GPT-2-124M-shaped model with torch.compile for tokens/s and MFU, then a sample.
#   bash bench/gpu_check.sh   (run from the repo root on a CUDA machine with torch installed)
set -uo pipefail
export PYTHONPATH=src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
cf() { python3 -m chatfactory.cli "$@"; }
cf pretrain --config tiny --out /tmp/gc_tiny pretrain.steps=60 pretrain.progress=false pretrain.eval_every=30 \
  && cf sample --run /tmp/gc_tiny --prompt "The " --max-tokens 30 --seed 0
# GPT-2 small shape (12 x 768, 50k vocab, 1024 context), bf16 + compile, on the embedded text
cf pretrain --config gpt2-124m --out /tmp/gc_124m data.source=embedded tokenizer.train_chars=3000000 \
  data.val_fraction=0.02 pretrain.steps=${STEPS:-40} pretrain.grad_accum=1 pretrain.batch_size=16 \
  pretrain.warmup_steps=10 pretrain.eval_every=0 pretrain.ckpt_every=0 pretrain.eval_batches=2 \
  pretrain.log_every=1 pretrain.progress=false
python3 - <<'PY'
import json
rows = [json.loads(l) for l in open("/tmp/gc_124m/pretrain/metrics.jsonl") if '"tok_s"' in l]
late = rows[len(rows)//2:]
tok = sorted(r["tok_s"] for r in late)[len(late)//2]; mfu = sorted(r["mfu"] for r in late)[len(late)//2]
print(f"gpt2-124m shape, bf16+compile: median tok/s {tok:,.0f}, MFU {mfu:.1%} (second half of {len(rows)} steps); "
      f"loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}")
print(f"RESULT gpu_tok_s={tok:.0f} gpu_mfu={mfu:.3f}")
PY
