"""Builders of the tiny tasks and run directories that several test modules (and their subprocesses)
share; tests/conftest.py turns the run directories into fixtures.

- ``preferences``: the good/bad topics task (comparisons, a gold labeler, a tiny SFT'd policy): reward, DPO
- ``reverse``: the reverse-three-letters chat task and its run (SFT, LoRA, FSDP)
- ``rl_world``: the "say blue" RL world (PPO, GRPO, RLOO, LoRA, loss aggregation) and its helpers
- ``rl_gradients``: one RL update's gradients on fixed answers (loss aggregation, also under torchrun)
- ``pretrain``: the tiny preset's small overrides for pretraining through the CLI
- ``gguf_model``: a small random Llama/Qwen2 written as a GGUF file
- ``standin``: the stand-ins of the benches' ``--quick`` mode (a SmolLM2-family GGUF run, a demo run)
"""
import gzip
import json


def write_jsonl(path, rows):
    """Rows (dicts, or lines as they are) to a JSONL file, gzipped if the name ends in .gz -> the path."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path
