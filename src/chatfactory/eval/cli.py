"""``chatfactory eval``: every measurement of one checkpoint, as a table on the terminal and as JSON.

    chatfactory eval --run runs/NAME --text val.txt                        loss, bits/byte
    chatfactory eval --run runs/NAME --stage pretrain --task t.jsonl --shots 0,1,5
    chatfactory eval --run runs/NAME --stage sft --task t.jsonl --mode gen   (chat template: auto for sft/ppo/…)
    chatfactory eval --run runs/NAME --stage ppo --against sft --prompts p.jsonl --judge runs/NAME/reward
    chatfactory eval --run runs/NAME --task ifeval            (IFEval: 541 prompts, greedy, eval/ifeval.py)
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
                                                                "answer; repeatable), or 'ifeval' (or an IFEval "
                                                                "input_data.jsonl)")
    p.add_argument("--shots", default="0,1,5", help="shot counts for the task table (default: 0,1,5)")
    p.add_argument("--mode", choices=["ll", "gen"], default="ll", help="ll: log-likelihood scoring; "
                                                                       "gen: greedy generation, exact match")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--chat", dest="chat", action="store_true", default=None, help="score through the chat template")
    fmt.add_argument("--base", dest="chat", action="store_false", help="score as plain text (default for pretrain)")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N rows of each task")
    p.add_argument("--seed", type=int, default=0, help="seed for drawing the shots and for sampling")
    p.add_argument("--max-tokens", type=int, default=0, help="--text: at most this many tokens; "
                                                             "win rate: reply length (default 64); "
                                                             "ifeval: new tokens per response (default 512)")
    p.add_argument("--against", default=None, help="win rate: the other checkpoint (a stage of this run, "
                                                   "or a stage directory)")
    p.add_argument("--prompts", default=None, help="win rate: prompts JSONL ({'messages': [... user]})")
    p.add_argument("--judge", default=None, help="win rate: a reward-model stage directory "
                                                 "or a 'module:function' scorer")
    p.add_argument("--temperature", type=float, default=0.0, help="win rate: sampling temperature (0 = greedy)")
    p.add_argument("--json", default=None, help="also write the results as JSON to this file")
    p.set_defaults(fn=fn)


def run_eval(run, stage: str | None = None, text=(), task=(), shots: str = "0,1,5", mode: str = "ll",
             chat: bool | None = None, limit: int = 0, seed: int = 0, max_tokens: int = 0, against: str | None = None,
             prompts: str | None = None, judge: str | None = None, temperature: float = 0.0,
             json_path: str | None = None, quantize: str | None = None, max_memory: int | str | None = None) -> dict:
    """``chatfactory eval``: every measurement asked for of ``run``'s ``stage`` (default: the last trained):
    loss and bits/byte on ``text`` files, accuracy on ``task`` files at ``shots``, win rate ``against`` another
    stage; printed, returned and written to ``json_path``. Both models load as ``load_model`` does with
    ``quantize`` / ``max_memory``."""
    from ..store.checkpoint import latest_stage, resolve_stage
    from ..store.files import atomic_write_text
    from ..store.load import load_model
    from ..text.tokenizer import Tokenizer
    from .fewshot import few_shot_table, format_table, load_task
    from .ifeval import format_ifeval, ifeval_path, run_ifeval
    from .lm import text_loss

    run = Path(run)

    def load(spec: str, what: str):
        return load_model(resolve_stage(run, spec, what), inference=True, quantize=quantize, max_memory=max_memory)[0]

    stage = stage or latest_stage(run)
    model = load(stage, "--stage")
    tok = Tokenizer.load(run / "tokenizer.json")
    chat = chat if chat is not None else Path(stage).name not in ("pretrain",)
    try:
        shots = tuple(int(s) for s in shots.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"--shots {shots!r}: expected comma-separated integers such as 0,1,5") from None
    if not (text or task or against):
        raise ValueError("nothing to evaluate: give --text, --task and/or --against (see --help)")
    res: dict = {"run": str(run), "stage": stage, "chat": chat}

    for path in text:
        r = text_loss(model, tok, path, max_tokens=max_tokens)
        res.setdefault("text", {})[path] = r
        print(f"{path}: loss {r['loss']:.4f} nats/token, {r['bpb']:.4f} bits/byte over {r['tokens']:,} tokens")

    for path in task:
        ifeval_file = ifeval_path(path)
        if ifeval_file is not None:
            r = run_ifeval(model, tok, ifeval_file, run / "eval" / Path(stage).name,
                           resolve_stage(run, stage, "--stage"), max_tokens=max_tokens or 512, limit=limit,
                           quantize=quantize)
            res["ifeval"] = r
            print(format_ifeval(r))
            continue
        table = few_shot_table(model, tok, load_task(path), shots, chat=chat, mode=mode, seed=seed, limit=limit)
        res.setdefault("tasks", {})[path] = {name: {str(k): v for k, v in t.items()} for name, t in table.items()}
        print(f"\n{path} ({'chat template' if chat else 'plain text'}, "
              f"{'exact match' if mode == 'gen' else 'log-likelihood'}, accuracy)")
        print(format_table(table))

    if against:
        from ..data.preferences import load_prompts
        from .winrate import load_judge, win_rate

        if not (prompts and judge):
            raise ValueError("--against needs --prompts (a prompts JSONL) and --judge "
                             "(reward model dir or module:function)")
        other = load(against, "--against")  # loaded the same way as the model it is compared with
        rows = load_prompts(prompts)[: limit or None]
        r = win_rate(model, other, tok, rows, load_judge(judge, tok), max_tokens=max_tokens or 64,
                     temperature=temperature, seed=seed)
        res["win_rate"] = {"against": against, "judge": judge, **r}
        print(f"\n{stage} vs {against} on {r['n']} prompts (judge {judge}): win rate {r['win_rate']:.3f} "
              f"({r['wins']} wins, {r['ties']} ties, {r['losses']} losses; "
              f"mean score {r['score_a']:.3f} vs {r['score_b']:.3f})")

    if json_path:
        atomic_write_text(json_path, json.dumps(res, indent=2))
        print(f"wrote {json_path}")
    return res
