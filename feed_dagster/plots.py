"""Small PNG plots for Dagster metadata (returned as markdown image tags)."""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def png_bytes_markdown(png: bytes, alt: str) -> str:
    """PNG bytes as a markdown image tag (a data URI: Dagster metadata holds no files)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def png_markdown(fig: plt.Figure, alt: str) -> str:
    """A figure as a markdown image tag; closes the figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return png_bytes_markdown(buf.getvalue(), alt)


def degree_ccdf(series: dict[str, np.ndarray], title: str) -> str:
    """Log-log complementary CDF of one or more degree distributions."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, degrees in series.items():
        d = np.sort(np.asarray(degrees)[np.asarray(degrees) > 0])
        if len(d) == 0:
            continue
        ccdf = 1.0 - np.arange(len(d)) / len(d)
        ax.loglog(d, ccdf, marker=".", linestyle="none", markersize=2, label=label)
    ax.set_xlabel("in-degree (followers)")
    ax.set_ylabel("P(X >= x)")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    return png_markdown(fig, title)


def markdown_table(df, float_digits: int = 4) -> str:
    """A polars frame as a markdown table for Dagster metadata."""
    cols = df.columns
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.iter_rows():
        cells = [f"{v:.{float_digits}f}" if isinstance(v, float) else str(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def metric_bars(df, label_col: str, metrics: list[str], title: str) -> str:
    """Grouped bar chart of metric columns per row label (e.g. AUC per method)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = df[label_col].to_list()
    width = 0.8 / len(metrics)
    x = np.arange(len(labels))
    for i, m in enumerate(metrics):
        ax.bar(x + i * width, df[m].to_numpy(), width, label=m)
    ax.set_xticks(x + width * (len(metrics) - 1) / 2, labels, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=7)
    return png_markdown(fig, title)
