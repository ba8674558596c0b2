"""Training curves: `<out_dir>/training.png` drawn from metrics.jsonl, and optional TensorBoard event files.

Every trainer's loop (train.run_loop) calls `TrainingCurves.record` for each line it logs and `draw` at each
evaluation and on exit, so the picture is never more than one evaluation behind and a run cut short keeps one.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Dict, List

from .errors import DifflmError
from .files import atomic_write_bytes

PNG = "training.png"
TENSORBOARD = "tensorboard"
NOT_CURVES = {"step", "elapsed_s"}


def read_metrics(path: Path) -> List[dict]:
    """The JSON lines of a metrics file (an unfinished last line is skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _series(rows: List[dict], key: str):
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_training(rows: List[dict], title: str = "") -> bytes:
    """PNG bytes: the training loss and its parts, the held-out figures (raw and EMA), the learning rate and the
    gradient norm, each against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in NOT_CURVES]
    dev = [k for k in keys if k.startswith("dev_")]
    train = [k for k in keys if k not in dev and k not in ("lr", "grad_norm")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5))
    panels = [(axes[0, 0], train, "training loss and its parts", True),
              (axes[0, 1], dev, "held out", True),
              (axes[1, 0], ["lr"], "learning rate", False),
              (axes[1, 1], ["grad_norm"], "gradient norm (before clipping)", True)]
    for ax, names, label, log in panels:
        drawn = False
        for name in names:
            x, y = _series(rows, name)
            if not x:
                continue
            ax.plot(x, y, marker="." if len(x) < 30 else None, label=name)
            drawn = True
        values = [v for n in names for v in _series(rows, n)[1]]
        if log and drawn and min(values) > 0 and max(values) > 20 * min(values):  # log where it spans decades
            ax.set_yscale("log")
        ax.set(xlabel="step", title=label)
        if drawn and len(names) > 1:
            ax.legend(fontsize=8)
        if not drawn:
            ax.text(0.5, 0.5, "nothing logged yet", ha="center", va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def require_tensorboard(loop, section: str) -> None:
    """A one-line error, before a run writes anything, where `<section>.tensorboard` is on without the package."""
    import importlib.util

    if getattr(loop, "tensorboard", False) and importlib.util.find_spec("tensorboard") is None:
        raise DifflmError(f"{section}.tensorboard=true needs the tensorboard package: pip install "
                          f"'difflm[tensorboard]' (or set {section}.tensorboard=false)")


class TrainingCurves:
    """The curves of one run in `out_dir`: training.png redrawn from `metrics_path` on `draw`, and (with
    `tensorboard`) every logged number written as a TensorBoard scalar under `<out_dir>/tensorboard`."""

    def __init__(self, out_dir: Path, metrics_path: Path, tensorboard: bool = False, title: str = ""):
        self.out_dir, self.metrics_path, self.title = Path(out_dir), Path(metrics_path), title
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # require_tensorboard has checked it is there

            self.writer = SummaryWriter(str(self.out_dir / TENSORBOARD))

    def record(self, values: Dict[str, float]) -> None:
        if self.writer is None:
            return
        step = values["step"]
        for k, v in values.items():
            if k not in NOT_CURVES and isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def draw(self) -> None:
        if self.metrics_path.is_file():
            atomic_write_bytes(self.out_dir / PNG, plot_training(read_metrics(self.metrics_path), self.title))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
