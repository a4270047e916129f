"""One PNG per run: training loss, validation loss and the metric against the optimizer step."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def plot_run(output_dir: str | Path, metric: str) -> Path:
    """Read <output_dir>/log.jsonl and write <output_dir>/curves.png."""
    output_dir = Path(output_dir)
    records = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    fig, loss_ax = plt.subplots(figsize=(7, 4))
    loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", lw=1)
    if evals:
        loss_ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation loss")
        metric_ax = loss_ax.twinx()
        metric_ax.plot([r["step"] for r in evals], [r[metric] for r in evals], "s--", color="tab:green", label=metric)
        metric_ax.set_ylabel(metric)
        metric_ax.legend(loc="upper right")
    loss_ax.set_xlabel("optimizer step")
    loss_ax.set_ylabel("loss per answer token")
    loss_ax.legend(loc="upper left")
    loss_ax.set_title(output_dir.name)
    fig.tight_layout()
    out = output_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
