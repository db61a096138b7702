"""Small PNG plots for Dagster metadata (returned as markdown image tags)."""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def png_markdown(fig: plt.Figure, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return f"![{alt}](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})"


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
    ax.legend()
    return png_markdown(fig, title)
