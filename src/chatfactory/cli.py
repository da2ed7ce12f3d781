"""``chatfactory <command>``: the command line.

    chatfactory tokenizer --config tiny --out runs/tiny          train the run's BPE tokenizer
    chatfactory pretrain  --config tiny --out runs/tiny [k=v …]  pretrain (resumes if interrupted)
    chatfactory sample    --run runs/tiny --prompt "The"         continue a prompt

``--config`` takes a preset name from configs/ (tiny, shakespeare, gpt2-124m, …) or a YAML file; any
``section.key=value`` after it overrides one setting (``pretrain.steps=500 model.depth=6``). Every
training command runs unchanged under ``torchrun --nproc_per_node=N -m chatfactory.cli …``.
"""

from __future__ import annotations

import argparse
import sys

EPILOG = """examples:
  chatfactory pretrain --config tiny --out runs/tiny pretrain.steps=100
  torchrun --nproc_per_node=2 -m chatfactory.cli pretrain --config tiny --out runs/tiny
  chatfactory sample --run runs/tiny --prompt "def " --max-tokens 60 --temperature 0.8 --seed 1
"""


def _add_config_args(p):
    p.add_argument("--config", default="tiny", help="preset name in configs/ or a YAML file (default: tiny)")
    p.add_argument("--out", required=True, help="run directory, e.g. runs/NAME (created; resumed if it exists)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="override settings of the config")


def cmd_tokenizer(a):
    from .config import load_config, save_config
    from .train.pretrain import ensure_tokenizer

    cfg = load_config(a.config, a.overrides)
    save_config(cfg, f"{a.out}/config.yaml")
    tok = ensure_tokenizer(cfg, a.out)
    print(f"{a.out}/tokenizer.json: {tok.vocab_size} tokens")


def cmd_pretrain(a):
    from .config import load_config
    from .train.pretrain import run_pretrain

    res = run_pretrain(load_config(a.config, a.overrides), a.out)
    if res:
        print("pretrain: " + " ".join(f"{k}={v:.4f}" for k, v in res.items()))


def cmd_sample(a):
    import torch

    from .checkpoint import latest_stage, load_model
    from .engine import Engine, SamplingParams
    from .tokenizer import Tokenizer

    torch.set_grad_enabled(False)
    stage = a.stage or latest_stage(a.run)
    model, _ = load_model(f"{a.run}/{stage}")
    tok = Tokenizer.load(f"{a.run}/tokenizer.json")
    params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                            seed=a.seed, stop_ids=(tok.bos_id, tok.end_id))
    sys.stdout.write(a.prompt)
    pending = b""
    for step in Engine(model).stream([[tok.bos_id] + tok.encode(a.prompt)], params):
        if step[0] is None or step[0] in params.stop_ids:
            break
        pending += tok.decode_bytes([step[0]])
        try:  # print whole characters only: a multi-byte character may span tokens
            sys.stdout.write(pending.decode("utf-8"))
            pending = b""
        except UnicodeDecodeError:
            continue
        sys.stdout.flush()
    sys.stdout.write(pending.decode("utf-8", errors="replace") + "\n")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="chatfactory", description=__doc__.split("\n\n")[0].strip("`: "),
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="command")
    p = sub.add_parser("tokenizer", help="train the byte-level BPE tokenizer of a run on its text")
    _add_config_args(p)
    p.set_defaults(fn=cmd_tokenizer)
    p = sub.add_parser("pretrain", help="pretrain a GPT on raw text (next-token prediction); resumes if interrupted")
    _add_config_args(p)
    p.set_defaults(fn=cmd_pretrain)
    p = sub.add_parser("sample", help="continue a text prompt with a trained model")
    p.add_argument("--run", required=True, help="run directory, e.g. runs/NAME")
    p.add_argument("--stage", default=None, help="which weights: pretrain, sft, ppo, … (default: the last trained)")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--max-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(fn=cmd_sample)
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    from .checkpoint import CheckpointError
    from .data.sources import DataError

    try:
        a.fn(a)
    except (ValueError, FileNotFoundError, CheckpointError, DataError) as e:
        print(f"chatfactory {a.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
