"""What a run records: one JSON object per optimizer step in `metrics.jsonl`, and the loss curve in `loss.png`."""

from __future__ import annotations

import json
import os
from pathlib import Path


class MetricsLog:
    """Appends to OUTPUT/metrics.jsonl; on resume, lines past the resumed step are dropped first, so the file
    reads as one uninterrupted run."""

    def __init__(self, output: str | os.PathLike, *, resume_step: int = 0):
        self.path = Path(output) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [row for row in self.read() if row.get("step", 0) <= resume_step] if resume_step else []
        self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def plot_loss(rows: list[dict], path: str | os.PathLike) -> bool:
    """Draw training (and eval) loss against the step into `path`; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], label="train loss", linewidth=1.2)
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per label token)")
    ax.set_yscale("log" if rows and min(r["loss"] for r in rows) > 0 else "linear")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
