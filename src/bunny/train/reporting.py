"""Where training metrics go: TensorBoard, Weights & Biases (when configured), a JSONL log
and a loss-curve PNG. Optional backends fail soft with a printed note, since metrics are
never a reason to lose a training run."""
from __future__ import annotations

import json
from pathlib import Path


class MetricSink:
    def __init__(self, output_dir: str | Path, tensorboard: bool, wandb_project: str, config: dict):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tb = None
        self.wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.dir / "tensorboard"))
            except ImportError:
                print("note: tensorboard is not installed; metrics go to metrics.jsonl only")
        if wandb_project:
            try:
                import wandb

                self.wandb = wandb.init(project=wandb_project, config=config)
            except ImportError:
                print("note: wandb is not installed; wandb_project ignored")
        self.log_file = open(self.dir / "metrics.jsonl", "a", encoding="utf-8")

    def log(self, step: int, metrics: dict) -> None:
        self.log_file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.log_file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"train/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        self.log_file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def plot_losses(curves: dict[str, list[tuple[int, float]]], path: str | Path, title: str = "training loss") -> Path:
    """One line per curve name (e.g. stage 1 and stage 2), written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
    for ax, (name, points) in zip(axes[0], curves.items()):
        steps = [s for s, _ in points]
        losses = [v for _, v in points]
        ax.plot(steps, losses, lw=1, alpha=0.5, label="per step")
        if len(losses) >= 10:  # a moving average shows the trend through the noise
            k = max(5, len(losses) // 20)
            avg = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
                   for i in range(len(losses))]
            ax.plot(steps, avg, lw=2, label=f"mean of {k}")
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
