"""The user_feeds asset reports one user's feed and the stage timings as markdown."""

from __future__ import annotations

import dagster as dg
from dagster_helpers import materialize

from feed_dagster.pipeline import DEFAULT_SPEC
from feed_dagster.pipeline.stages import label


def test_user_feeds_metadata_holds_preview_and_stage_timings(data_dir) -> None:
    materialize(dg.AssetSelection.groups("raw", "social_graph"), raise_on_error=True)
    result = materialize(dg.AssetSelection.assets("user_feeds"), "0", raise_on_error=True)
    (event,) = result.asset_materializations_for_node("user_feeds")
    meta = event.metadata
    preview, timings = meta["feed_preview"], meta["stage_timings"]
    assert isinstance(preview, dg.MarkdownMetadataValue)
    assert isinstance(timings, dg.MarkdownMetadataValue)
    lines = preview.md_str.splitlines()
    assert lines[0].startswith("Feed of user ")
    assert lines[2] == "| position | post | author | source | score | reason |"
    assert lines[4].startswith("| 1 | #") and len(lines) == 4 + 10
    stages = [label("query_hydrator", DEFAULT_SPEC.query_hydrator)]
    stages += [label(kind, stage) for kind, stage in DEFAULT_SPEC.stages()]
    rows = [line.split(" | ")[0].removeprefix("| ") for line in timings.md_str.splitlines()[2:]]
    assert rows == [*stages, "**total**"]
