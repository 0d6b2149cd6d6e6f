"""Metrics as JSON lines (one record per logged step or evaluation) and a PNG plot of them."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """Appends records to ``path``; on resume, records past the resumed step are dropped first."""

    def __init__(self, path: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [r for r in read(self.path) if r["step"] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, **record) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot(metrics_path: str | Path, png_path: str | Path) -> Path:
    """Training loss and validation accuracy against steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read(metrics_path)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_acc" in r]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train])
    ax_loss.set(xlabel="step", ylabel="training loss", title="loss")
    ax_acc.plot([r["step"] for r in val], [100 * r["val_acc"] for r in val], marker="o")
    ax_acc.set(xlabel="step", ylabel="validation accuracy (%)", title="accuracy")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return Path(png_path)
