"""Evaluation: loss and bits/byte (lm.py), the zero/one/few-shot table (fewshot.py), win rate (winrate.py);
for ``chatfactory run``, the held-out and dev evaluation of every policy (heldout.py) and the report
(report.py); ``chatfactory eval`` (cli.py) measures one checkpoint.

    from chatfactory.eval import few_shot_table, format_table, text_loss, win_rate
"""

from .fewshot import few_shot_table, format_table, load_task
from .lm import stream_loss, text_loss
from .winrate import load_judge, win_rate

__all__ = ["few_shot_table", "format_table", "load_task", "stream_loss", "text_loss", "load_judge", "win_rate"]
