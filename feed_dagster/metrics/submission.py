"""The EBNeRD challenge submission format.

`predictions.txt` has one line per impression, `impression_id [r1,r2,...]`, where r_i is the
rank (1 = best) given to the i-th article of the impression's inview list. The file is
shipped zipped as `predictions.zip`.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import polars as pl

from feed_dagster.atomic import atomic_path, write_text_atomic

PREDICTIONS_TXT = "predictions.txt"


def submission_ranks(
    scored: pl.DataFrame,
    score_col: str = "score",
    group_col: str = "impression_id",
    position_col: str = "position",
) -> pl.DataFrame:
    """One row per impression: impression_id and the ranks list in inview (position) order.

    Equal scores are ranked by inview position so the output is deterministic.
    """
    missing = [c for c in (score_col, group_col, position_col) if c not in scored.columns]
    if missing:
        raise ValueError(f"submission: columns {missing} not in frame {scored.columns}")
    return (
        scored.select(group_col, position_col, score_col)
        .sort(group_col, pl.col(score_col), position_col, descending=[False, True, False])
        .with_columns(rank=pl.int_range(1, pl.len() + 1).over(group_col))
        .sort(group_col, position_col)
        .group_by(group_col, maintain_order=True)
        .agg(pl.col("rank").alias("ranks"))
    )


def write_submission(
    scored: pl.DataFrame,
    out_dir: str | Path,
    score_col: str = "score",
    group_col: str = "impression_id",
    position_col: str = "position",
) -> Path:
    """Write `predictions.txt` and `predictions.zip` into out_dir; returns the zip path."""
    ranks = submission_ranks(scored, score_col, group_col, position_col)
    lines = ranks.select(
        pl.format(
            "{} [{}]",
            pl.col(group_col),
            pl.col("ranks").cast(pl.List(pl.String)).list.join(","),
        )
    ).to_series()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    txt = write_text_atomic(
        out / PREDICTIONS_TXT, "\n".join(lines.to_list()) + ("\n" if len(lines) else "")
    )
    zpath = out / "predictions.zip"
    with (
        atomic_path(zpath) as ztmp,
        zipfile.ZipFile(ztmp, "w", compression=zipfile.ZIP_DEFLATED) as zf,
    ):
        zf.write(txt, arcname=PREDICTIONS_TXT)
    return zpath


def read_submission(path: str | Path) -> pl.DataFrame:
    """Parse predictions.txt or predictions.zip into impression_id, ranks (list of ints)."""
    p = Path(path)
    if zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as zf:
            text = zf.read(PREDICTIONS_TXT).decode()
    else:
        text = p.read_text()
    lines = pl.Series("line", [ln for ln in text.splitlines() if ln.strip()], dtype=pl.String)
    parts = lines.str.split_exact(" ", 1).struct.rename_fields(["id", "ranks"])
    return pl.DataFrame(parts.struct.unnest()).select(
        pl.col("id").cast(pl.Int64).alias("impression_id"),
        pl.col("ranks").str.strip_chars("[]").str.split(",").cast(pl.List(pl.Int64)).alias("ranks"),
    )
