"""What a run measured: `metrics.jsonl` (one record per log step and per evaluation),
`loss.png` (train and validation curves, redrawn at each evaluation) and, when asked for and
installed, TensorBoard scalars.

Records are appended one whole line at a time, so a killed run leaves at worst one partial last
line, which `read_metrics` skips; a resumed run drops the records after its checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from llmcli.console import warn
from llmcli.constants import RUN_TENSORBOARD
from llmcli.files import append_line, atomic_path, write_text


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").split("\n"):  # JSON Lines end at \n only
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


class Metrics:
    """Writes the run directory's metrics; a no-op object on ranks other than 0."""

    def __init__(self, run_dir: Path, enabled: bool = True, tracker: str = "none") -> None:
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self.plot_path = run_dir / "loss.png"
        self.enabled = enabled
        self.tracker = tracker
        self.records: list[dict[str, Any]] = []
        self.writer = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)

    def start(self, step: int) -> None:
        """Continue the file of a resumed run (dropping records after `step`) or start afresh;
        TensorBoard is told to drop its events after `step` too (a branch from an older one)."""
        if not self.enabled:
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step] if step else []
        self.records = kept
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        if self.tracker == "tensorboard" and self.writer is None:
            self.writer = _tensorboard(self.run_dir / RUN_TENSORBOARD,
                                       purge_step=step + 1 if step else None)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {k: _clean(v) for k, v in record.items()}
        self.records.append(record)
        append_line(self.path, json.dumps(record))
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("step", "kind") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{record.get('kind', 'train')}/{key}", value,
                                           record["step"])
            self.writer.flush()

    def plot(self) -> None:
        if self.enabled:
            plot_losses(self.records, self.plot_path)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def plot_losses(records: list[dict[str, Any]], target: Path) -> None:
    """Training loss per log step and both evaluated losses, as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    train = [(r["step"], r["train_loss"]) for r in records
             if r.get("kind") == "train" and r.get("train_loss") is not None]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig = Figure(figsize=(7, 4.2), dpi=100)
    ax = fig.add_subplot()
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], color="tab:blue", alpha=0.35,
                linewidth=1, label="train (step)")
    if evals:
        steps = [r["step"] for r in evals]
        ax.plot(steps, [r.get("train") for r in evals], color="tab:blue", marker=".",
                label="train (eval)")
        ax.plot(steps, [r.get("val") for r in evals], color="tab:orange", marker=".",
                label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend()
    fig.tight_layout()
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png")


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


def _tensorboard(log_dir: Path, purge_step: int | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warn("train.tracker=tensorboard but the tensorboard package is not installed "
             "(pip install tensorboard); logging to metrics.jsonl only")
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
