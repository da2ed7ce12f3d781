"""The run report's PNG plots (eval/report.py): each trained stage's loss curves and each RL stage's reward, KL
and dev gold score over iterations, read from the stages' metrics.jsonl. matplotlib is imported when a plot
is drawn, with the Agg backend (no display)."""

from __future__ import annotations

from pathlib import Path

from ..train.meters import read_metrics


def plot_losses(run_dir: Path, stages: list[str]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    have = [(s, read_metrics(run_dir / s / "metrics.jsonl")) for s in stages]
    have = [(s, m) for s, m in have if any("loss" in r for r in m)]
    if not have:
        return None
    fig, axes = plt.subplots(1, len(have), figsize=(4 * len(have), 3.2), squeeze=False)
    for ax, (s, m) in zip(axes[0], have):
        tr = [(r["step"], r["loss"]) for r in m if "loss" in r]
        ax.plot(*zip(*tr), lw=1, label="train")
        va = [(r["step"], r["val_loss"]) for r in m if "val_loss" in r]
        if va:
            ax.plot(*zip(*va), "o-", label="validation")
        ax.set_title(s)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("loss")
    fig.tight_layout()
    fig.savefig(run_dir / "losses.png", dpi=90)
    plt.close(fig)
    return "losses.png"


def plot_rl(run_dir: Path, stage: str) -> str | None:
    """Reward, KL and gold score over RL iterations (the rows the RL stage logs at evaluations)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(run_dir / stage / "metrics.jsonl") if "iteration" in r]
    keys = [k for k in ("score", "reward", "kl", "gold") if any(k in r for r in rows)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.0), squeeze=False)
    titles = {"score": "reward-model score", "reward": "reward incl. KL penalty", "kl": "KL to SFT (nats/answer)",
              "gold": "gold (rubric) score, dev prompts"}
    for ax, k in zip(axes[0], keys):
        pts = [(r["iteration"], r[k]) for r in rows if k in r]
        ax.plot(*zip(*pts), "o-", ms=3)
        ax.set_title(titles[k], fontsize=9)
        ax.set_xlabel("iteration")
    fig.tight_layout()
    name = f"{stage}.png"
    fig.savefig(run_dir / name, dpi=90)
    plt.close(fig)
    return name
