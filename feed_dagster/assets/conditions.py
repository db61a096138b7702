"""When the automation sensor publishes: the declarative condition of `published_feeds`.

The refresh chain, evaluated by the `keep_feeds_fresh` sensor (feed_dagster/jobs/automation.py):

    incoming batch -> ingest_incoming                 sensor: it watches files, not assets
      -> article_embeddings, article_vectors          eager(): an input was updated
      -> user_feeds, every shard                      eager(): an input was updated
      -> published_feeds                              every shard fresh again (below)

A tick that asks for more than one shard becomes one backfill, which runs what it asks for in
dependency order: the vectors first, then one run per shard.
"""

import dagster as dg

AC = dg.AutomationCondition


def shard_not_ready() -> dg.AutomationCondition:
    """True for a user_feeds shard that must not be published as it stands: an input was
    updated after the shard was last built, or the shard is missing, being built, or its last
    run failed (it may hold an old file or none; the hourly refresh rebuilds it)."""
    # Only a build resets it, never a request: a request whose run never starts must not
    # count as fresh. When an input and the shard were both updated between two ticks, the
    # later of the two wins.
    stale = (
        AC.any_deps_match(AC.newly_updated())
        .since(AC.newly_updated())
        .with_label("inputs_updated_since_built")
    )
    return (stale | AC.missing() | AC.in_progress() | AC.execution_failed()).with_label(
        "shard_not_ready"
    )


def publish_when_every_shard_is_fresh() -> dg.AutomationCondition:
    """Ask for the publish once some shard has been rebuilt since the last publish and no
    shard is stale, missing, being built or failed.

    `any_deps_match` over a partitioned dependency is true when *one* partition matches, so
    "every shard is fresh" is written "no shard is not ready". Unlike `any_deps_updated()`,
    shards asked for on this very tick do not count: the publish is requested only after
    they have been built, in a run of its own. A shard rebuilt by a run that also publishes
    (the UI's "materialise all") asks for no second publish."""
    shard_rebuilt = (
        AC.any_deps_match(AC.newly_updated() & ~AC.executed_with_root_target())
        .since_last_handled()
        .with_label("shard_rebuilt_since_publish")
    )
    return (
        shard_rebuilt
        & ~AC.any_deps_match(shard_not_ready()).with_label("any_shard_not_ready")
        & ~AC.in_progress()
    ).with_label("publish_when_every_shard_is_fresh")
