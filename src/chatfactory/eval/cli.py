"""``chatfactory eval``: every measurement of one checkpoint, as a table on the terminal and as JSON.

    chatfactory eval --run runs/NAME --text val.txt                        loss, bits/byte
    chatfactory eval --run runs/NAME --stage pretrain --task t.jsonl --shots 0,1,5
    chatfactory eval --run runs/NAME --stage sft --task t.jsonl --mode gen   (chat template: auto for sft/ppo/…)
    chatfactory eval --run runs/NAME --stage ppo --against sft --prompts p.jsonl --judge runs/NAME/reward
    chatfactory eval … --json results.json

Kept free of heavy imports at module level: the main parser imports it to register the command.
"""

from __future__ import annotations

import json
from pathlib import Path

HELP = "measure a checkpoint: loss/bits-per-byte, zero/one/few-shot tasks, win rate against another"


def add_eval_parser(sub, fn) -> None:
    import argparse

    examples = "examples:\n" + (__doc__ or "").split("\n\n")[1]
    p = sub.add_parser("eval", help=HELP, description=HELP + ".", epilog=examples,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory, e.g. runs/NAME")
    p.add_argument("--stage", default=None, help="which weights: pretrain, sft, ppo, … or a stage directory "
                                                 "(default: the last trained)")
    p.add_argument("--text", action="append", default=[], help="text file/folder for loss and bits/byte (repeatable)")
    p.add_argument("--task", action="append", default=[], help="task JSONL (context + choices/gold, or context + "
                                                                "answer; repeatable)")
    p.add_argument("--shots", default="0,1,5", help="shot counts for the task table (default: 0,1,5)")
    p.add_argument("--mode", choices=["ll", "gen"], default="ll", help="ll: log-likelihood scoring; "
                                                                       "gen: greedy generation, exact match")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--chat", dest="chat", action="store_true", default=None, help="score through the chat template")
    fmt.add_argument("--base", dest="chat", action="store_false", help="score as plain text (default for pretrain)")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N rows of each task")
    p.add_argument("--seed", type=int, default=0, help="seed for drawing the shots and for sampling")
    p.add_argument("--max-tokens", type=int, default=0, help="--text: at most this many tokens; "
                                                             "win rate: reply length (default 64)")
    p.add_argument("--against", default=None, help="win rate: the other checkpoint (a stage of this run, "
                                                   "or a stage directory)")
    p.add_argument("--prompts", default=None, help="win rate: prompts JSONL ({'messages': [... user]})")
    p.add_argument("--judge", default=None, help="win rate: a reward-model stage directory "
                                                 "or a 'module:function' scorer")
    p.add_argument("--temperature", type=float, default=0.0, help="win rate: sampling temperature (0 = greedy)")
    p.add_argument("--json", default=None, help="also write the results as JSON to this file")
    p.set_defaults(fn=fn)


def run_eval(a) -> dict:
    from ..store.checkpoint import latest_stage, resolve_stage
    from ..store.files import atomic_write_text
    from ..store.load import load_model
    from ..text.tokenizer import Tokenizer
    from .fewshot import few_shot_table, format_table, load_task
    from .lm import text_loss

    run = Path(a.run)
    stage = a.stage or latest_stage(run)
    model, _ = load_model(resolve_stage(run, stage, "--stage"))
    tok = Tokenizer.load(run / "tokenizer.json")
    chat = a.chat if a.chat is not None else Path(stage).name not in ("pretrain",)
    try:
        shots = tuple(int(s) for s in a.shots.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--shots {a.shots!r}: expected comma-separated integers such as 0,1,5") from None
    if not (a.text or a.task or a.against):
        raise ValueError("nothing to evaluate: give --text, --task and/or --against (see --help)")
    res: dict = {"run": str(run), "stage": stage, "chat": chat}

    for path in a.text:
        r = text_loss(model, tok, path, max_tokens=a.max_tokens)
        res.setdefault("text", {})[path] = r
        print(f"{path}: loss {r['loss']:.4f} nats/token, {r['bpb']:.4f} bits/byte over {r['tokens']:,} tokens")

    for path in a.task:
        table = few_shot_table(model, tok, load_task(path), shots, chat=chat, mode=a.mode, seed=a.seed, limit=a.limit)
        res.setdefault("tasks", {})[path] = {name: {str(k): v for k, v in t.items()} for name, t in table.items()}
        print(f"\n{path} ({'chat template' if chat else 'plain text'}, "
              f"{'exact match' if a.mode == 'gen' else 'log-likelihood'}, accuracy)")
        print(format_table(table))

    if a.against:
        from ..data.preferences import load_prompts
        from .winrate import load_judge, win_rate

        if not (a.prompts and a.judge):
            raise ValueError("--against needs --prompts (a prompts JSONL) and --judge "
                             "(reward model dir or module:function)")
        other, _ = load_model(resolve_stage(run, a.against, "--against"))
        rows = load_prompts(a.prompts)[: a.limit or None]
        r = win_rate(model, other, tok, rows, load_judge(a.judge, tok), max_tokens=a.max_tokens or 64,
                     temperature=a.temperature, seed=a.seed)
        res["win_rate"] = {"against": a.against, "judge": a.judge, **r}
        print(f"\n{stage} vs {a.against} on {r['n']} prompts (judge {a.judge}): win rate {r['win_rate']:.3f} "
              f"({r['wins']} wins, {r['ties']} ties, {r['losses']} losses; "
              f"mean score {r['score_a']:.3f} vs {r['score_b']:.3f})")

    if a.json:
        atomic_write_text(a.json, json.dumps(res, indent=2))
        print(f"wrote {a.json}")
    return res
