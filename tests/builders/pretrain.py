"""Pretraining through the CLI at a size that runs in seconds: the tiny preset with SMALL's overrides (the
``pretrain_tokenizer`` and ``seeded_run`` fixtures in conftest.py give the run directory)."""

SMALL = ["data.max_chars=400000", "tokenizer.vocab_size=512", "model.depth=2", "model.block_size=64",
         "pretrain.seq_len=64", "pretrain.batch_size=8", "pretrain.progress=false", "pretrain.eval_batches=2"]
