"""One PNG per run: the loss (GRPO: the reward) and the metric against the optimizer step.

Two panels, so neither scale hides the other: the loss on a log axis (on a linear one,
everything after the first few dozen steps is a flat line; GRPO's reward, which can be
negative, on a linear one), and the metric on its fixed range
(0-1 for most), starting with the evaluation before training at step 0, so that a small change
does not look like a leap.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from minivlm.checkpoint import write_atomic  # noqa: E402

# The metrics whose scores do not lie in [0, 1]: CIDEr-D is 10 × a cosine, CLIPScore 2.5 × one.
METRIC_MAX = {"cider_d": 10.0, "clip_score": 2.5}


def plot_run(output_dir: str | Path, metric: str, title: str = "", curve: tuple[str, str] = ("loss", "val_loss"),
             shares: tuple[str, ...] = ()) -> Path:
    """Read <output_dir>/log.jsonl and write <output_dir>/curves.png. `curve`: the objective's CURVE,
    the step log's figure of the left panel and its held-out counterpart; `shares`: its SHARES, step
    log figures in [0, 1] that a third panel shows (GRPO: groups without spread, clipped tokens,
    sampling's share of the step)."""
    output_dir = Path(output_dir)
    records = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    trained, held_out = curve
    evals = [r for r in records if held_out in r or metric in r]
    fig, (loss_ax, metric_ax, *share_ax) = plt.subplots(1, 3 if shares else 2, figsize=(16 if shares else 11, 4.2))

    loss_ax.plot([r["step"] for r in train], [r[trained] for r in train], lw=0.8, alpha=0.8, label="train")
    val = [r for r in evals if held_out in r]
    if val:
        loss_ax.plot([r["step"] for r in val], [r[held_out] for r in val], "o-", label="validation")
    loss_ax.set_xlabel("optimizer step")
    if trained == "loss":
        loss_ax.set_yscale("log")
        per = "pair" if train and "pairs" in train[0] else "answer token"  # DPO logs pairs (objectives/dpo.py)
        loss_ax.set_ylabel(f"loss per {per} (log scale)")
    else:  # GRPO: the sampled completions' mean reward, and the greedy answers' held out
        loss_ax.set_ylabel(f"mean {trained} (train: sampled; validation: greedy)")
    loss_ax.grid(alpha=0.3, which="both")
    loss_ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)

    scored = [r for r in evals if metric in r]
    top = METRIC_MAX.get(metric, 1.0)
    if scored:
        steps, values = [r["step"] for r in scored], [r[metric] for r in scored]
        metric_ax.plot(steps, values, "s-", color="tab:green", label=f"{metric} on the eval split")
        for s, v in zip(steps, values):
            metric_ax.annotate(f"{v:.2f}", (s, v), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
        metric_ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    else:
        metric_ax.text(0.5, 0.5, "not evaluated during training\n(train.eval_every = 0)", ha="center",
                       va="center", transform=metric_ax.transAxes, color="gray")
    metric_ax.set_ylim(0, top * 1.08)  # headroom for the labels above a perfect score
    metric_ax.set_xlim(left=0, right=max([r["step"] for r in train + evals], default=1) * 1.03)
    metric_ax.set_xlabel("optimizer step (0 = before training)")
    metric_ax.set_ylabel(metric)
    metric_ax.grid(alpha=0.3)

    for ax in share_ax:
        for key in shares:
            ax.plot([r["step"] for r in train if key in r], [r[key] for r in train if key in r], lw=0.8,
                    label=key.replace("_", " "))
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("share")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)

    fig.suptitle(title or output_dir.name)
    fig.tight_layout()
    out, png = output_dir / "curves.png", io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    write_atomic(out, png.getvalue())  # a crash while writing leaves the old picture, never a cut one
    return out
