"""What every recipe writes: ``summary.json`` (``{"recipe": NAME, "metrics": {...}}``) and
``curves.png`` (the curves a user looks at: losses, rewards, KL)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def write_summary(
    output_dir: str | Path, recipe: str, metrics: dict[str, float], info: dict[str, Any] | None = None
) -> Path:
    """Write and print ``summary.json``; non-finite metrics are kept (as null) so they are seen;
    booleans (a goal met or not) stay booleans."""
    clean = {
        k: v if isinstance(v, bool) else float(v) if v is not None and math.isfinite(float(v)) else None
        for k, v in metrics.items()
    }
    summary = {"recipe": recipe, "metrics": clean, **({"info": info} if info else {})}
    path = Path(output_dir) / "summary.json"
    path.write_text(json.dumps(summary, indent=2))
    print(f"[{recipe}] summary ({path}):")
    for key, value in clean.items():
        print(f"  {key:>24}: {value if value is None or isinstance(value, bool) else round(value, 4)}")
    return path


def plot_curves(output_dir: str | Path, panels: dict[str, tuple[list[dict[str, float]], list[str]]]) -> Path:
    """``panels``: title -> (a trainer's ``log_history``, keys to plot against ``step``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for ax, (title, (logs, keys)) in zip(axes[0], panels.items()):
        for key in keys:
            points = [(log["step"], log[key]) for log in logs if key in log and "step" in log]
            if points:
                ax.plot(*zip(*points), label=key, marker="." if len(points) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(output_dir) / "curves.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
