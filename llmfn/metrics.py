"""What a run records: metrics.jsonl (always), TensorBoard (optional), a loss-curve PNG."""

import json
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


class MetricsLog:
    """Appends one JSON object per record to run_dir/metrics.jsonl, and to TensorBoard if asked.

    Appending means a resumed run continues the same file. Each record holds `step` and
    whatever scalars were measured then (e.g. `loss` on a log, `val_loss` on an eval).
    """

    def __init__(self, run_dir, tensorboard: bool = False):
        self.path = Path(run_dir) / METRICS_FILE
        self.file = self.path.open("a")
        self.tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter  # optional dependency: pip install "llmfn[tensorboard]"

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, step: int, **scalars: float) -> None:
        """Records `scalars` at `step`."""
        self.file.write(json.dumps({"step": step, **scalars}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for name, value in scalars.items():
                self.tb.add_scalar(name, value, step)

    def close(self) -> None:
        """Flushes and closes the files."""
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir) -> list[dict]:
    """All records of run_dir/metrics.jsonl, oldest first; a resumed run's repeats keep the last."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    by_key = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        by_key[(record["step"], tuple(sorted(record)))] = record
    return sorted(by_key.values(), key=lambda r: r["step"])


def plot_losses(run_dir, bound_bpb: float | None = None) -> Path:
    """Draws training loss and validation loss (nats/token) against step into run_dir/loss.png.

    With `bound_bpb` (the corpus's entropy rate), a second panel shows validation bits per
    byte against it.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if "grad_norm" in r]  # the log records
    val = [(r["step"], r["val_loss"], r["val_bpb"]) for r in records if "val_loss" in r]
    panels = 2 if bound_bpb is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    ax = axes[0, 0]
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot([v[0] for v in val], [v[1] for v in val], "o-", label="validation loss")
    ax.set(xlabel="step", ylabel="nats / token", title="cross-entropy")
    ax.legend()
    if bound_bpb is not None:
        ax = axes[0, 1]
        ax.plot([v[0] for v in val], [v[2] for v in val], "o-", label="validation")
        ax.axhline(bound_bpb, color="k", linestyle="--", label=f"entropy rate {bound_bpb:.3f}")
        ax.set(xlabel="step", ylabel="bits / byte", title="validation bits per byte")
        ax.legend()
    fig.tight_layout()
    out = Path(run_dir) / PLOT_FILE
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
