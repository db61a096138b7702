"""Read, validate and map an EBNeRD folder (or zip) into the canonical `World`.

Three steps, one module each: `archive.py` (the folder or zip and its shape),
`validation.py` (schemas and values), `mapping.py` (canonical tables).

Supported shapes
----------------
* official: `articles.parquet`, `train/` and `validation/` (each with `behaviors.parquet`
  and `history.parquet`), optionally `test/` and artifact folders `<name>/<name>.parquet`.
  Validation impressions are the held-out period. `test/` is listed but never read: it has
  no clicked lists, so it can neither train nor evaluate anything.
* flat: `articles.parquet`, `behaviors.parquet`, `history.parquet` in one folder (the shape
  of the real sample). The held-out period is then cut by time: an impression is held out
  when its `impression_time >= t_min + (1 - heldout_fraction) * (t_max - t_min)` over the
  behaviour file, i.e. it lies in the last `heldout_fraction` (default 20%) of the
  behaviour time span.
* either of the above packed in a zip; `__MACOSX/` and `._*` entries are ignored and the
  folder holding the shallowest `articles.parquet` is the root.

Validation
----------
Every file is checked against `layout.py` (missing file, missing column, wrong type), then
its values: null ids, duplicate impression ids (within and across splits), duplicate
article or history user ids, empty inview lists, clicked articles not in the inview list,
history lists of unequal length, history times not ascending, history not strictly before
the first impression of its split, and article ids (inview, clicked, history) missing from
`articles.parquet`. Value domains: read times, counts, ids and codes >= 0, scroll
percentages in 0-100, sentiment in 0-1, age in 0-120, every timestamp inside the
plausible window of `feed_dagster.data.validate`; articles, behaviours and history must
each hold at least one row. A file that is not readable Parquet, a zip that is not a
readable archive, or a zip member that fails to inflate is named as such. Any failure
raises one `DataValidationError` naming file and column.

Mapping to canonical tables
---------------------------
* users: every user id in history or behaviours; `created_at` = first time seen.
* articles: `published_at = published_time`, topic = `category` (`topic_name` =
  `category_str`), text = subtitle + " " + body, no author (news has none), kind original.
* engagements: every history read (no impression id, dwell = `read_time_fixed`) and every
  behaviour click (its impression id, `engaged_at = impression_time`, dwell = the
  behaviour's `read_time`). The official validation history repeats train-period reads,
  so history reads are deduplicated on (user, article, time), and a history read that
  coincides exactly with a behaviour click of the same user and article is kept only as
  the click.
* impressions: one row per inview article, position = index in the inview list.
* topic_follows: derived from history reads only (all of which precede every behaviour of
  their split, hence the held-out period): a user follows a category when it makes up at
  least `topic_follow_min_share` (default 15%) of the user's history reads and at least
  `topic_follow_min_reads` (default 3) reads.
* follows, blocks, mutes, muted_keywords, impression_truth: empty.
* window_start = earliest history or behaviour time, heldout_start = first held-out
  impression time, now = latest impression time; the candidate window from the ages at
  which articles were shown (`derive_candidate_window`).

Columns that describe the future (`layout.FUTURE_COLUMNS`: article totals over the whole
period, the next page's read time and scroll) are validated but never mapped.
"""

from __future__ import annotations

from pathlib import Path

from feed_dagster.data.schema import World
from feed_dagster.ebnerd.mapping import to_world
from feed_dagster.ebnerd.validation import read_ebnerd


def load_ebnerd(
    path: str | Path,
    *,
    heldout_fraction: float = 0.2,
    topic_follow_min_share: float = 0.15,
    topic_follow_min_reads: int = 3,
) -> World:
    """Read, validate and map an EBNeRD folder or zip into the canonical `World`.

    `heldout_fraction` only applies to the flat shape (see the module doc).
    """
    frames = read_ebnerd(path, heldout_fraction=heldout_fraction)
    return to_world(
        frames,
        topic_follow_min_share=topic_follow_min_share,
        topic_follow_min_reads=topic_follow_min_reads,
    )
