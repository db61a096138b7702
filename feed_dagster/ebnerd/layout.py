"""The exact Arrow layout of the EBNeRD files (Ekstra Bladet News Recommendation Dataset).

Types follow the files the dataset ships. The list columns of behaviours and history are
`large_list` there (the files are written by polars), so the writer here uses `large_list`
for every list column. Readers accept the small and large storage variants of the same
logical type (list/large_list, string/large_string) because files re-saved by pandas or
plain pyarrow use the small ones; anything else (another integer width, another time unit)
is a different type and is rejected.
"""

from __future__ import annotations

import pyarrow as pa

TS = pa.timestamp("us")

ARTICLES_FILE = "articles.parquet"
BEHAVIORS_FILE = "behaviors.parquet"
HISTORY_FILE = "history.parquet"
# Splits of the official layout. `test` has no labels (no clicked lists), so it is never used
# for training or evaluation.
LABELLED_SPLITS: tuple[str, ...] = ("train", "validation")
TEST_SPLIT = "test"

ARTICLES_SCHEMA = pa.schema(
    [
        ("article_id", pa.int32()),
        ("title", pa.string()),
        ("subtitle", pa.string()),
        ("last_modified_time", TS),
        ("premium", pa.bool_()),
        ("body", pa.string()),
        ("published_time", TS),
        ("image_ids", pa.large_list(pa.int64())),  # null when the article has no image
        ("article_type", pa.string()),
        ("url", pa.string()),
        ("ner_clusters", pa.large_list(pa.string())),
        ("entity_groups", pa.large_list(pa.string())),
        ("topics", pa.large_list(pa.string())),  # empty list, never null, when absent
        ("category", pa.int16()),
        ("subcategory", pa.large_list(pa.int16())),
        ("category_str", pa.string()),
        ("total_inviews", pa.int32()),
        ("total_pageviews", pa.int32()),
        ("total_read_time", pa.float32()),
        ("sentiment_score", pa.float32()),
        ("sentiment_label", pa.string()),
    ]
)

BEHAVIORS_SCHEMA = pa.schema(
    [
        ("impression_id", pa.uint32()),
        ("article_id", pa.int32()),  # the page the slate was shown on; null = front page
        ("impression_time", TS),
        ("read_time", pa.float32()),
        ("scroll_percentage", pa.float32()),
        ("device_type", pa.int8()),
        ("article_ids_inview", pa.large_list(pa.int32())),
        ("article_ids_clicked", pa.large_list(pa.int32())),
        ("user_id", pa.uint32()),
        ("is_sso_user", pa.bool_()),
        ("gender", pa.int8()),
        ("postcode", pa.int8()),
        ("age", pa.int8()),
        ("is_subscriber", pa.bool_()),
        ("session_id", pa.uint32()),
        ("next_read_time", pa.float32()),
        ("next_scroll_percentage", pa.float32()),
    ]
)

# The test split hides what happened: no page id, no clicks, nothing about the next page.
_TEST_DROPPED = {"article_id", "article_ids_clicked", "next_read_time", "next_scroll_percentage"}
TEST_BEHAVIORS_SCHEMA = pa.schema(
    [f for f in BEHAVIORS_SCHEMA if f.name not in _TEST_DROPPED]
    + [pa.field("is_beyond_accuracy", pa.bool_())]
)

HISTORY_SCHEMA = pa.schema(
    [
        ("user_id", pa.uint32()),
        ("impression_time_fixed", pa.large_list(TS)),  # ascending
        ("scroll_percentage_fixed", pa.large_list(pa.float32())),
        ("article_id_fixed", pa.large_list(pa.int32())),
        ("read_time_fixed", pa.large_list(pa.float32())),
    ]
)
HISTORY_LIST_COLUMNS: tuple[str, ...] = (
    "impression_time_fixed",
    "scroll_percentage_fixed",
    "article_id_fixed",
    "read_time_fixed",
)

# Columns that describe what happened after an impression (aggregates over the whole data
# period, or the page the user went to next). They must never reach the canonical tables,
# or a model would be trained and scored on the future.
FUTURE_COLUMNS: dict[str, tuple[str, ...]] = {
    ARTICLES_FILE: ("total_inviews", "total_pageviews", "total_read_time"),
    BEHAVIORS_FILE: ("next_read_time", "next_scroll_percentage"),
}


def _normalise(dtype: pa.DataType) -> pa.DataType:
    """Map storage variants of one logical type onto a single representative."""
    if pa.types.is_large_list(dtype) or pa.types.is_list(dtype):
        return pa.large_list(_normalise(dtype.value_type))
    if pa.types.is_large_string(dtype) or pa.types.is_string(dtype):
        return pa.large_string()
    return dtype


def same_logical_type(found: pa.DataType, expected: pa.DataType) -> bool:
    """True when `found` is `expected` up to list/large_list and string/large_string."""
    return _normalise(found) == _normalise(expected)
