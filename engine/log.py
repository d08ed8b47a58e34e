"""Run logging: metrics.jsonl, a tqdm progress bar, optional wandb, the loss plot.

`metrics.jsonl` holds one JSON object per line. Training rows have at least
`step, loss, lr, grad_norm, tokens_per_s, trained_tokens`; evaluation rows
carry `eval_loss` (and whatever else the evaluation measured). On resume, rows
past the resumed step are dropped first so the file reads as one clean run.

With several ranks only rank 0 logs: the others get a RunLog(enabled=False), which
opens no file, draws no bar and writes nothing.
"""
from __future__ import annotations

import json
import math
import os
import sys

from tqdm import tqdm

from engine.safeio import CorruptFile

from engine.writes import atomic_write, write_error


class RunLog:
    def __init__(self, run_dir: str, total_steps: int, start_step: int, progress_bar: bool,
                 wandb_cfg: dict | None = None, enabled: bool = True):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.enabled = enabled
        if not enabled:
            return
        _truncate_after(self.path, start_step)
        self.file = open(self.path, "a")
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not progress_bar,
                        file=sys.stderr, dynamic_ncols=True, desc="train")
        self.wandb = None
        if wandb_cfg is not None:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("logging.wandb: true needs the wandb package (pip install wandb)") from None
            self.wandb = wandb.init(project=wandb_cfg["project"], mode=wandb_cfg["mode"],
                                    dir=run_dir, config=wandb_cfg["config"], resume="allow",
                                    id=wandb_cfg.get("id"))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        try:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        except OSError as e:  # a full disk: say which file (a torn last row is dropped on resume)
            try:
                self.file.close()  # flushes once more, fails, closes: no second error at exit
            except OSError:
                pass
            self.enabled = False
            raise write_error(e, self.path) from None
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def advance(self, n: int, postfix: dict) -> None:
        if not self.enabled:
            return
        self.bar.update(n)
        self.bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in postfix.items()})

    def message(self, text: str) -> None:
        """Print above the progress bar without breaking it."""
        if not self.enabled:
            return
        self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: str) -> list[dict]:
    """The rows of metrics.jsonl.

    A torn last line (the run was killed while writing it) is dropped with a warning: it is
    the one row a kill can leave half-written, and resume rewrites the file past the resumed
    step anyway. A bad line before the last is damage, not a kill: CorruptFile naming it.
    """
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        lines = [(n, raw) for n, raw in enumerate(f.read().split(b"\n"), 1) if raw.strip()]
    rows = []
    for i, (n, raw) in enumerate(lines):
        try:
            row = json.loads(raw.decode("utf-8"))
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            if i == len(lines) - 1:
                print(f"warning: {path}:{n}: dropping a torn last line (an interrupted write)", file=sys.stderr)
                break
            raise CorruptFile(f"{path}:{n}: not a metrics row ({' '.join(str(e).split())[:80]}); "
                              f"fix or delete that line") from None
        rows.append(row)
    return rows


def _truncate_after(path: str, step: int) -> None:
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    with atomic_write(path) as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def plot_loss(metrics_path: str, png_path: str, title: str = "") -> None:
    """Training loss per step (and held-out loss where measured) as a PNG."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and math.isfinite(r["loss"])]
    held = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if held:
        ax.plot(*zip(*held), "o-", label="held-out loss", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / trained token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_write(png_path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
