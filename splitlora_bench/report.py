"""Results on disk: JSON (everything), a Markdown table (the headline numbers) and PNG plots."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Sequence

import torch


def environment() -> dict[str, Any]:
    """Where the numbers were measured."""
    return {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "n/a"
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table with the keys of the first row as columns."""
    if not rows:
        return "(no rows)\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write(out: Path, name: str, title: str, result: dict[str, Any], rows: Sequence[dict[str, Any]],
          notes: Sequence[str] = (), plots: Sequence[Path] = (),
          tables: Sequence[tuple[str, Sequence[dict[str, Any]]]] = ()) -> Path:
    """Write OUT/NAME.json and OUT/NAME.md (the main table, then `tables` with their captions); return the
    Markdown path."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "environment": environment(), **result, "table": list(rows)}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2, default=float) + "\n")
    md = [f"## {title}\n", markdown_table(rows)]
    for caption, extra in tables:
        md += [caption + "\n", markdown_table(extra)]
    md += [f"- {n}" for n in notes]
    md += [f"\n![{p.stem}]({p.name})" for p in plots]
    path = out / f"{name}.md"
    path.write_text("\n".join(md) + "\n")
    return path


def plot(path: Path, series: dict[str, tuple[Sequence[float], Sequence[float]]], xlabel: str, ylabel: str,
         title: str, logy: bool = False, kind: str = "line") -> Path | None:
    """A small PNG of one or more series; None (and no file) without matplotlib (`pip install .[bench]`)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=90)
    for i, (label, (xs, ys)) in enumerate(series.items()):
        if kind == "bar":
            width = 0.8 / max(len(series), 1)
            ax.bar([x + (i - (len(series) - 1) / 2) * width for x in range(len(xs))], ys, width, label=label)
            ax.set_xticks(range(len(xs)), [str(x) for x in xs])
        else:
            ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
