"""A generation of feeds: every shard file published together as the serving file, once
the publish guard has accepted them.

It sits above both `feeds` (shard files and their recorded versions) and `serving` (the
guard and the publish), which know nothing of each other."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from feed_dagster.artifacts import Location
from feed_dagster.data.warehouse import read_tables
from feed_dagster.feeds.shard_files import local_shards, missing_shards, read_versions, shard_path
from feed_dagster.serving.bucket import BucketGeneration, upload_generation
from feed_dagster.serving.guard import GuardConfig, GuardDecision, check_publish
from feed_dagster.serving.publish import PublishResult, publish_feeds


@dataclass(frozen=True)
class GenerationOutcome:
    """The guard's decision and, when it passed, what was published (None: refused, the
    live serving file is unchanged)."""

    decision: GuardDecision
    published: PublishResult | None
    # What the bucket's pointer names after the publish (None: no bucket, or refused).
    on_bucket: BucketGeneration | None = None


def publish_generation(
    shard_dir: Location,
    keys: Sequence[str],
    serving_path: Path,
    warehouse_path: Location,
    guard: GuardConfig,
    serving_bucket: Location | None = None,
) -> GenerationOutcome:
    """Publish the shard files of `keys` under `shard_dir` (a local directory or a bucket
    prefix) into `serving_path`, swapped in atomically, if the guard accepts them against
    the warehouse's active users and the live generation; with `serving_bucket`, the new
    generation then also becomes the bucket's current one (serving/bucket.py). Raises
    FileNotFoundError, before anything else, when a shard file is missing."""
    missing = missing_shards(shard_dir, keys)
    if missing:
        raise FileNotFoundError(
            f"cannot publish: shard files {missing} are missing under {shard_dir}; "
            "materialise every user_feeds partition first"
        )
    # DuckDB builds the serving file from local files: shards in a bucket are copied beside
    # it first (a local directory is read in place).
    with local_shards(shard_dir, keys, serving_path) as local_dir:
        outcome = _publish_local(local_dir, keys, serving_path, warehouse_path, guard)
    if outcome.published is None or serving_bucket is None:
        return outcome
    # After the local swap: an upload that fails fails the publish (retried as a whole, a
    # new generation), and the bucket's pointer keeps naming the previous generation.
    on_bucket = upload_generation(
        outcome.published.path, outcome.published.generation_id, serving_bucket
    )
    return GenerationOutcome(outcome.decision, outcome.published, on_bucket)


def _publish_local(
    shard_dir: Path,
    keys: Sequence[str],
    serving_path: Path,
    warehouse_path: Location,
    guard: GuardConfig,
) -> GenerationOutcome:
    paths = [shard_path(shard_dir, k) for k in keys]
    decision = check_publish(paths, serving_path, warehouse_path, guard)
    if not decision.passed:
        return GenerationOutcome(decision, None)
    tables = read_tables(warehouse_path, ["articles", "users"])
    versions = [read_versions(shard_dir, k) for k in keys]
    # Shards built with different models (a promotion between shard runs) are published
    # together but say so: both versions are recorded.
    model_version = ";".join(sorted({v["model_version"] for v in versions}))
    vector_version = ";".join(sorted({v["vector_table_version"] for v in versions}))
    published = publish_feeds(
        [str(p) for p in paths],
        serving_path,
        model_version=model_version,
        vector_table_version=vector_version,
        generated_at=datetime.now(UTC).replace(tzinfo=None),
        articles=tables["articles"],
        users=tables["users"],
    )
    return GenerationOutcome(decision, published)
